"""Sampling: exactly softmax(logits / T) (or greedy), each prompt's samples from one prefill, replies cut after the
first end-of-turn token. No other logits processor of a model's generation config applies."""
from __future__ import annotations

import math

import torch
from torch import nn

from plumbing.models import base_of, end_of_turn_ids, supports_logits_to_keep
from plumbing.sharding import fsdp_generation


@torch.no_grad()
def generate(model: nn.Module, tok, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, synced: bool = False, num_samples: int = 1,
             stop_ids: list[int] | None = None, gather: bool = False, return_logps: bool = False):
    """Sample from exactly softmax(logits / temperature) (nucleus top_p if < 1), or greedy with temperature 0.
    Every other logits processor a model's generation_config may carry (repetition_penalty, min_p, top_k, ...) is
    off: the policy-gradient log-probs assume this distribution. A reply ends at the first of `stop_ids` (default:
    models.end_of_turn_ids of the tokenizer). num_samples > 1: each prompt is sampled that many times (rows in
    groups, as repeat_interleave) from ONE prefill, its KV cache copied per sample (HF's num_return_sequences would
    prefill every copy). Under FSDP one unit is gathered at a time, or the whole model once with gather=True
    (sharding.fsdp_generation). -> truncate_after_eos(responses), and with return_logps (temperature > 0) the log-prob
    under which each token was sampled [B, L] (0 after the reply)."""
    with fsdp_generation(model, gather):
        return _generate(model, tok, input_ids, attention_mask, max_new_tokens, temperature, top_p, synced, num_samples,
                         stop_ids or end_of_turn_ids(tok), return_logps)


def _generate(model, tok, input_ids, attention_mask, max_new_tokens, temperature, top_p, synced, num_samples,
              stop_ids, return_logps):
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
    sampler = [CategoricalSampler(temperature, top_p, record=return_logps)] if temperature > 0 else []
    owner = base_of(model)
    saved, owner.generation_config = owner.generation_config, GenerationConfig()  # the model's own fills no gaps
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=sampler, synced_gpus=synced, **kw)
    finally:
        owner.generation_config = saved
    responses, mask, has_eos = truncate_after_eos(out[:, input_ids.shape[1]:], stop_ids, tok.pad_token_id)
    if not return_logps:
        return responses, mask, has_eos
    logps = torch.stack(sampler[0].logps, 1) if sampler and sampler[0].logps else torch.zeros_like(mask)
    return responses, mask, has_eos, logps[:, :mask.shape[1]] * mask


class CategoricalSampler:
    """A logits processor that draws the next token from softmax(scores / temperature) (restricted to the nucleus
    when top_p < 1, as transformers' TopPLogitsWarper) by inverse CDF, and returns scores whose argmax is that token.
    One uniform per row: torch.multinomial draws one exponential per vocabulary entry, which is slow on CPU.
    record: keep log softmax(scores / temperature) at each drawn token (`logps`, one [B] per step), the distribution
    the token came from, to check a later forward against it."""

    def __init__(self, temperature: float, top_p: float = 1.0, record: bool = False):
        self.temperature, self.top_p, self.logps = temperature, top_p, [] if record else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float() / self.temperature
        probs = torch.softmax(z, dim=-1)  # [B, V]
        if self.top_p < 1:  # the nucleus: most likely first, until the mass before a token reaches top_p
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # the most likely token always stays
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        cdf = probs.cumsum(dim=-1)
        u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # [B, 1]; never p = 0
        if self.logps is not None:
            self.logps.append((z.gather(-1, token) - torch.logsumexp(z, -1, keepdim=True))[:, 0])
        return torch.full_like(scores, -math.inf).scatter_(-1, token, 0.0)


def truncate_after_eos(responses: torch.Tensor, stop_ids: int | list[int], pad_id: int):
    """Keep tokens up to and including the first end-of-turn token (any of stop_ids); later tokens become pad.
    -> (responses, mask [B, L] float, has_eos [B]: the reply ended by itself)."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, device=responses.device))
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), responses.shape[1])
    mask = torch.arange(responses.shape[1], device=responses.device)[None] <= first[:, None]
    return responses.masked_fill(~mask, pad_id), mask.float(), has_eos
