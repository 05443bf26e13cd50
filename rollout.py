"""Rollouts for the online algorithms (ppo.py, grpo.py, online_dpo.py): prompts, sampling, scoring, the packed forward
over prompt + completion, and the held-out greedy eval. What an RL researcher changes lives here or in the script.

A rollout is N sequences (a prompt's samples contiguous), each a prompt and its completion; `mask` marks the tokens
the policy sampled, the only ones a loss or a metric counts. Every function reads the plumbing it needs from the
trainer: its model, tokenizer, end-of-turn ids, autocast, and the flags --max-new-tokens, --temperature, --top-p,
--padding-free, --gather-for-generation.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from common import Batch, Mean, check_flag, load_model
from plumbing.data import check_prompt, encode_prompt, rank_batches, render_chat
from plumbing.generation import generate, truncate_after_eos  # noqa: F401  (truncate_after_eos: tests, tasks)
from plumbing.logprobs import kept_logits, label_logps, pack_for_labels
from plumbing.metrics import MetricWindow
from plumbing.models import reward_head, reward_model_scores  # noqa: F401  (reward_head: ppo.py)
from plumbing.run import (UserError, agree_on_error, ceil_div, first_line, print0, progress,  # noqa: F401
                          stopwatch, time_limit)  # stopwatch: the scripts' per-phase times

# PPO and GRPO refuse --top-p < 1 with this: their policy gradient and KL are taken on the distribution that was
# sampled, and a truncated one makes the log-probs of the current and reference policy -inf wherever their own
# nucleus leaves the sampled token out
TOP_P_OFF_POLICY = ("must be 1: the log-probs, ratios and KL use the full softmax(logits / T), so sampling from a "
                    "nucleus would make every update off-policy; lower --temperature instead")


@dataclass
class Rollout:
    examples: list[dict]
    """the prompt example each sequence came from ({"source", "prompt", "prompt_ids", "fields"})"""
    prompt_ids: list[list[int]]
    completions: torch.Tensor
    """[N, L] the ids after the prompt, pad after the end"""
    mask: torch.Tensor
    """[N, L] float: 1 on sampled tokens, up to and including the end-of-turn token"""
    lengths: torch.Tensor
    """[N] completion tokens that exist (sampled, and in a multi-turn episode the environment's between them)"""
    has_eos: torch.Tensor
    """[N] bool: the reply ended its turn (was not cut by --max-new-tokens)"""
    texts: list[str]
    """the final reply of each sequence, decoded: what reward functions score"""
    stats: dict = field(default_factory=dict)
    """per-sequence tensors a multi-turn rollout adds (turns, tool calls, the environment's reward, ...)"""
    transcripts: list[str] | None = None
    """a multi-turn episode's whole completion as text, turn by turn (for the sample log)"""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, rows) -> Rollout:
        """The sequences `rows` (indices or a range), in that order."""
        rows = list(rows)
        idx = torch.tensor(rows, device=self.mask.device)
        return Rollout([self.examples[i] for i in rows], [self.prompt_ids[i] for i in rows], self.completions[idx],
                       self.mask[idx], self.lengths[idx], self.has_eos[idx], [self.texts[i] for i in rows],
                       {k: v[idx] for k, v in self.stats.items()},
                       [self.transcripts[i] for i in rows] if self.transcripts else None)

    def num_tokens(self) -> int:
        return sum(map(len, self.prompt_ids)) + int(self.lengths.sum())


def prompt_examples(tok, rows: list[tuple[str, dict]], max_prompt_length: int, split: str | None) -> list[dict]:
    """Prompt rows -> {source, prompt, prompt_ids (cut from the left), row, fields: the row's other fields}."""
    out, truncated = [], 0
    for source, row in rows:
        check_prompt(source, row.get("prompt"))
        ids = encode_prompt(tok, row["prompt"], source)
        truncated += len(ids) > max_prompt_length
        out.append({"source": source, "prompt_ids": ids[-max_prompt_length:], "prompt": row["prompt"], "row": row,
                    "fields": {k: v for k, v in row.items() if k != "prompt"}})
    if split:
        print0(f"{split}: {len(out)} prompts ({truncated} cut from the left to --max-prompt-length)")
    return out


def env_examples(rows: list[tuple[str, dict]], split: str | None) -> list[dict]:
    """Prompt rows of an --env run: the environment opens each episode from the row's fields (no 'prompt' needed)."""
    if split:
        print0(f"{split}: {len(rows)} rows (each episode opened by --env)")
    return [{"source": source, "prompt": row.get("prompt"), "prompt_ids": [], "row": row,
             "fields": {k: v for k, v in row.items() if k != "prompt"}} for source, row in rows]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask [B, T], left-padded: generation continues from the right edge."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and scoring


