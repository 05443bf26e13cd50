"""The built-in tasks: sums and products asked in plain words, answered by a number, checked by a verifier.

    --dataset arithmetic    a + b with one-digit operands (the default)
    --dataset arithmetic3   a + b + c with one-digit operands (harder for a 135M model: room for RL)
    --dataset multiply      a * b with two-digit operands, with a calculator tool: multi-turn episodes
                            (CalculatorEnv) in which the model may reply calc(EXPRESSION) and reads the result

A task owns its questions and held-out split, its chat prompts, the rows every algorithm trains on (SFT rows,
preference pairs, prompt rows), its verifier reward and its greedy evaluation. Algorithm scripts import a task;
a task imports no algorithm.

A reply is correct only if its FIRST integer equals the answer: "7 + 5 = 12" is wrong (its first integer is 7), "12"
and "The answer is 12." are right. Listing numbers earns nothing. Held-out questions never appear in training, also
not with the operands in another order.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from plumbing.data import read_rows, train_eval_rows
from plumbing.run import UserError
from rollout import Env, episode_metrics, evaluate_replies, load_callable, prompt_examples


@dataclass(frozen=True)
class Task:
    operands: int
    digits: range  # each operand's values
    op: str  # "+" or "*"
    eval_questions: int  # a fixed sample of the held-out questions keeps greedy eval short
    tool: bool = False  # episodes with the calculator (CalculatorEnv)


TASKS = {"arithmetic": Task(2, range(10), "+", 48), "arithmetic3": Task(3, range(10), "+", 48),
         "multiply": Task(2, range(10, 100), "*", 24, tool=True)}
TEMPLATE = "What is {}? Answer with just the number."


def is_task(name: str) -> bool:
    return name in TASKS


def questions(task: str, held_out: bool) -> list[tuple[int, ...]]:
    """All ordered operand tuples of the task; a fixed quarter of the unordered ones (in every order) is held out."""
    t = TASKS[task]
    tuples = [()]
    for _ in range(t.operands):
        tuples = [q + (d,) for q in tuples for d in t.digits]
    multisets = sorted({tuple(sorted(q)) for q in tuples})
    random.Random(1234).shuffle(multisets)  # fixed, independent of --seed: the held-out set never changes
    cut = len(multisets) // 4
    chosen = set(multisets[:cut] if held_out else multisets[cut:])
    qs = [q for q in tuples if tuple(sorted(q)) in chosen]
    if held_out and len(qs) > t.eval_questions:
        qs = sorted(random.Random(99).sample(qs, t.eval_questions))
    return qs


def answer(task: str, q: tuple[int, ...]) -> int:
    return math.prod(q) if TASKS[task].op == "*" else sum(q)


def prompt(q: tuple[int, ...], task: str = "arithmetic") -> list[dict]:
    """The question as a chat; on the tool task after a system message that offers the calculator."""
    expression = f" {TASKS[task].op} ".join(map(str, q))
    if TASKS[task].tool:
        return [{"role": "system", "content": CALCULATOR}, {"role": "user", "content": f"What is {expression}?"}]
    return [{"role": "user", "content": TEMPLATE.format(expression)}]


def first_integer(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def reward(prompts: list, completions: list[str], answer: list[int], **_) -> list[float]:
    """The verifier: 1.0 if the completion's first integer is the answer, else 0.0 (`--reward-fn tasks:reward`)."""
    return [float(first_integer(c) == a) for c, a in zip(completions, answer)]


def _source(task: str, q: tuple[int, ...]) -> str:
    return f"{task}:{TASKS[task].op.join(map(str, q))}"


def prompt_rows(task: str, held_out: bool) -> list[tuple[str, dict]]:
    """PPO / GRPO rows: the prompt, the answer (a field the reward function receives) and the operands."""
    return [(_source(task, q), {"prompt": prompt(q, task), "answer": answer(task, q), "operands": list(q)})
            for q in questions(task, held_out)]


