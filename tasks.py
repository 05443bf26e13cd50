"""The built-in tasks: sums asked in plain words, answered by a number, checked by a verifier.

    --dataset arithmetic    a + b with one-digit operands (the default)
    --dataset arithmetic3   a + b + c with one-digit operands (harder for a 135M model: room for RL)

A task owns its questions and held-out split, its chat prompts, the rows every algorithm trains on (SFT rows,
preference pairs, prompt rows), its verifier reward and its greedy evaluation. Algorithm scripts import a task;
a task imports no algorithm.

A reply is correct only if its FIRST integer equals the answer: "7 + 5 = 12" is wrong (its first integer is 7), "12"
and "The answer is 12." are right. Listing numbers earns nothing. Held-out questions never appear in training, also
not with the operands in another order.
"""
from __future__ import annotations

import random
import re

import torch
from torch import nn

from common import DistInfo, ceil_div, progress, rank_batches
from packing import encode_prompt
from rollout import generate, left_pad

TASKS = {"arithmetic": 2, "arithmetic3": 3}  # name -> number of one-digit operands
MAX_EVAL_QUESTIONS = 48  # a fixed sample of the held-out questions keeps greedy eval short
TEMPLATE = "What is {}? Answer with just the number."


def is_task(name: str) -> bool:
    return name in TASKS


def questions(task: str, held_out: bool) -> list[tuple[int, ...]]:
    """All ordered operand tuples of the task; a fixed quarter of the unordered ones (in every order) is held out."""
    n = TASKS[task]
    multisets = sorted({tuple(sorted(q)) for q in _tuples(n)})
    random.Random(1234).shuffle(multisets)  # fixed, independent of --seed: the held-out set never changes
    cut = len(multisets) // 4
    chosen = set(multisets[:cut] if held_out else multisets[cut:])
    qs = [q for q in _tuples(n) if tuple(sorted(q)) in chosen]
    if held_out and len(qs) > MAX_EVAL_QUESTIONS:
        qs = sorted(random.Random(99).sample(qs, MAX_EVAL_QUESTIONS))
    return qs


def _tuples(n: int) -> list[tuple[int, ...]]:
    out = [()]
    for _ in range(n):
        out = [q + (d,) for q in out for d in range(10)]
    return out


def prompt(q: tuple[int, ...]) -> list[dict]:
    return [{"role": "user", "content": TEMPLATE.format(" + ".join(map(str, q)))}]


def first_integer(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def reward(prompts: list, completions: list[str], answer: list[int], **_) -> list[float]:
    """The verifier: 1.0 if the completion's first integer is the answer, else 0.0 (`--reward-fn tasks:reward`)."""
    return [float(first_integer(c) == a) for c, a in zip(completions, answer)]


def _loc(task: str, q: tuple[int, ...]) -> str:
    return f"{task}:{'+'.join(map(str, q))}"


def prompt_rows(task: str, held_out: bool) -> list[tuple[str, dict]]:
    """PPO / GRPO rows: the prompt and the answer (a field the reward function receives)."""
    return [(_loc(task, q), {"prompt": prompt(q), "answer": sum(q)}) for q in questions(task, held_out)]


def sft_rows(task: str, held_out: bool) -> list[tuple[str, dict]]:
    """SFT rows: the prompt and the bare number as the assistant's reply."""
    return [(_loc(task, q), {"prompt": prompt(q), "completion": [{"role": "assistant", "content": str(sum(q))}]})
            for q in questions(task, held_out)]


def preference_rows(task: str, held_out: bool, per_question: int = 4) -> list[tuple[str, dict]]:
    """DPO / reward-model pairs: chosen = the sum, rejected = a plausible wrong number (off by one or two, the
    product, a difference, an operand), up to four per question."""
    rng, rows = random.Random(4321), []
    for q in questions(task, held_out):
        s = sum(q)
        prod = 1
        for x in q:
            prod *= x
        wrong = sorted({s + 1, s - 1, s + 2, s - 2, prod, abs(q[0] - q[1]), *q} - {s})
        wrong = [w for w in wrong if w >= 0]
        for w in rng.sample(wrong, min(per_question, len(wrong))):
            rows.append((_loc(task, q), {"prompt": prompt(q), "chosen": [{"role": "assistant", "content": str(s)}],
                                         "rejected": [{"role": "assistant", "content": str(w)}]}))
    return rows


@torch.no_grad()
def greedy_accuracy(model: nn.Module, tok, task: str, autocast, dist_info: DistInfo, synced: bool = False,
                    batch_size: int = 32, max_new_tokens: int = 8, gather: bool = False) -> tuple[float, list[str]]:
    """Greedy replies to the held-out questions, scored by the verifier; questions split over ranks, counts summed.
    synced / gather: FSDP (rollout.generate).
    -> (accuracy, a few 'question -> reply' lines)."""
    was_training = model.training
    model.eval()
    correct, seen, replies = 0, 0, []
    qs = questions(task, held_out=True)
    batches = rank_batches(qs, batch_size, dist_info.rank, dist_info.world_size)
    for mine, n_real in progress(batches, "greedy eval", ceil_div(len(qs), batch_size * dist_info.world_size)):
        ids, mask = left_pad([encode_prompt(tok, prompt(q)) for q in mine], tok.pad_token_id)
        with autocast():
            completions, _, _ = generate(model, tok, ids.to(dist_info.device), mask.to(dist_info.device),
                                         max_new_tokens, synced=synced, gather=gather)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        for q, text in list(zip(mine, texts))[:n_real]:
            correct += first_integer(text) == sum(q)
            replies.append(f"{' + '.join(map(str, q))} -> {text.strip()!r}")
        seen += n_real
    model.train(was_training)
    counts = torch.tensor([correct, seen], dtype=torch.float64, device=dist_info.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item(), replies


def greedy_eval(trainer) -> dict[str, float]:
    """A trainer's eval on a built-in task: {"greedy_accuracy": ...} on the held-out questions (a few replies
    printed); {} on any other dataset."""
    if not is_task(trainer.args.dataset):
        return {}
    acc, replies = greedy_accuracy(trainer.model, trainer.tokenizer, trainer.args.dataset, trainer.autocast,
                                   trainer.dist, synced=trainer.fsdp, gather=trainer.args.gather_for_generation)
    trainer.write("  sample replies: " + "; ".join(replies[:4]))
    return {"greedy_accuracy": acc}
