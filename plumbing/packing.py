"""The packed row: the same numbers as a padded batch, with less work.

The plain path, which every piece here must equal (tests/test_packing.py checks values and gradients): each sequence
padded into a batch, one forward, `log_softmax(logits).gather(labels)` over the whole vocabulary, summed over the
completion tokens. The fast path changes only how much work that takes:

- `pack_prefix_tree`: a micro-batch becomes ONE row laid out as a token trie, so every prefix that sequences share is
  computed once: a DPO prompt serves its chosen and rejected completion, a GRPO prompt its G completions, a chat
  template's system prompt every PPO episode (prefix sharing, Wang et al. 2024, https://arxiv.org/abs/2410.20305).
  It is exact: each token sees exactly its own sequence's context, at its own position id, and a shared prefix's
  gradient is the sum of its branches', as with copies. No padding either.
- `segment_attention` (registered with transformers' `AttentionInterface`): each trie node attends its ancestors and
  itself, so attention costs about the sum of the segments' squared lengths, not the row's; sibling nodes (a
  prompt's completions) share one sdpa call per layer, each masked to its own branch. Anything the
  model's attention does that it does not implement (sliding windows shorter than a sequence, softcapping, sinks,
  recurrent layers) is refused with a pointer to `--no-padding-free`, never ignored. Forwards without segments
  (generation) fall through to plain sdpa. On CUDA the whole row is ONE compiled FlexAttention call per layer
  (`flex_segment_attention`, a block mask from the same segments: blocks no query sees are skipped).
- `kept_logits` (logprobs.py): the LM head runs only on positions that predict a completion token (transformers'
  boolean `logits_to_keep`): a [tokens x vocab] matrix is the largest activation of a small model.
- `label_logps` (logprobs.py): `logit[label] - logsumexp(logits)` in row chunks with a hand-written backward (softmax
  - onehot), so no fp32 [tokens x vocab] log-softmax is materialised or saved for backward; a sampling temperature is
  applied inside the fp32 part (bf16 logits / T would be rounded before the log-softmax).

What each piece buys is measured in benchmarks/README.md.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from plumbing.run import UserError

PACKED_ATTENTION = "segment_sdpa"
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_segment_calls = 0


def use_segment_attention(model: nn.Module) -> None:
    """Route the model's attention through segment_attention: forwards given `attn_segments` attend within their
    segments, all others (generation) run plain sdpa."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    layer_types = set(getattr(getattr(model, "config", None), "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:  # recurrent / linear-attention layers carry state
        raise UserError(f"--padding-free: this model has {sorted(layer_types)} layers; only attention layers can be "
                        f"packed with shared prefixes; run with --no-padding-free")
    AttentionInterface.register(PACKED_ATTENTION, segment_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except ValueError as e:  # e.g. a model without sdpa support
        raise UserError(f"--padding-free: {str(e).splitlines()[0]}; run with --no-padding-free") from None


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, attn_segments=None,
                      **kwargs):
    """Attention of a packed row, one sdpa call per group of sibling segments. query [1, H, L, D], key/value
    [1, H_kv, L, D].

    attn_segments: (q_start, q_end, kv_spans) blocks covering the row in order; the queries attend the concatenated
    kv_spans causally, aligned at the end (query i sees keys up to i + len(kv) - len(q)). Every kv span is itself a
    block (pack_prefix_tree: a trie node's ancestors, then the node)."""
    global _segment_calls
    if attn_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # transformers applies these through the mask (which is not used here) or extra terms: refuse, never ignore
    window = kwargs.get("sliding_window")
    longest = max(sum(b - a for a, b in spans) for _, _, spans in attn_segments)
    unsupported = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
    unsupported += [f"sliding_window={window}"] if window is not None and longest > window else []
    if unsupported:
        raise UserError(f"--padding-free: this model's attention uses {unsupported}, which packed attention does not "
                        f"implement; run with --no-padding-free")
    _segment_calls += 1
    if query.is_cuda and dropout == 0.0:  # one fused kernel per layer; CPU: the sdpa calls below (flex has no CPU
        # backward)
        return flex_segment_attention(query, key, value, attn_segments, scaling).transpose(1, 2).contiguous(), None
    n_rep, sizes = query.shape[1] // key.shape[1], [q1 - q0 for q0, q1, _ in attn_segments]
    # CPU under bf16 autocast: the fp32 flash kernel's backward is faster than the bf16 one there, and attention is a
    # small share of the FLOPs; outside autocast, which would cast it back. RoPE already hands over fp32 q and k.
    fp32 = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if fp32:
        query, key, value = query.float(), key.float(), value.float()
        backends = torch.autocast("cpu", enabled=False)
    elif query.is_cuda:  # cuDNN's sdpa (PyTorch's first choice for bf16 on sm90+) builds a graph per new shape, and
        backends = sdpa_kernel(NOT_CUDNN)  # every segment is one; flash / mem-efficient kernels take any shape
    else:
        backends = contextlib.nullcontext()
    with backends:
        # split, not slice: the backward of each slice would allocate and zero a row-sized gradient, the backward of
        # one split concatenates the pieces' gradients once
        qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
        out = [None] * len(attn_segments)
        for members, ancestors, mask in _sibling_plan(attn_segments, query.device):
            q = torch.cat([qs[i] for i in members], dim=2) if len(members) > 1 else qs[members[0]]
            k, v = (torch.cat([p[j] for j in ancestors + members], dim=2) if len(ancestors) + len(members) > 1
                    else p[members[0]] for p in (ks, vs))
            gqa = n_rep > 1
            if gqa and mask is not None and query.is_cuda:  # CUDA's fused kernels take a mask or GQA, not both
                k, v, gqa = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1), False
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                               scale=scaling, enable_gqa=gqa)
            for i, piece in zip(members, o.split([sizes[i] for i in members], dim=2) if len(members) > 1 else [o]):
                out[i] = piece
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None  # [1, L, H, D], as transformers expects