def sft_rows(task: str, held_out: bool) -> list[tuple[str, dict]]:
    """SFT rows: the prompt and the bare number as the assistant's reply (and the operands, for distill.py's
    few-shot teacher); on the tool task a demonstration: the calculator called, its result read back."""
    if TASKS[task].tool:
        return [(_source(task, q), {"messages": prompt(q, task) + [
            {"role": "assistant", "content": f"calc({q[0]}*{q[1]})"}, {"role": "tool", "content": str(answer(task, q))},
            {"role": "assistant", "content": str(answer(task, q))}]}) for q in questions(task, held_out)]
    return [(_source(task, q), {"prompt": prompt(q), "completion": [{"role": "assistant", "content": str(sum(q))}],
                             "operands": list(q)}) for q in questions(task, held_out)]


def preference_rows(task: str, held_out: bool, per_question: int = 4) -> list[tuple[str, dict]]:
    """DPO / reward-model pairs: chosen = the sum, rejected = a plausible wrong number (off by one or two, the
    product, a difference, an operand), up to four per question."""
    if TASKS[task].tool:
        raise UserError(f"--dataset {task}: the tool task has no preference pairs (sft.py, grpo.py, ppo.py run it)")
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


def default_env(dataset: str) -> str | None:
    """The environment a built-in task's episodes run in (`--env` default): the tool task's calculator."""
    return "tasks:CalculatorEnv" if is_task(dataset) and TASKS[dataset].tool else None


