"""Data: reading rows (each with its source, 'file:line', for one-line errors), the order the training rows are
seen in, and tokenizing a prompt and its completions with the truncation rules of CONVENTIONS.md."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from plumbing.models import end_of_turn_ids
from plumbing.run import UserError, first_line, os_error, print0


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """Rows of a .jsonl/.json file or a hub dataset, each with its source ('file:line') for error messages."""
    path = Path(source).expanduser()
    if not path.is_dir() and (path.suffix in (".jsonl", ".json") or path.exists()):
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise os_error("cannot read", source, e) from None
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(raw.split(b"\n"), 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{source}:{i}: not valid UTF-8") from None
                if not text.strip():
                    continue
                try:
                    rows.append((f"{source}:{i}", json.loads(text)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{source}:{i}: malformed JSON ({e.msg})") from None
        else:
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{source}: not a valid UTF-8 JSON file ({e})") from None
            if not isinstance(data, list):
                raise UserError(f"{source}: expected a JSON list of row objects")
            rows = [(f"{source}[{i}]", row) for i, row in enumerate(data)]
    else:  # a local dataset directory or a hub dataset, via `datasets`
        name, _, sp = (source, "", "") if path.is_dir() else source.partition(":")
        try:
            import datasets
            ds = datasets.load_dataset(name, split=sp or split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not get it"
            raise UserError(f"dataset {source}: not a local file, and `datasets` could not load it "
                            f"({first_line(e)})") from None
        rows = [(f"{source}[{i}]", row) for i, row in enumerate(ds)]
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    return rows


def train_eval_rows(dataset: str, eval_dataset: str | None, eval_size: int) -> tuple[list, list]:
    """--dataset and --eval-dataset rows; without --eval-dataset, a fixed, seeded held-out slice of --dataset."""
    rows = read_rows(dataset)
    if eval_dataset:
        return rows, read_rows(eval_dataset, split="test")
    if eval_size == 0:
        return rows, []
    if len(rows) < 2:
        raise UserError(f"{dataset}: needs at least 2 rows (one is held out for eval; --eval-size 0 for none)")
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # independent of --seed: the held-out rows never change
    n_eval = min(eval_size, max(1, len(rows) // 10))
    print0(f"eval: {n_eval} rows held out of {dataset}")
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def check_usable_rows(args, train_data: list, eval_data: list, eval_rows: list) -> None:
    """After truncation: a --dataset (or --eval-dataset) left with no usable row is one line naming it; a held-out
    slice of --dataset that lost all its rows costs only the held-out eval (said): the training rows are fine."""
    if not train_data:
        raise UserError(f"{args.dataset}: no usable rows left after truncation to --max-length {args.max_length}")
    if eval_rows and not eval_data:
        if args.eval_dataset:
            raise UserError(f"{args.eval_dataset}: no usable rows left after truncation to --max-length "
                            f"{args.max_length}")
        print0(f"warning: all {len(eval_rows)} rows held out of {args.dataset} for eval were dropped by truncation to "
               f"--max-length {args.max_length}: no held-out eval (raise --max-length or pass --eval-dataset)")


def check_text(where: str, key: str, value: Any, roles: tuple[str, ...] | None = None) -> None:
    """A field is a non-empty string or a non-empty list of {role, content} messages (of `roles`, if given)."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: field '{key}' is empty")
        return
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: field '{key}' message {j} needs string 'role' and 'content'")
            if roles and m["role"] not in roles:
                raise UserError(f"{where}: field '{key}' message {j} has role '{m['role']}', expected one of {roles}")
        if not "".join(m["content"] for m in value).strip():
            raise UserError(f"{where}: field '{key}' is empty")
        return
    if value is None:
        raise UserError(f"{where}: missing key '{key}'")
    if isinstance(value, list):
        raise UserError(f"{where}: field '{key}' is an empty list (expected a string or a list of messages)")
    raise UserError(f"{where}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")


def check_prompt(where: str, value: Any) -> None:
    """check_text for a prompt; a conversation must not open with an assistant turn (a reply to nothing: chat
    templates render turns after a system or user message)."""
    check_text(where, "prompt", value)
    if isinstance(value, list) and value[0]["role"] == "assistant":
        raise UserError(f"{where}: field 'prompt' starts with an assistant turn (a reply to nothing; the chat template "
                        f"renders turns after a system or user message)")


