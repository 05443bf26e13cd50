"""Rollouts for the online algorithms (ppo.py, grpo.py): prompts, sampling, truncation after the end of a turn, and
calling the user's reward functions. What an RL researcher changes lives here.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import time

import torch
from torch import nn

from common import (UserError, agree_on_error, base_of, check_text, end_of_turn_ids, fsdp_generation, print0,
                    supports_logits_to_keep)
from packing import encode_prompt

# PPO and GRPO refuse --top-p < 1 with this (and generate() switches off a generation config's top_k): the policy
# gradient and the KL are taken on the distribution that was sampled, and a truncated one makes the log-probs of the
# current and reference policy -inf wherever their own nucleus leaves the sampled token out
TOP_P_OFF_POLICY = ("must be 1: the log-probs, ratios and KL use the full softmax(logits / T), so sampling from a "
                    "nucleus would make every update off-policy; lower --temperature instead")


def prompt_examples(tok, rows: list[tuple[str, dict]], max_prompt_length: int, split: str) -> list[dict]:
    """Prompt rows (ppo.py, grpo.py) -> {loc, prompt_ids (cut from the left), prompt, fields for the reward fn}."""
    out, truncated = [], 0
    for loc, row in rows:
        check_text(loc, "prompt", row.get("prompt"))
        ids = encode_prompt(tok, row["prompt"], loc)
        truncated += len(ids) > max_prompt_length
        out.append({"loc": loc, "prompt_ids": ids[-max_prompt_length:], "prompt": row["prompt"],
                    "fields": {k: v for k, v in row.items() if k != "prompt"}})
    print0(f"{split}: {len(out)} prompts ({truncated} cut from the left to --max-prompt-length)")
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask [B, T], left-padded: generation continues from the right edge."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@torch.no_grad()
def generate(model: nn.Module, tok, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, synced: bool = False, num_samples: int = 1,
             stop_ids: list[int] | None = None, gather: bool = False):
    """Sample from exactly softmax(logits / temperature) (nucleus top_p if < 1), or greedy with temperature 0.
    Every other logits processor a model's generation_config may carry (repetition_penalty, min_p, top_k, ...) is
    off: the policy-gradient log-probs assume this distribution. A reply ends at the first of `stop_ids` (default:
    common.end_of_turn_ids of the tokenizer). num_samples > 1: each prompt is sampled that many times (rows in
    groups, as repeat_interleave) from ONE prefill, its KV cache copied per sample (HF's num_return_sequences would
    prefill every copy). Under FSDP one unit is gathered at a time, or the whole model once with gather=True
    (common.fsdp_generation). -> truncate_after_eos(responses)."""
    with fsdp_generation(model, gather):
        return _generate(model, tok, input_ids, attention_mask, max_new_tokens, temperature, top_p, synced, num_samples,
                         stop_ids or end_of_turn_ids(tok))


def _generate(model, tok, input_ids, attention_mask, max_new_tokens, temperature, top_p, synced, num_samples,
              stop_ids):
    from transformers import GenerationConfig
    kw = {}
    if num_samples > 1:
        if input_ids.shape[1] > 1:  # the prompt but its last token; generate's first step feeds that one and samples
            ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers left-padded rows
            # its logits are not used: generate recomputes them
            last_only = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
            kw["cache"] = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                **last_only).cache
            kw["cache"].batch_repeat_interleave(num_samples)
        input_ids, attention_mask = (t.repeat_interleave(num_samples, 0) for t in (input_ids, attention_mask))
    # greedy decoding over scores in which only the sampled token survives: sampling is CategoricalSampler's
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=stop_ids)
    sampler = [CategoricalSampler(temperature, top_p)] if temperature > 0 else []
    owner = base_of(model)
    saved, owner.generation_config = owner.generation_config, GenerationConfig()  # the model's own fills no gaps
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=sampler, synced_gpus=synced, **kw)
    finally:
        owner.generation_config = saved
    return truncate_after_eos(out[:, input_ids.shape[1]:], stop_ids, tok.pad_token_id)


class CategoricalSampler:
    """A logits processor that draws the next token from softmax(scores / temperature) (restricted to the nucleus
    when top_p < 1, as transformers' TopPLogitsWarper) by inverse CDF, and returns scores whose argmax is that token.
    One uniform per row: torch.multinomial draws one exponential per vocabulary entry, which is slow on CPU."""

    def __init__(self, temperature: float, top_p: float = 1.0):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # [B, V]
        if self.top_p < 1:  # the nucleus: most likely first, until the mass before a token reaches top_p
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # the most likely token always stays
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        cdf = probs.cumsum(dim=-1)
        u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # [B, 1]; never p = 0
        return torch.full_like(scores, -math.inf).scatter_(-1, token, 0.0)


def truncate_after_eos(responses: torch.Tensor, stop_ids: int | list[int], pad_id: int):
    """Keep tokens up to and including the first end-of-turn token (any of stop_ids); later tokens become pad.
    -> (responses, mask [B, L] float, has_eos [B]: the reply ended by itself)."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, device=responses.device))
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), responses.shape[1])
    mask = torch.arange(responses.shape[1], device=responses.device)[None] <= first[:, None]
    return responses.masked_fill(~mask, pad_id), mask.float(), has_eos


def load_reward_fn(spec: str):
    """`module:function` from the working directory or the installed packages."""
    module, _, name = spec.partition(":")
    try:
        sys.path.insert(0, os.getcwd())
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"--reward-fn {spec}: cannot import ({e})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code ran: a SyntaxError, or it raised
        raise UserError(f"--reward-fn {spec}: importing {module} raised {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if not callable(fn):
        raise UserError(f"--reward-fn {spec}: not callable")
    return fn


def call_reward_fn(fn, name: str, examples: list[dict], completions: list[str], device) -> torch.Tensor:
    """fn(prompts, completions, **row_fields) -> [B] floats; a wrong length, a non-finite value or an exception is
    one line (agreed across ranks: rows differ per rank). examples: {"prompt", "fields", "loc"}."""
    fields = {k: [e["fields"].get(k) for e in examples] for k in {k for e in examples for k in e["fields"]}}
    error, scores = "", None
    try:
        out = fn([e["prompt"] for e in examples], completions, **fields)
        scores = torch.as_tensor(out, dtype=torch.float32, device=device)
        if scores.shape != (len(examples),):
            error = (f"--reward-fn {name}: returned shape {tuple(scores.shape)}, expected a list of "
                     f"{len(examples)} floats")
        elif not torch.isfinite(scores).all():
            bad = [e["loc"] for e, s in zip(examples, scores.tolist()) if not math.isfinite(s)]
            error = f"--reward-fn {name}: returned a non-finite score for rows {bad[:8]}"
    except SystemExit as stop:  # sys.exit() in a reward function must not end the run as if it had succeeded
        error = f"--reward-fn {name}: called sys.exit({stop.code!r}) on rows {[x['loc'] for x in examples][:8]}"
    except Exception as e:  # noqa: BLE001 - user code: any failure is reported as one line
        error = f"--reward-fn {name}: raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    agree_on_error(error)
    return scores


def stopwatch(device: torch.device):
    """Each call returns the seconds since the previous one (CUDA work finished first): ppo.py's and grpo.py's
    per-phase times."""
    last = time.perf_counter()

    def lap() -> float:
        nonlocal last
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, last = now - last, now
        return elapsed
    return lap