@torch.no_grad()
def sample(trainer, examples: list[dict], num_samples: int = 1, greedy: bool = False, model: nn.Module | None = None,
           max_new_tokens: int | None = None) -> Rollout:
    """Each example's prompt num_samples times (samples contiguous, one prefill per prompt) from exactly
    softmax(logits / --temperature) (greedy: argmax), each reply cut after its first end-of-turn token. model:
    default trainer.hf_model() (the policy). A trainer with an environment (`trainer.env`, an Env) samples whole
    episodes instead (sample_episodes)."""
    if getattr(trainer, "env", None) is not None:
        return sample_episodes(trainer, examples, trainer.env, num_samples, greedy, max_new_tokens)
    a, tok = trainer.args, trainer.tokenizer
    model = model or trainer.hf_model()
    ids, mask = left_pad([e["prompt_ids"] for e in examples], tok.pad_token_id)
    model.eval()
    with trainer.autocast():
        completions, comp_mask, has_eos = generate(
            model, tok, ids.to(trainer.device), mask.to(trainer.device), max_new_tokens or a.max_new_tokens,
            0.0 if greedy else a.temperature, getattr(a, "top_p", 1.0), synced=trainer.fsdp, num_samples=num_samples,
            stop_ids=trainer.end_of_turn, gather=a.gather_for_generation)
    examples = [e for e in examples for _ in range(num_samples)]
    return Rollout(examples, [e["prompt_ids"] for e in examples], completions, comp_mask, comp_mask.sum(1).long(),
                   has_eos, tok.batch_decode(completions, skip_special_tokens=True))


def load_callable(spec: str, flag: str):
    """`module:function` (a reward function, an environment factory) from the working directory or the installed
    packages."""
    module, _, name = spec.partition(":")
    try:
        sys.path.insert(0, os.getcwd())
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"{flag} {spec}: cannot import ({e})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code ran: a SyntaxError, or it raised
        raise UserError(f"{flag} {spec}: importing {module} raised {first_line(e)}") from None
    if not callable(fn):
        raise UserError(f"{flag} {spec}: not callable")
    return fn


def call_reward_fn(fn, name: str, examples: list[dict], completions: list[str], device) -> torch.Tensor:
    """fn(prompts, completions, **row_fields) -> [B] floats; a wrong length, a non-finite value or an exception is
    one line (agreed across ranks: rows differ per rank). examples: {"prompt", "fields", "source"}."""
    fields = {k: [e["fields"].get(k) for e in examples] for k in {k for e in examples for k in e["fields"]}}
    error, scores = "", None
    try:
        out = fn([e["prompt"] for e in examples], completions, **fields)
        scores = torch.as_tensor(out, dtype=torch.float32, device=device)
        if scores.shape != (len(examples),):
            error = (f"--reward-fn {name}: returned shape {tuple(scores.shape)}, expected a list of "
                     f"{len(examples)} floats")
        elif not torch.isfinite(scores).all():
            bad = [e["source"] for e, s in zip(examples, scores.tolist()) if not math.isfinite(s)]
            error = f"--reward-fn {name}: returned a non-finite score for rows {bad[:8]}"
    except SystemExit as stop:  # sys.exit() in a reward function must not end the run as if it had succeeded
        error = f"--reward-fn {name}: called sys.exit({stop.code!r}) on rows {[x['source'] for x in examples][:8]}"
    except Exception as e:  # noqa: BLE001 - user code: any failure is reported as one line
        error = f"--reward-fn {name}: raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    agree_on_error(error)
    return scores