def reward_fns(specs: list[str], dataset: str, other: str = "") -> list[tuple[str, object]]:
    """(name, function) of each --reward-fn, or on a built-in task its verifier (`tasks:reward`)."""
    if specs:
        return [(spec, load_callable(spec, "--reward-fn")) for spec in specs]
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
    held-out questions (a few printed; on the tool task whole episodes with the calculator); {} on any other
    dataset."""
    task = trainer.args.dataset
    if not is_task(task):
        return {}
    rows = prompt_rows(task, True)
    examples = prompt_examples(trainer.tokenizer, rows, 10**9, split=None)
    replies = []

    def verified(ro) -> dict:
        replies.extend(f"{e['source'].split(':')[1]} -> {t.strip()!r}" for e, t in zip(ro.examples, ro.transcripts or
                                                                                          ro.texts))
        return accuracy(task, ro) | episode_metrics(ro)
    tool = TASKS[task].tool and getattr(trainer, "env", None) is None
    if tool:  # an offline script on the tool task: its eval runs the task's episodes
        trainer.env, max_new_tokens = Env("tasks:CalculatorEnv", CalculatorEnv), TOOL_TURN_TOKENS
    try:
        metrics = evaluate_replies(trainer, examples, 32, verified, max_new_tokens=max_new_tokens)
    finally:
        if tool:
            trainer.env = None
    trainer.run_log.write("  sample replies: " + "; ".join(replies[:4]))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# The tool task's calculator and environment

CALCULATOR = ("You have a calculator. To use it, reply with just calc(EXPRESSION), for example calc(12*34); it "
              "answers with the result. Then reply with the answer.")
TOOL_TURN_TOKENS = 16  # a call such as calc(23*47), or an answer, with its end-of-turn token


class CalculatorEnv:
    """One episode of --dataset multiply (`--env tasks:CalculatorEnv`, the default there): the question; a reply
    that calls calc(EXPRESSION) gets the calculator's answer (or its error message) as a tool message; any other
    reply ends the episode, and the reward functions (by default the verifier) score it."""

    def __init__(self, row: dict):
        self.operands, self.answer = row["operands"], row["answer"]
        self.tool_calls = self.tool_errors = 0
        self.metrics = {"called": 0.0, "called_right": 0.0}  # env/called, env/called_right: per-episode means

    def reset(self) -> list[dict]:
        return prompt(tuple(self.operands), "multiply")

    def step(self, reply: str) -> list[dict] | None:
        expression = calculator_call(reply)
        if expression is None:
            return None
        self.tool_calls += 1
        result = calculate(expression)
        self.tool_errors += result.startswith("error")
        self.metrics["called"] = 1.0
        self.metrics["called_right"] = max(self.metrics["called_right"], float(result == str(self.answer)))
        return [{"role": "tool", "content": result}]

    def reward(self) -> None:
        return None


class NoCalculatorEnv(CalculatorEnv):
    """The same questions without the tool (no system message; every reply is the answer): the baseline."""

    def reset(self) -> list[dict]:
        return [{"role": "user", "content": TEMPLATE.format(f"{self.operands[0]} * {self.operands[1]}")}]

    def step(self, reply: str) -> None:
        return None


def calculator_call(reply: str) -> str | None:
    """The EXPRESSION of the first calc(EXPRESSION) in a reply (parentheses inside it balanced), or None."""
    start = reply.find("calc(")
    if start < 0:
        return None
    depth, i = 1, start + 5
    while i < len(reply) and depth:
        depth += {"(": 1, ")": -1}.get(reply[i], 0)
        i += 1
    return reply[start + 5:i - 1] if depth == 0 else reply[start + 5:]


MAX_EXPRESSION, MAX_MAGNITUDE, MAX_EXPONENT, MAX_DEPTH = 100, 10**15, 12, 20


def calculate(expression: str) -> str:
    """Evaluate + - * / % ** ^ and parentheses over integers and decimals, for any text a model writes: never eval,
    never an exception; bounds on length, nesting, magnitude and exponent. -> the result ("1081", "2.5") or
    "error: why"."""
    if len(expression) > MAX_EXPRESSION:
        return f"error: expression longer than {MAX_EXPRESSION} characters"
    tokens = re.findall(r"\d+(?:\.\d+)?|\*\*|[-+*/%^()]|\S", expression)
    if not tokens:
        return "error: empty expression"
    try:
        value, rest = _sum(tokens, 0)
        if rest != len(tokens):
            raise ValueError(f"unexpected {tokens[rest]!r}")
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError) as e:
        return f"error: {e}"
    if value == int(value):
        return str(int(value))
    return f"{value:.6g}"


def _bounded(x: float) -> float:
    if not math.isfinite(x) or abs(x) > MAX_MAGNITUDE:
        raise ValueError("result too large")
    return x


def _sum(t: list[str], i: int, depth: int = 0) -> tuple[float, int]:
    x, i = _product(t, i, depth)
    while i < len(t) and t[i] in "+-":
        y, j = _product(t, i + 1, depth)
        x, i = _bounded(x + y if t[i] == "+" else x - y), j
    return x, i


def _product(t: list[str], i: int, depth: int) -> tuple[float, int]:
    x, i = _power(t, i, depth)
    while i < len(t) and t[i] in ("*", "/", "%"):
        y, j = _power(t, i + 1, depth)
        if t[i] != "*" and y == 0:
            raise ZeroDivisionError("division by zero")
        x, i = _bounded(x * y if t[i] == "*" else x / y if t[i] == "/" else x % y), j
    return x, i


def _power(t: list[str], i: int, depth: int) -> tuple[float, int]:
    x, i = _unary(t, i, depth)
    if i < len(t) and t[i] in ("**", "^"):
        y, i = _power(t, i + 1, depth)  # right-associative
        if abs(y) > MAX_EXPONENT:
            raise ValueError(f"exponent beyond {MAX_EXPONENT}")
        if x == 0 and y < 0:
            raise ZeroDivisionError("division by zero")
        x = _bounded(float(x) ** y)
    return x, i


def _unary(t: list[str], i: int, depth: int) -> tuple[float, int]:
    if i >= len(t):
        raise ValueError("incomplete expression")
    if t[i] in "+-":
        x, j = _unary(t, i + 1, depth)
        return (-x if t[i] == "-" else x), j
    if t[i] == "(":
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH}")
        x, j = _sum(t, i + 1, depth + 1)
        if j >= len(t) or t[j] != ")":
            raise ValueError("unbalanced parentheses")
        return x, j + 1
    if re.fullmatch(r"\d+(?:\.\d+)?", t[i]):
        if len(t[i]) > 16:
            raise ValueError("number too long")
        return _bounded(float(t[i]) if "." in t[i] else int(t[i])), i + 1
    raise ValueError(f"unexpected {t[i]!r}")