class ShardedSampler:
    """The training rows as one stream of seeded epoch shuffles (perm_0, perm_1, ...); global micro-batch k is the
    next batch_size x world_size rows of the stream and rank r takes every W-th of them, so the ranks' micro-batches
    together are the single-process batch of the same global size. The position in the stream (`consumed`) is all
    a checkpoint needs: a resume with another batch size or world size continues at the next unseen row."""

    def __init__(self, num_rows: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.bs, self.rank, self.world, self.seed = num_rows, batch_size, rank, world_size, seed
        self.consumed = 0
        if num_rows < batch_size * world_size:
            raise UserError(f"{num_rows} training rows cannot fill one global micro-batch "
                            f"(--batch-size {batch_size} x world size {world_size})")
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded shuffle of the rows for one epoch."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def _row(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch not in self._orders:  # keep this epoch's order and the previous one (a batch may straddle them)
            self._orders = {epoch: self.epoch_order(epoch)} | {e: p for e, p in self._orders.items() if e == epoch - 1}
        return self._orders[epoch][k]

    def next_indices(self, all_ranks: bool = False) -> list[int]:
        """This rank's rows of the next global micro-batch (all_ranks: the whole global micro-batch, in order)."""
        gb = self.bs * self.world
        rows = [self._row(p) for p in range(self.consumed, self.consumed + gb)]
        self.consumed += gb
        return rows if all_ranks else rows[self.rank::self.world]


def rank_batches(items: list, batch_size: int, rank: int, world_size: int):
    """Split items into global batches of batch_size x world_size, each split across ranks like a training
    micro-batch. Yields (this rank's items, how many of them are real): a rank whose share is empty gets items[:1]
    as filler, so every rank runs the same number of forwards (FSDP and synced generation need that)."""
    gb = batch_size * world_size
    for s in range(0, len(items), gb):
        mine = items[s:s + gb][rank::world_size]
        yield mine or items[:1], len(mine)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizing a prompt and its completions


def render_chat(tok, messages: list[dict], where: str, generation_prompt: bool) -> str:
    """The chat template's text; a template that refuses the conversation (raise_exception, an empty list, a role
    it does not know) is one line naming the row."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, transformers' ValueError, whatever a template raises
        raise UserError(f"{where}: the model's chat template refuses these messages ({first_line(e)})") from None


def encode_prompt(tok, prompt: str | list[dict], where: str = "a prompt") -> list[int]:
    """Chat messages get the chat template (with the assistant header) and only the special tokens it writes (a
    template that writes BOS gets exactly that one). A string gets the special tokens the tokenizer adds to plain
    text, as TRL: the BOS that Llama, Mistral and Gemma were pretrained with (not a second one if the string starts
    with it), never a trailing EOS."""
    if isinstance(prompt, list):
        text = render_chat(tok, prompt, where, generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(prompt, add_special_tokens=not (tok.bos_token and prompt.startswith(tok.bos_token)))["input_ids"]
    eos = tok.eos_token
    return ids[:-1] if eos and ids[-1:] == [tok.eos_token_id] and not prompt.rstrip().endswith(eos) else ids


def encode_completion(tok, completion: str | list[dict], end_of_turn: list[int] | None = None,
                      chat: bool = False) -> list[int]:
    """Completion tokens + exactly one end token: the model's end of turn (`end_of_turn[0]`, models.end_of_turn_ids)
    for assistant messages (which contribute their content) or after a chat prompt (`chat`), so that every row format
    teaches the stop a chat conversation does; EOS after a plain-text prompt, as TRL. A completion that already ends
    with an end-of-turn id keeps it."""
    end_of_turn = end_of_turn or end_of_turn_ids(tok)
    if isinstance(completion, list):
        completion, chat = "".join(m["content"] for m in completion), True
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    if ids and ids[-1] in end_of_turn:
        return ids
    return ids + [end_of_turn[0] if chat or tok.eos_token_id is None else tok.eos_token_id]


def tokenize_completions(tok, prompt: str | list[dict], completions: list, max_length: int,
                         max_prompt_length: int, end_of_turn: list[int] | None = None,
                         where: str = "a row") -> tuple[dict | None, bool]:
    """-> ({"prompt": ids, "completions": [ids, ...]}, truncated?), or (None, True) if a completion would vanish. The
    prompt is cut from the left to max_prompt_length, then each completion from the right to max_length."""
    prompt_ids = encode_prompt(tok, prompt, where)
    comps = [encode_completion(tok, c, end_of_turn, chat=isinstance(prompt, list)) for c in completions]
    truncated = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]
    room = max(max_length - len(prompt_ids), 0)
    truncated |= any(len(c) > room for c in comps)
    comps = [c[:room] for c in comps]
    if not all(comps):
        return None, True
    return {"prompt": prompt_ids, "completions": comps}, truncated
