"""Supervised fine-tuning: next-token NLL on the completion / assistant tokens only (Ouyang et al. 2022, Sec. 3.5,
https://arxiv.org/abs/2203.02155, the SFT stage before the reward model and PPO), one file.

    python sft.py                                   # bundled SmolLM2-135M-Instruct on the built-in arithmetic task
    python sft.py --dataset chats.jsonl --max-length 1024 --learning-rate 2e-5
    torchrun --nproc_per_node 8 sft.py --model path/to/hf_model --dataset chats.jsonl

Rows are {"prompt", "completion"} (strings, or chat message lists: the prompt gets the chat template, the completion
its text plus the model's end-of-turn token, as in dpo.py; plain text ends with EOS) or {"messages": [...]}
conversations. A conversation is rendered with the chat template; every assistant turn is in the loss, each with its
end-of-turn token (a model that never sees its stop token never learns to stop); everything else (system, user, role
headers, template glue) is context only.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import tyro
from torch import nn

import tasks
from common import (Batch, BaseTrainer, LossOutput, Mean, TrainArgs, UserError, add_lora, check_prompt, check_text,
                    check_usable_rows, encode_completion, encode_prompt, end_of_turn_ids, kept_logits, label_logps,
                    pack_for_labels, print0, render_chat, run_main, use_segment_attention)


@dataclass
class Args(TrainArgs):
    padding_free: bool = True
    """pack each micro-batch into one row of whole sequences that never attend to each other (prefixes they share,
    e.g. a system prompt, computed once; exact); --no-padding-free pads to the longest sequence"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate"""
    total_steps: int = 40
    """optimizer steps (0 = run only the step-0 eval)"""
    warmup_steps: int = 4
    """linear warm-up steps of the scheduler"""
    eval_every: int = 20
    """steps between evals (0 = only at start and end)"""
    log_every: int = 5
    """steps between log lines / metrics.jsonl records"""


def sft_loss(token_logps: torch.Tensor) -> Mean:
    """The mean NLL over the loss tokens of the whole optimizer update; token_logps [N] -> this micro-batch's share,
    Mean(summed NLL, N): the loop sums both over micro-batches and ranks, so accumulation and world size do not
    change the gradient."""
    return Mean(-token_logps.sum(), len(token_logps))


def render(tok, messages: list[dict], source: str) -> str:
    return render_chat(tok, messages, source, generation_prompt=False)


PLACEHOLDER = "\ue000"  # a private-use character: no template trims, splits or rewrites it