FLEX_BLOCK = 128  # FlexAttention's block size: rows are padded to a multiple of it (few distinct compiled shapes)
_flex_mask: tuple = (None, None)
_compiled_flex = None


def segment_mask_mod(segments: list, length: int, device):
    """FlexAttention's mask_mod for a packed row padded to `length`: query q sees key k iff k's segment is q's own
    (then causally, k <= q) or one of its ancestors: exactly the rule of segment_attention's sdpa calls. Padding is
    one more segment that sees only itself (no query row is fully masked); its outputs are dropped."""
    index = {(q0, q1): i for i, (q0, q1, _) in enumerate(segments)}
    pad = len(segments)
    seg = torch.full((length,), pad, dtype=torch.long)
    sees = torch.zeros(pad + 1, pad + 1, dtype=torch.bool)
    sees[pad, pad] = True
    for i, (q0, q1, spans) in enumerate(segments):
        seg[q0:q1] = i
        sees[i, [index[s] for s in spans]] = True  # the spans: the ancestors, then the segment itself
    seg, sees = seg.to(device), sees.to(device)

    def mask_mod(b, h, q, k):
        return sees[seg[q], seg[k]] & ((seg[q] != seg[k]) | (k <= q))
    return mask_mod


def flex_segment_attention(query, key, value, segments: list, scaling: float | None = None,
                           compiled: bool | None = None) -> torch.Tensor:
    """Attention of a packed row in ONE FlexAttention call: query [1, H, L, D], key/value [1, H_kv, L, D] ->
    [1, H, L, D]. The block mask is built once per forward (every layer gets the same segments); blocks that no query
    of a segment can see are skipped by the kernel. compiled (default: on CUDA) runs the Triton kernel; eager
    (CPU, tests) computes the same values densely."""
    global _flex_mask, _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = query.is_cuda if compiled is None else compiled
    n = query.shape[2]
    length = -(-n // FLEX_BLOCK) * FLEX_BLOCK
    if _flex_mask[0] is not segments:
        mask_mod = segment_mask_mod(segments, length, query.device)
        _flex_mask = (segments, create_block_mask(mask_mod, None, None, length, length, device=query.device,
                                                  _compile=compiled))
    pad = (0, 0, 0, length - n)
    q, k, v = (F.pad(t, pad) for t in (query, key.to(query.dtype), value.to(query.dtype)))
    if compiled and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    attend = _compiled_flex if compiled else flex_attention
    out = attend(q, k, v, block_mask=_flex_mask[1], scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :n]


_plan: tuple = (None, None)
SIBLING_QUERIES = 256


def _sibling_plan(segments: list, device) -> list[tuple[list[int], list[int], torch.Tensor | None]]:
    """Segments with the same ancestors (a prompt's completions) attend in ONE sdpa call: their queries side by side,
    each masked to the ancestors and, causally, itself. -> (members, ancestors (segment indices), mask or None for
    plain causal). Many short siblings (GRPO's G completions) otherwise cost one call each per layer; long ones (SFT
    rows under a shared system prompt) keep their own call. Built once per forward: every layer gets the same
    segments."""
    global _plan
    if _plan[0] is segments:
        return _plan[1]
    size = [q1 - q0 for q0, q1, _ in segments]
    piece = {(q0, q1): i for i, (q0, q1, _) in enumerate(segments)}
    siblings: dict[tuple, list[int]] = {}
    for i, (_, _, spans) in enumerate(segments):
        siblings.setdefault(tuple(spans[:-1]), []).append(i)
    plan = []
    for spans, members in siblings.items():
        ancestors = [piece[s] for s in spans]
        groups = [[]]  # at most SIBLING_QUERIES queries per call: masked-out cross-sibling blocks grow quadratically
        for i in members:
            if groups[-1] and sum(size[j] for j in groups[-1]) + size[i] > SIBLING_QUERIES:
                groups.append([])
            groups[-1].append(i)
        for group in groups:
            mask = None  # a lone segment without ancestors: plain causal
            if ancestors or len(group) > 1:  # all of the ancestors, then each sibling causally within itself
                own = torch.block_diag(*[torch.ones(size[i], size[i], dtype=torch.bool).tril_() for i in group])
                anc = torch.ones(len(own), sum(size[j] for j in ancestors), dtype=torch.bool)
                mask = torch.cat([anc, own], dim=1).to(device)
            plan.append((group, ancestors, mask))
    _plan = (segments, plan)
    return plan


def pack_prefix_tree(seqs: list[list[int]], predict_from: list[int]) -> tuple[dict[str, torch.Tensor], list]:
    """Pack token sequences into one row in which every shared prefix appears once (a token trie, depth first).

    -> tensors {input_ids, position_ids [1, T]; keep [1, T]: positions whose logits are needed; logit_index: for each
    sequence i and token k >= predict_from[i], in order, the row among the kept logits that predicts it} and the
    attention segments for segment_attention (each trie node attends its ancestors and itself)."""
    if any(not 1 <= p <= len(s) for s, p in zip(seqs, predict_from)):
        raise ValueError("every sequence needs 1 <= predict_from <= len: token 0 has nothing to be predicted from")
    ids, pos, segments = [], [], []
    where = [[0] * len(s) for s in seqs]  # where[i][k]: packed position of token k of sequence i
    stack = [(list(range(len(seqs))), 0, [])]  # (sequences sharing tokens [0, depth), depth, ancestors' spans)
    while stack:
        group, depth, spans = stack.pop()
        first, end, run = seqs[group[0]], min(len(seqs[i]) for i in group), depth
        while run < end and all(seqs[i][run] == first[run] for i in group):
            run += 1
        if run > depth:
            start = len(ids)
            ids += first[depth:run]
            pos += range(depth, run)
            spans = spans + [(start, len(ids))]
            segments.append((start, len(ids), spans))
            for i in group:
                where[i][depth:run] = range(start, len(ids))
        children: dict[int, list[int]] = {}
        for i in group:
            if len(seqs[i]) > run:
                children.setdefault(seqs[i][run], []).append(i)
        stack += [(g, run, spans) for g in reversed(children.values())]
    predicting = [where[i][k - 1] for i, s in enumerate(seqs) for k in range(predict_from[i], len(s))]
    keep = torch.zeros(1, len(ids), dtype=torch.bool)
    keep[0, predicting] = True
    row_of = keep[0].cumsum(0) - 1  # a kept position's row among the kept logits
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "keep": keep,
            "logit_index": row_of[predicting]}, segments


def segment_forward(model: nn.Module, segments: list, **inputs):
    """model(**inputs) on a packed row; fails loudly if the segments never reached the attention layers (a model
    whose attention ignores forward kwargs would silently attend across segments)."""
    before = _segment_calls
    out = model(**inputs, attn_segments=segments)
    if _segment_calls == before:
        raise UserError("--padding-free: this model's attention layers do not receive forward kwargs (transformers' "
                        "AttentionInterface); run with --no-padding-free")
    return out


