"""Log-probs of completions: the LM head only where a logit predicts a completion token, `logit[label] - logsumexp`
in row chunks with a hand-written backward, and the collation of (prompt, completion) sequences both read."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from plumbing.models import supports_logits_to_keep
from plumbing.packing import pack_prefix_tree, segment_forward

def kept_logits(model: nn.Module, t: dict[str, torch.Tensor], segments: list | None = None) -> torch.Tensor:
    """[N, V] logits from one forward, the LM head run only where t["keep"] is True; rows reordered / repeated by
    t["logit_index"] when given (a packed row, where one position can predict tokens of several sequences)."""
    inputs = {k: t[k] for k in ("input_ids", "position_ids", "attention_mask") if t.get(k) is not None}
    forward = model if segments is None else partial(segment_forward, model, segments)
    if supports_logits_to_keep(model):
        logits = forward(**inputs, logits_to_keep=t["keep"], use_cache=False).logits
    else:  # models without a boolean logits_to_keep: full logits, then the kept positions
        logits = forward(**inputs, use_cache=False).logits[t["keep"]]
    logits = logits.reshape(-1, logits.shape[-1])
    return logits if t.get("logit_index") is None else logits.index_select(0, t["logit_index"])


def label_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                chunk: int | None = None) -> torch.Tensor:
    """log_softmax(logits / temperature)[label] per row; logits [N, V], labels [N] -> [N] fp32. Rows per chunk:
    on a CPU few enough that a chunk's fp32 passes stay in cache, on a GPU many (fewer kernel launches)."""
    chunk = chunk or (32 if logits.device.type == "cpu" else 1024)
    return _LabelLogProb.apply(logits, labels, temperature, chunk)


class _LabelLogProb(torch.autograd.Function):
    """label logit - logsumexp, in row chunks, with a hand-written backward ((onehot - softmax) / T), so no [N, V]
    fp32 log_softmax is ever materialised or saved for backward: only the (possibly bf16) logits and N logsumexps."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for s in range(0, logits.shape[0], chunk):
            block = _scaled_fp32(logits[s:s + chunk], temperature)
            lse[s:s + chunk] = torch.logsumexp(block, dim=-1)
            picked[s:s + chunk] = block.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk, ctx.temperature = chunk, temperature
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out, t = torch.empty_like(logits), ctx.temperature
        for s in range(0, logits.shape[0], ctx.chunk):
            g = grad[s:s + ctx.chunk, None].float() / t
            block = _scaled_fp32(logits[s:s + ctx.chunk], t).sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g)
            block.scatter_add_(-1, labels[s:s + ctx.chunk, None], g)
            out[s:s + ctx.chunk] = block
        return out, None, None, None


def _scaled_fp32(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of a logits block / temperature, for the in-place passes that follow."""
    block = block.float() if block.dtype != torch.float32 else block.clone()
    return block if temperature == 1.0 else block.div_(temperature)


def collate_completions(pairs: list[tuple[list[int], list[int]]], pad_id: int,
                        padding_free: bool) -> tuple[dict[str, torch.Tensor], list | None]:
    """(prompt ids, completion ids) per sequence -> one forward's tensors and, packed, the attention segments. The keys
    `sequence_logps` reads: `keep` marks the positions whose logits predict a completion token (only there does the
    LM head run); `logit_index` (packed) maps each completion token, in sequence order, to its row among the kept
    logits (a prompt's last position predicts the first token of every completion of that prompt); `labels` are the
    completion tokens, `seq_index` the sequence of each, `lengths` each sequence's completion length.

    padding_free: one row in which each prompt (and any prefix sequences share) appears once, every completion
    continuing from it (`pack_prefix_tree`). Else a right-padded [N, L] batch."""
    seqs, n_prompt = [p + c for p, c in pairs], [len(p) for p, _ in pairs]
    segments = None
    if padding_free:
        tensors, segments = pack_prefix_tree(seqs, n_prompt)
    else:
        width = max(map(len, seqs))
        tensors = {"input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs]),
                   "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                   "keep": torch.tensor([[False] * (p - 1) + [True] * (len(s) - p) + [False] * (width - len(s) + 1)
                                         for s, p in zip(seqs, n_prompt)])}
    tensors |= {"labels": torch.tensor([t for _, c in pairs for t in c]),
                "seq_index": torch.cat([torch.full((len(c),), i) for i, (_, c) in enumerate(pairs)]),
                "lengths": torch.tensor([len(c) for _, c in pairs])}
    return tensors, segments


def pack_for_labels(seqs: list[list[int]], in_loss: list[list[bool]]) -> tuple[dict[str, torch.Tensor], list]:
    """One packed row (pack_prefix_tree) whose kept logits predict exactly the tokens marked in `in_loss`, in sequence
    order (SFT's assistant turns between user turns; a multi-turn episode's sampled tokens between the environment's
    messages). A sequence's token 0 is never marked: nothing predicts it."""
    first = [m.index(True) if True in m else len(m) for m in in_loss]
    tensors, segments = pack_prefix_tree(seqs, first)
    # the packed position predicting each token k >= the sequence's first marked token, in order; keep the marked
    positions = tensors["keep"][0].nonzero()[:, 0][tensors["logit_index"]]
    positions = positions[torch.tensor([x for m, f in zip(in_loss, first) for x in m[f:]], dtype=torch.bool)]
    keep = torch.zeros_like(tensors["keep"])
    keep[0, positions] = True
    tensors["keep"], tensors["logit_index"] = keep, (keep[0].cumsum(0) - 1)[positions]
    return tensors, segments


def sequence_logps(model: nn.Module, batch, average: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """[N] log-probs of each sequence's completion (summed; average=True: per completion token) from one forward, the
    LM head run only where a logit predicts a completion token. Reads the keys `collate_completions` writes."""
    token_logps = label_logps(kept_logits(model, batch.tensors, batch.attention_segments), batch["labels"], temperature)
    logps = torch.zeros(len(batch["lengths"]), device=token_logps.device).index_add_(0, batch["seq_index"], token_logps)
    return logps / batch["lengths"] if average else logps