def tokenize_conversation(tok, messages: list[dict], source: str,
                          end_of_turn: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """-> token ids of the rendered conversation and a loss mask: True on each assistant turn's content as the
    template writes it, plus the end-of-turn token after it (any of `end_of_turn`, the trainer's; whitespace
    before it included). Headers, template glue (the newline after Gemma's <end_of_turn>, Qwen3's empty think block,
    DeepSeek-R1's role token) and all other messages are context.

    An assistant message is located by rendering the conversation a second time with its content replaced by a
    placeholder: the text where the two renders differ is that content as the template writes it (trimmed, an earlier
    turn's reasoning dropped, ...). No generation tags needed, and templates that do not render message by message
    (Qwen3's think block only on the last turn, Phi-3's closing EOS, Mistral's system prompt in the last user turn)
    work as well as those that do."""
    stops = tok.convert_ids_to_tokens(end_of_turn or end_of_turn_ids(tok))
    full = render(tok, messages, source)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    token_starts, token_ends = zip(*enc["offset_mapping"]) if ids else ((), ())
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        other = render(tok, messages[:i] + [m | {"content": PLACEHOLDER}] + messages[i + 1:], source)
        start = common_prefix(full, other)
        end = len(full) - common_prefix(full[start:][::-1], other[start:][::-1])
        if end <= start:
            raise UserError(f"{source}: the chat template renders assistant message {i} as nothing (nothing to learn)")
        rest = full[end:]
        glue = len(rest) - len(rest.lstrip())
        stop = next((s for s in stops if rest[glue:].startswith(s)), None)
        end += glue + len(stop) if stop else 0
        first, stop_at = bisect.bisect_right(token_ends, start), bisect.bisect_left(token_starts, end)
        mask[first:stop_at] = [True] * (stop_at - first)  # the tokens overlapping [start, end)
    return ids, mask


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (C speed on long conversations)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def tokenize_row(tok, row: dict, source: str, max_length: int, max_prompt_length: int,
                 end_of_turn: list[int] | None = None):
    """-> ({ids, mask}, truncated?) or (None, True) if no loss token survives truncation. prompt/completion rows: the
    prompt is cut from the left to max_prompt_length, then the completion from the right to max_length;
    conversations are cut from the right to max_length."""
    if "messages" in row:
        ids, mask = tokenize_conversation(tok, row["messages"], source, end_of_turn)
        truncated = len(ids) > max_length
        ids, mask = ids[:max_length], mask[:max_length]
    else:
        prompt = encode_prompt(tok, row["prompt"])
        completion = encode_completion(tok, row["completion"], end_of_turn, chat=isinstance(row["prompt"], list))
        truncated = len(prompt) > max_prompt_length
        prompt = prompt[-max_prompt_length:]
        room = max_length - len(prompt)
        truncated |= len(completion) > room
        completion = completion[:max(room, 0)]
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if mask[0]:  # token 0 has nothing to be predicted from
        mask[0] = False
    if not any(mask):
        return None, True
    return {"ids": ids, "mask": mask}, truncated


def check_row(source: str, row: dict) -> None:
    """{"messages": [...] with an assistant turn} or {"prompt", "completion"}; one line naming the row otherwise."""
    if "messages" in row:
        check_text(source, "messages", row["messages"])
        turns = [j for j, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        if not turns:
            raise UserError(f"{source}: field 'messages' has no assistant turn (nothing to learn from)")
        if turns[0] == 0:
            raise UserError(f"{source}: field 'messages' starts with an assistant turn (a reply to nothing; the chat "
                            f"template renders turns after a system or user message)")
        for j in turns:
            if not row["messages"][j]["content"].strip():
                raise UserError(f"{source}: field 'messages' message {j} (assistant) is empty")
        return
    if "prompt" not in row and "completion" not in row:
        raise UserError(f"{source}: expected a 'messages' list or 'prompt' and 'completion' fields, got keys "
                        f"{sorted(row)}")
    check_prompt(source, row.get("prompt"))
    check_text(source, "completion", row.get("completion"), roles=("assistant",))


def collate(examples: list[dict], pad_id: int, padding_free: bool) -> Batch:
    """Sequences -> one forward's tensors. `labels` are the loss tokens in sequence order; `keep` marks the positions
    that predict them (only there does the LM head run).

    padding_free: one packed row (pack_for_labels), each sequence attending only to itself; a prefix that sequences
    share is laid out once, which is exact (each token sees exactly its own context). Else a right-padded [B, L]
    batch."""
    seqs = [e["ids"] for e in examples]
    segments = None
    if padding_free:
        tensors, segments = pack_for_labels(seqs, [e["mask"] for e in examples])
    else:
        width = max(map(len, seqs))
        tensors = {"input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs]),
                   "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                   "keep": torch.tensor([e["mask"][1:] + [False] * (width - len(e["mask"]) + 1) for e in examples])}
    tensors["labels"] = torch.tensor([t for e in examples for t, m in zip(e["ids"], e["mask"]) if m])
    return Batch(tensors, num_samples=len(examples), num_tokens=sum(map(len, seqs)),
                 sources=[e["source"] for e in examples], attention_segments=segments)


class SFTTrainer(BaseTrainer):
    script_name = "sft"
    summary_keys = ("loss", "greedy_accuracy")
    args: Args

    def build_model(self) -> nn.Module:
        model = add_lora(super().build_model(), self.args)
        if self.args.padding_free:
            use_segment_attention(model)
        return model

    def setup_data(self) -> None:
        a = self.args
        train_rows, eval_rows = tasks.load_rows(a, "sft")
        self.train_data = self._tokenize(train_rows, "train")
        self.eval_data = self._tokenize(eval_rows, "eval")
        check_usable_rows(a, self.train_data, self.eval_data, eval_rows)

    def _tokenize(self, rows: list[tuple[str, dict]], split: str) -> list[dict]:
        out, truncated, dropped = [], 0, 0
        for source, row in rows:
            check_row(source, row)
            ex, cut = tokenize_row(self.tokenizer, row, source, self.args.max_length, self.args.max_prompt_length,
                                   self.end_of_turn)
            truncated += cut and ex is not None
            dropped += ex is None
            if ex is not None:
                out.append(ex | {"source": source})
        n_loss = sum(sum(e["mask"]) for e in out)
        print0(f"{split}: {len(out)} sequences, {n_loss} loss tokens ({truncated} truncated, {dropped} dropped: no "
               f"loss token left within --max-length {self.args.max_length})")
        return out

    def make_batch(self, examples: list[dict]) -> Batch:
        return collate(examples, self.tokenizer.pad_token_id, self.args.padding_free)

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        token_logps = label_logps(kept_logits(model, batch.tensors, batch.attention_segments), batch["labels"])  # [N]
        loss = sft_loss(token_logps)
        metrics = {"loss": Mean(loss.total.detach(), loss.count)}  # logged: the mean over the window's loss tokens
        if model.training:  # loss tokens per step: each micro-batch adds its own, and 1 / (micro-batches x ranks)
            metrics["num_tokens"] = Mean(loss.count, 1 / (self.args.gradient_accumulation_steps * self.dist.world_size))
        return LossOutput(loss, metrics)

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate() if self.eval_data else {}
        return metrics | tasks.greedy_eval(self)


def main(args: Args | None = None) -> SFTTrainer:
    args = args or tyro.cli(Args)
    trainer = SFTTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
