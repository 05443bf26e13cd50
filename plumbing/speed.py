"""Tricks that change no number, each beside the plain path it must equal (the tests check both; the gain of each is in
benchmarks/README.md, "The speed tricks and what each saves")."""
from __future__ import annotations

import os
import sys

import torch
from torch import nn


def scale_and_clip(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, scale: float,
                   fsdp: bool) -> torch.Tensor:
    """Scale the synced gradients by `scale`, then clip them to max_grad_norm (0: no clipping); -> the norm of the
    scaled gradients. With fused AdamW (not under FSDP) both ride in its grad_scale (clip_in_fused_adamw), else the
    plain path: a pass over the gradients, then clip_grad_norm_."""
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    if optimizer.defaults.get("fused") and not fsdp:
        return clip_in_fused_adamw(model, optimizer, max_norm, scale)
    if scale != 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor


def clip_in_fused_adamw(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                        scale: float = 1.0) -> torch.Tensor:
    """= scale the gradients by `scale`, then torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), without
    either pass over the gradients: fused AdamW divides every gradient by its `grad_scale` as it reads them, so the
    scale and the clip factor ride there. -> the norm of the scaled gradients."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]) * scale
    optimizer.grad_scale = (grad_norm + 1e-6).div(max_norm).clamp(min=1.0) / scale
    return grad_norm


def sparse_tied_embeddings(model: nn.Module) -> None:
    """An input embedding tied to the LM head gets the few rows it looked up added into the head's dense gradient,
    not a vocab-sized zero-filled one of its own. One process without FSDP: DDP buckets a sparse embedding's
    gradient apart, FSDP reduce-scatters dense shards."""
    from transformers import PreTrainedModel
    for m in (m for m in model.modules() if isinstance(m, PreTrainedModel)):
        emb, head = m.get_input_embeddings(), m.get_output_embeddings()
        tied = isinstance(emb, nn.Embedding) and head is not None and emb.weight is getattr(head, "weight", None)
        if tied and emb.weight.requires_grad and not emb.sparse:
            emb.sparse = True
            # a backward that did not reach the head leaves the sparse part alone: fused AdamW needs it dense
            emb.weight.register_post_accumulate_grad_hook(_densify)


def _densify(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        p.grad = p.grad.to_dense()


# ----------------------------------------------------------------------------------------------------------------------
# The CPU heap (glibc's malloc). Kept by default on CPU: glibc returns big freed blocks to the OS and every step page-
# faults them back in, zero-filled. Under FSDP big blocks go back at once. A kept heap that keeps growing (ragged
# shapes fragment it, as GRPO's groups can) gets glibc's own policy back, once.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_heap = {"policy": "default", "steps": 0, "warm_rss": 0}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator alone
        return None


def choose_heap(device: torch.device, fsdp: bool) -> None:
    """At the start of a run, on CPU: under FSDP, blocks of 1 MiB or more are mapped and given back to the OS when
    freed (glibc's default raises that threshold to the largest block freed so far, after which gathered layers land
    in heaps that are never given back: a whole model's size per rank over an eval); otherwise freed memory stays."""
    libc = _libc()
    if device.type != "cpu" or libc is None:
        return
    if fsdp:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    else:
        libc.mallopt(_M_MMAP_MAX, 0), libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _heap.update(policy="kept", steps=0, warm_rss=0)


def watch_heap(warm_steps: int = 3, growth: float = 1.5) -> None:
    """After each step: with a kept heap, the resident memory after `warm_steps` steps is the measure; once it grows
    past `growth` times that (by 1 GB at least), glibc's own policy comes back and the heap is trimmed."""
    if _heap["policy"] != "kept":
        return
    _heap["steps"] += 1
    rss = _resident_bytes()
    if _heap["steps"] == warm_steps:
        _heap["warm_rss"] = rss
    elif _heap["warm_rss"] and rss > max(growth * _heap["warm_rss"], _heap["warm_rss"] + 2**30):
        libc = _libc()
        libc.mallopt(_M_MMAP_MAX, 65536), libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024), libc.malloc_trim(0)
        _heap["policy"] = "default"


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