class Scorer:
    """Scores a rollout: a reward model at the token it was trained on, or else the weighted sum of reward functions
    on each sequence's final reply. -> (scores [N], {function name: its rewards [N]})."""

    def __init__(self, trainer, reward_fns: list[tuple[str, object]], weights: list[float] | None = None,
                 reward_model: nn.Module | None = None):
        self.trainer, self.fns, self.reward_model = trainer, reward_fns, reward_model
        self.weights = torch.tensor(weights or [1.0] * len(reward_fns), device=trainer.device)

    def __call__(self, ro: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env = ro.stats.get("env_reward")  # an environment's own reward wins; where it gave none, the functions score
        if env is not None and not env.isnan().any():
            return env, {}
        scores, per_fn = self._score(ro)
        return (scores if env is None else torch.where(env.isnan(), scores, env)), per_fn

    def _score(self, ro: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tr = self.trainer
        if self.reward_model is None:
            per_fn = torch.stack([call_reward_fn(fn, name, ro.examples, ro.texts, tr.device) for name, fn in self.fns],
                                 1)
            return per_fn @ self.weights, {name: col for (name, _), col in zip(self.fns, per_fn.T)}
        ids, attn = left_pad(ro.prompt_ids, tr.tokenizer.pad_token_id)
        present = torch.arange(ro.completions.shape[1], device=tr.device)[None] < ro.lengths[:, None]
        with tr.autocast():
            return reward_model_scores(self.reward_model, torch.cat([ids.to(tr.device), ro.completions], 1),
                                       torch.cat([attn.to(tr.device), present.long()], 1)), {}


def load_reward_model(trainer, path: str, policy: nn.Module) -> nn.Module:
    """--reward-model: a sequence classifier with one output that reads the policy's token ids (reward.py's export,
    or one from TRL's RewardTrainer); under FSDP on the meta device, to be sharded like the policy."""
    from transformers import AutoModelForSequenceClassification
    a = trainer.args
    rm = load_model(path, a.trust_remote_code, trainer.dist.local_rank, auto_class=AutoModelForSequenceClassification,
                    flag="--reward-model", meta=trainer.fsdp)
    if not any(x.endswith("ForSequenceClassification") for x in rm.config.architectures or []):
        raise UserError(f"--reward-model {path}: not a sequence classifier (its config says "
                        f"{rm.config.architectures}); train one with reward.py")
    reward_head(rm)  # refuses heads of several outputs
    if rm.config.vocab_size != policy.config.vocab_size:
        raise UserError(f"--reward-model {path}: vocabulary of {rm.config.vocab_size} tokens, the policy has "
                        f"{policy.config.vocab_size}: they must share a tokenizer")
    return rm


# ----------------------------------------------------------------------------------------------------------------------
# Multi-turn episodes with an environment (--env module:factory)
#
# factory(row) builds the environment of one episode from its prompt row (a dict of the row's fields), with
#     reset() -> list[dict]                the opening messages: a system message that offers the tools, the question
#     step(reply: str) -> list[dict] | None  the messages that answer an assistant turn (a tool's result, feedback), or
#                                          None: the episode is over
#     reward() -> float | None             the episode's reward; None: the reward functions score the final reply
# and optionally the ints `tool_calls` and `tool_errors`, and `metrics` (a dict of numbers: env/<name> in the log).
# Exact by construction: the ids the policy sampled are kept as they are, never decoded and tokenized again; only the
# environment's messages, with the template's glue around them, are tokenized (continuation_ids), as context.


@dataclass
class Env:
    """The environment of a multi-turn run: --env's name (for error lines), its factory, the bounds of an episode."""
    name: str
    factory: object
    max_turns: int = 4
    timeout: float = 10.0


@dataclass
class EpisodeArgs:
    """The multi-turn flags the online scripts share (grpo.py, ppo.py, online_dpo.py)."""
    env: str | None = None
    """`module:factory`: multi-turn episodes with an environment (its contract: rollout.py, README); default on the
    built-in tool task: its calculator (--dataset multiply: tasks:CalculatorEnv)"""
    max_turns: int = 4
    """--env: assistant replies per episode at most (--max-length bounds its tokens)"""
    env_timeout: float = 10.0
    """--env: seconds one environment call may take before the run stops with one line naming it"""

    def check_episode_flags(self, default_env: str | None) -> None:
        self.env = self.env or default_env
        check_flag(self, "max_turns", self.max_turns >= 1, "must be >= 1")
        check_flag(self, "env_timeout", self.env_timeout > 0, "must be > 0")


def online_examples(trainer, train_rows: list, eval_rows: list) -> tuple[list[dict], list[dict]]:
    """An online script's train and eval examples. With --env the environment opens each episode from its row
    (`trainer.env`, an Env, is set); else each prompt is tokenized and cut from the left to --max-prompt-length."""
    a = trainer.args
    trainer.env = Env(a.env, load_callable(a.env, "--env"), a.max_turns, a.env_timeout) if a.env else None
    if trainer.env:
        return env_examples(train_rows, "train"), env_examples(eval_rows, "eval")
    return tuple(prompt_examples(trainer.tokenizer, rows, a.max_prompt_length, split)
                 for rows, split in ((train_rows, "train"), (eval_rows, "eval")))


MESSAGES = "a non-empty list of {role, content} messages"


def call_env(spec: str, what: str, fn, *args, timeout: float, returns: str = MESSAGES):
    """Call environment code -> (its result, '' or one line naming --env, the call and what went wrong). returns:
    MESSAGES, MESSAGES + " or None", "a finite number or None", or "anything"."""
    try:
        with time_limit(timeout, what):
            out = fn(*args)
    except SystemExit as stop:
        return None, f"--env {spec}: {what} called sys.exit({stop.code!r})"
    except Exception as e:  # noqa: BLE001 - user code: any failure is one line
        return None, f"--env {spec}: {what} raised {first_line(e)}"
    if returns == "anything" or (out is None and returns.endswith("or None")):
        return out, ""
    if returns.startswith(MESSAGES):
        ok = isinstance(out, list) and bool(out) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in out)
    else:
        ok = isinstance(out, (int, float)) and not isinstance(out, bool) and math.isfinite(out)
    shown = repr(out)[:60] if isinstance(out, (int, float, str, list, dict)) else type(out).__name__
    return out, "" if ok else f"--env {spec}: {what} returned {shown}, expected {returns}"


def continuation_ids(tok, messages: list[dict], end_of_turn: list[int], where: str) -> list[int]:
    """The ids the chat template writes after an assistant turn's end-of-turn token: the rest of that turn's line,
    `messages`, then the next assistant turn's generation prompt. Rendered after a placeholder turn, so no earlier
    turn is ever rendered again (a template that rewrites earlier turns, as Qwen3's drops their reasoning, cannot
    change what was sampled)."""
    mark = "\ue000"
    text = render_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}] + messages,
                       where, generation_prompt=True)
    after = text[text.rindex(mark) + len(mark):]
    stop = tok.convert_ids_to_tokens(end_of_turn[0])
    if after.lstrip().startswith(stop):  # the turn end the model sampled itself
        after = after[after.index(stop) + len(stop):]
    return tok(after, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def sample_episodes(trainer, examples: list[dict], env: Env, num_samples: int = 1, greedy: bool = False,
                    max_new_tokens: int | None = None) -> Rollout:
    """Each example's episode num_samples times (contiguous): the environment opens it; then, one batch per turn for
    the live episodes, the policy samples a reply (up to its end-of-turn token) and the environment answers or ends
    it, within env.max_turns replies and --max-length tokens per episode. The completion holds every reply and the
    environment's messages between them; `mask` marks the sampled ids, the only ones a loss or metric counts; the
    stats hold the log-prob each was sampled with (`sampling_logps`)."""
    a, tok, model, spec = trainer.args, trainer.tokenizer, trainer.hf_model(), env.name
    max_new_tokens, timeout = max_new_tokens or a.max_new_tokens, env.timeout
    examples = [e for e in examples for _ in range(num_samples)]
    n, error = len(examples), ""
    envs, prompts = [], []
    for e in examples:
        one, err = call_env(spec, "factory(row)", env.factory, e["row"], timeout=timeout,
                            returns="anything") if not error else (None, "")
        opening, err = call_env(spec, "reset()", one.reset, timeout=timeout) if one and not err else (None, err)
        error = error or err
        envs.append(one)
        prompts.append(encode_prompt(tok, opening, e["source"])[-a.max_prompt_length:] if opening and not err else [])
    agree_on_error(error)
    comp, mask, logps = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
    live, ended, turns, replies = [True] * n, [False] * n, [0] * n, [""] * n
    model.eval()
    for _ in range(env.max_turns):
        idx = [i for i in range(n) if live[i]]
        if not any_rank(bool(idx), trainer.device):  # FSDP: every rank generates as often as any
            break
        ids, attn = left_pad([prompts[i] + comp[i] for i in idx] or [prompts[0]], tok.pad_token_id)
        with trainer.autocast():
            out, out_mask, has_eos, out_logps = generate(
                model, tok, ids.to(trainer.device), attn.to(trainer.device), max_new_tokens,
                0.0 if greedy else a.temperature, synced=trainer.fsdp, stop_ids=trainer.end_of_turn,
                gather=a.gather_for_generation, return_logps=True)
        for k, i in enumerate(idx):
            room = a.max_length - len(prompts[i]) - len(comp[i])
            k_len = min(int(out_mask[k].sum()), room)
            reply = out[k, :k_len].tolist()
            comp[i] += reply
            mask[i] += [1] * k_len
            logps[i] += out_logps[k, :k_len].tolist()
            turns[i] += 1
            replies[i] = tok.decode(reply, skip_special_tokens=True)
            live[i] = False
            if not has_eos[k] or k_len < int(out_mask[k].sum()):  # cut by --max-new-tokens or --max-length
                continue
            messages, err = call_env(spec, "step(reply)", envs[i].step, replies[i], timeout=timeout,
                                     returns=MESSAGES + " or None")
            error = error or err
            if err or messages is None:
                ended[i] = not err
                continue
            glue = continuation_ids(tok, messages, trainer.end_of_turn, examples[i]["source"])
            if turns[i] < env.max_turns and len(prompts[i]) + len(comp[i]) + len(glue) < a.max_length:
                comp[i] += glue
                mask[i] += [0] * len(glue)
                logps[i] += [0.0] * len(glue)
                live[i] = True
        agree_on_error(error)
    rewards = []
    for one in envs:
        r, err = call_env(spec, "reward()", one.reward, timeout=timeout, returns="a finite number or None")
        error = error or err
        rewards.append(float("nan") if r is None else float(r))
    agree_on_error(error)
    width, device = max(map(len, comp)), trainer.device
    pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)  # noqa: E731
    count = lambda name: torch.tensor([float(getattr(x, name, 0)) for x in envs], device=device)  # noqa: E731
    stats = {"turns": torch.tensor(turns, dtype=torch.float, device=device), "tool_calls": count("tool_calls"),
             "tool_errors": count("tool_errors"), "env_reward": torch.tensor(rewards, device=device),
             "sampling_logps": pad(logps, 0.0)}
    for key in sorted({k for x in envs for k in getattr(x, "metrics", {})}):
        stats[f"env/{key}"] = torch.tensor([float(getattr(x, "metrics", {}).get(key, 0.0)) for x in envs],
                                           device=device)
    return Rollout(examples, prompts, pad(comp, tok.pad_token_id), pad(mask, 0).float(),
                   torch.tensor(list(map(len, comp)), device=device), torch.tensor(ended, device=device), replies,
                   stats, [tok.decode(c) for c in comp])


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([float(flag)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def episode_metrics(ro: Rollout) -> dict:
    """turns/mean, tool_calls/mean (per episode), tool_calls/error_ratio (errors / calls, exact over the log window),
    episodes/truncated_ratio (a turn or token budget hit), env/<name>; {} for a single-turn rollout."""
    if "turns" not in ro.stats:
        return {}
    s = ro.stats
    return {"turns/mean": s["turns"].mean(), "tool_calls/mean": s["tool_calls"].mean(),
            "tool_calls/error_ratio": Mean(s["tool_errors"].sum().item(), s["tool_calls"].sum().item()),
            "episodes/truncated_ratio": (~ro.has_eos).float().mean()} | {
        k: v.mean() for k, v in s.items() if k.startswith("env/")}


# ----------------------------------------------------------------------------------------------------------------------
# The forward over prompt + completion


def model_inputs(trainer, ro: Rollout) -> tuple[dict[str, torch.Tensor], list | None]:
    """One forward's inputs for a rollout, its logits kept only where they predict a sampled token (in order):
    (--padding-free) one packed row in which a prefix the sequences share (a group's prompt) appears once, or the
    left-padded batch (environment messages between turns are context, never predicted)."""
    device, n = trainer.device, ro.completions.shape[1]
    present = torch.arange(n, device=ro.mask.device)[None] < ro.lengths[:, None]
    if trainer.args.padding_free:
        seqs = [p + c[m].tolist() for p, c, m in zip(ro.prompt_ids, ro.completions, present)]
        in_loss = [[False] * len(p) + [bool(x) for x in f[m]] for p, f, m in zip(ro.prompt_ids, ro.mask, present)]
        packed, segments = pack_for_labels(seqs, in_loss)
        return {k: v.to(device) for k, v in packed.items()}, segments
    ids, attn = left_pad(ro.prompt_ids, trainer.tokenizer.pad_token_id)
    ids, attn = ids.to(device), attn.to(device)
    input_ids = torch.cat([ids, ro.completions], 1)
    attention_mask = torch.cat([attn, present.long()], 1)
    keep = torch.zeros_like(attention_mask, dtype=torch.bool)
    keep[:, ids.shape[1] - 1:-1] = ro.mask.bool()  # position t predicts completion token t + 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "keep": keep,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}, None


def rollout_batch(trainer, ro: Rollout, rows, per_seq: dict[str, torch.Tensor] | None = None) -> Batch:
    """The sequences `rows` of a rollout as one micro-batch: the forward's inputs (model_inputs), `mask` [n, L] and
    `labels` (the sampled ids, in order), plus `per_seq`'s tensors ([N, ...] each: advantages, old log-probs, ...)
    for those rows."""
    sub = ro.select(rows)
    idx = torch.tensor(list(rows), device=ro.mask.device)
    inputs, segments = model_inputs(trainer, sub)
    tensors = inputs | {"mask": sub.mask, "labels": sub.completions[sub.mask.bool()]}
    tensors |= {k: v[idx] for k, v in (per_seq or {}).items()}
    return Batch(tensors, len(sub), sub.num_tokens(), sources=[e["source"] for e in sub.examples],
                 attention_segments=segments)


def token_logps(model: nn.Module, batch: Batch, temperature: float, entropy: bool = False):
    """[n, L] log-probs of a rollout batch's sampled tokens under softmax(logits / temperature), the distribution they
    were sampled from; 0 elsewhere. entropy=True: also that distribution's entropy at each sampled token [n, L] (no
    gradient)."""
    logits = kept_logits(model, batch.tensors, batch.attention_segments)
    logps = scatter_tokens(batch["mask"], label_logps(logits, batch["labels"], temperature))
    return (logps, scatter_tokens(batch["mask"], logits_entropy(logits, temperature))) if entropy else logps


def scatter_tokens(mask: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Values of the sampled tokens, in order [M] -> [n, L] where mask is 1, 0 elsewhere."""
    return torch.zeros(mask.shape, device=flat.device, dtype=flat.dtype).masked_scatter(mask.bool(), flat)


@torch.no_grad()
def completion_logps(trainer, model: nn.Module, ro: Rollout, temperature: float | None = None) -> torch.Tensor:
    """[N, L] token_logps of a whole rollout at --temperature (or `temperature`), no gradient (the old policy's, or
    the reference's)."""
    model.eval()
    with trainer.autocast():
        return token_logps(model, rollout_batch(trainer, ro, range(len(ro))), temperature or trainer.args.temperature)


@torch.no_grad()
def logits_entropy(logits: torch.Tensor, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row [N] (fp32, in row chunks: no [N, V] fp32 copy at once)."""
    out = []
    for s in range(0, len(logits), chunk):
        z = logits[s:s + chunk].float() / temperature
        logp = torch.log_softmax(z, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> Mean:
    """A per-token quantity as an exact mean over the sampled tokens of a whole step (micro-batches and ranks)."""
    return Mean((x * mask).sum().detach(), mask.sum())


# ----------------------------------------------------------------------------------------------------------------------
# Eval and logging


@torch.no_grad()
def evaluate_replies(trainer, examples: list[dict], batch_size: int, metrics_fn,
                     max_new_tokens: int | None = None) -> dict[str, float]:
    """Greedy replies to `examples`, split across ranks like training batches; metrics_fn(rollout) -> {name: mean
    over its sequences}. Filler batches weigh 0. -> the means over all examples."""
    window, world = MetricWindow(), trainer.dist.world_size
    batches = rank_batches(examples, batch_size, trainer.dist.rank, world)
    for mine, n_real in progress(batches, "eval", ceil_div(len(examples), batch_size * world)):
        window.add(metrics_fn(sample(trainer, mine, greedy=True, max_new_tokens=max_new_tokens)), n_real)
    return window.reduce(trainer.device, rates=False)


def log_samples(trainer, rows: list[dict]) -> None:
    """A few sampled replies of the step being made, on the console and in metrics.jsonl / wandb (every --log-every
    steps). rows: {prompt, completion, and its scores}."""
    step = trainer.global_step + 1
    if step % trainer.args.log_every == 0:
        for r in rows:
            scores = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k not in ("prompt", "completion"))
            trainer.run_log.write(f"  sample: {r['prompt']!r} -> {r['completion']!r} ({scores})")
        trainer.run_log.table(step, "samples", rows)


def first_samples(ro: Rollout, scores: torch.Tensor, k: int = 3) -> list[dict]:
    """The first k sequences as {prompt: the last user message, completion, reward} rows for log_samples."""
    prompt = lambda e: e["prompt"] if isinstance(e["prompt"], str) else e["prompt"][-1]["content"]  # noqa: E731
    return [{"prompt": prompt(e), "completion": t, "reward": s}
            for e, t, s in zip(ro.examples[:k], ro.texts, scores.tolist())]
