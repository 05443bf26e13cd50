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

from plumbing.data import read_rows, train_eval_rows
from plumbing.run import UserError
from rollout import evaluate_replies, load_reward_fn, prompt_examples

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


def _source(task: str, q: tuple[int, ...]) -> str:
    return f"{task}:{'+'.join(map(str, q))}"


def prompt_rows(task: str, held_out: bool) -> list[tuple[str, dict]]:
    """PPO / GRPO rows: the prompt and the answer (a field the reward function receives)."""
    return [(_source(task, q), {"prompt": prompt(q), "answer": sum(q)}) for q in questions(task, held_out)]


def sft_rows(task: str, held_out: bool) -> list[tuple[str, dict]]:
    """SFT rows: the prompt and the bare number as the assistant's reply (and the operands, for distill.py's
    few-shot teacher)."""
    return [(_source(task, q), {"prompt": prompt(q), "completion": [{"role": "assistant", "content": str(sum(q))}],
                             "operands": list(q)}) for q in questions(task, held_out)]


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
            rows.append((_source(task, q), {"prompt": prompt(q), "chosen": [{"role": "assistant", "content": str(s)}],
                                         "rejected": [{"role": "assistant", "content": str(w)}]}))
    return rows


def reward_fns(specs: list[str], dataset: str, other: str = "") -> list[tuple[str, object]]:
    """(name, function) of each --reward-fn, or on a built-in task its verifier (`tasks:reward`)."""
    if specs:
        return [(spec, load_reward_fn(spec)) for spec in specs]
    if is_task(dataset):
        return [("tasks:reward", reward)]
    raise UserError(f"--dataset {dataset}: pass --reward-fn module:function{other}")


def load_rows(args, kind: str) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(train rows, eval rows) of one kind ("sft", "preference" or "prompt"): a built-in task's own rows and
    held-out split, else --dataset's rows and a held-out slice of them; --eval-dataset, when given, is the eval set
    either way."""
    if not is_task(args.dataset):
        return train_eval_rows(args.dataset, args.eval_dataset, args.eval_size)
    make = {"sft": sft_rows, "preference": preference_rows, "prompt": prompt_rows}[kind]
    eval_rows = read_rows(args.eval_dataset, split="test") if args.eval_dataset else make(args.dataset, True)
    return make(args.dataset, False), eval_rows


def accuracy(dataset: str, ro) -> dict[str, float]:
    """{"greedy_accuracy": the verifier's mean over a rollout's replies} on a built-in task, else {}."""
    if not is_task(dataset):
        return {}
    return {"greedy_accuracy": sum(reward(None, ro.texts, [e["fields"]["answer"] for e in ro.examples])) / len(ro)}


def greedy_eval(trainer, max_new_tokens: int = 8) -> dict[str, float]:
    """A trainer's eval on a built-in task: {"greedy_accuracy": ...}, the verifier's mean over greedy replies to the
    held-out questions (a few printed); {} on any other dataset."""
    if not is_task(trainer.args.dataset):
        return {}
    examples = prompt_examples(trainer.tokenizer, prompt_rows(trainer.args.dataset, True), 10**9, split=None)
    replies = []

    def verified(ro) -> dict:
        replies.extend(f"{e['source'].split(':')[1].replace('+', ' + ')} -> {t.strip()!r}"
                       for e, t in zip(ro.examples, ro.texts))
        return accuracy(trainer.args.dataset, ro)
    metrics = evaluate_replies(trainer, examples, 32, verified, max_new_tokens=max_new_tokens)
    trainer.run_log.write("  sample replies: " + "; ".join(replies[:4]))
    return metrics
