"""DDP and FSDP2: wrapping, filling meta-device models shard by shard from the checkpoint files, gathering for
generation, skipping gradient syncs inside an accumulation, and the memory plan printed at start."""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from plumbing.models import base_of
from plumbing.run import DistInfo, agree_on_error, first_line, print0
from plumbing.speed import sparse_tied_embeddings


def place_models(model: nn.Module, frozen: list[nn.Module], dist_info: DistInfo, fsdp: bool, precision: str,
                 gradient_checkpointing: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Put the trained model and the frozen ones (a reference, a teacher, a reward model) where they run: on the
    device, DDP-wrapped, or FSDP2-sharded (then each rank reads its own rows of every tensor from the files).
    gradient_checkpointing: the HF model to recompute activations in. -> (the wrapped model, the memory plan)."""
    if not fsdp:
        model.to(dist_info.device)
    if gradient_checkpointing is not None:
        gradient_checkpointing.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # DDP or FSDP2 in place, before the optimizer: FSDP2 swaps parameters for DTensors
    wrapped = shard_model(model, dist_info, precision) if fsdp else wrap_ddp(model, dist_info)
    for f in frozen:  # FSDP: sharded like the trained model, never given gradients
        shard_model(f, dist_info, precision) if fsdp else f.to(dist_info.device)
    if fsdp:
        fill_meta_shards([model, *frozen], dist_info.device)
    if dist_info.world_size == 1 and not fsdp:
        sparse_tied_embeddings(model)
    return wrapped, print_memory_plan(model, frozen, dist_info, "fsdp" if fsdp else "ddp", precision)


def wrap_ddp(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """DDP without buffer broadcasts, so eval forwards need no collectives (the bare model on one process)."""
    if dist_info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # torch >= 2.13 renames broadcast_buffers (a FutureWarning per rank); its init-time sync is harmless here: every
    # rank builds identical buffers from the same seed
    no_sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
               **{no_sync_kw: False})


def shard_model(model: nn.Module, dist_info: DistInfo, precision: str) -> nn.Module:
    """FSDP2 on each decoder layer, then on the roots: the modules whose forward is called (each gathers its own
    parameters). A model that says which (`model.fsdp_roots()`) gets those; an HF model is its own root; any other
    wrapper gets one root per child (PPO's ActorCritic: the policy alone can generate)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import PreTrainedModel
    kw = {"mesh": init_device_mesh(dist_info.device.type, (dist_info.world_size,))}  # a CPU mesh on gloo
    if precision == "bf16" and dist_info.device.type == "cuda":  # bf16 compute/all-gather, fp32 reduce
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layer_names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for m in model.modules():
        if type(m).__name__ in layer_names:
            fully_shard(m, **kw)
    # a peft model's root is the HF model inside: peft's generate calls that one directly (a peft wrapper as root
    # would never gather the embedding there), and its forward reaches it through __call__ too
    unwrap = lambda m: m.get_base_model() if hasattr(m, "get_base_model") else m
    if hasattr(model, "fsdp_roots"):
        roots = model.fsdp_roots()
    else:  # tied weights live inside one child, so they stay in one unit
        inner = unwrap(model)
        roots = [inner] if isinstance(inner, PreTrainedModel) else [unwrap(c) for c in model.children()]
    for root in roots:  # roots too are freed after forward: a frozen model never runs backward, and the policy's
        fully_shard(root, reshard_after_forward=True, **kw)  # root would stay whole beside its reference's
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def fsdp_generation(model: nn.Module, gather: bool = False):
    """Generation under FSDP2. Default: as in training, every unit (each decoder layer, and the root: embeddings,
    head, final norm) is all-gathered for its forward and freed right after (shard_model), at every decoding step, so
    at most one unit is whole at a time. gather=True (--gather-for-generation, as TRL's ds3_gather_for_generation):
    the whole model is gathered once and kept for the whole generation, one all-gather per unit instead of one per
    unit and token, for a whole model's memory on every rank."""
    units = fsdp_units(model) if gather else []
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.set_reshard_after_forward(True, recurse=False)
            u.reshard()


@contextlib.contextmanager
def no_sync(wrapped: nn.Module):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) for a micro-batch that is not the last of its
    update."""
    if hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
        return
    units = fsdp_units(wrapped)
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


# ----------------------------------------------------------------------------------------------------------------------
# Meta-device models filled shard by shard


def _safetensors_index(path: str) -> dict[str, str]:
    """checkpoint key -> its safetensors file, for a model directory or hub id; {} without safetensors files. A file
    the index names that is missing raises (FileNotFoundError), as from_pretrained would."""
    from safetensors import safe_open
    from transformers.utils import cached_file
    quiet = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    index = cached_file(path, "model.safetensors.index.json", **quiet)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {f: cached_file(path, f, **quiet) for f in set(weight_map.values())}
        missing = sorted(f for f, found in files.items() if not found)
        if missing:
            raise FileNotFoundError(f"{missing[0]}, named in model.safetensors.index.json, is missing")
        return {k: files[f] for k, f in weight_map.items()}
    single = cached_file(path, "model.safetensors", **quiet)
    if not single:
        return {}
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def fill_meta_shards(models: list[nn.Module], device: torch.device) -> None:
    """Give every meta parameter of FSDP-sharded models (load_model(meta=True), deep copies included) its values:
    each rank reads only its own rows of each tensor from the checkpoint's safetensors files, one tensor at a time.
    Parameters that are already real (LoRA adapters, new heads: seeded as on one process) keep theirs. A checkpoint
    without safetensors, or whose keys transformers renames on load, is loaded whole by each rank once instead.
    Damaged or missing files are one line naming the flag and the file, agreed by every rank."""
    holders: dict[int, list] = {}  # a parameter -> (module, name, key, source) of every module holding it (tied)
    for model in models:
        for module in model.modules():
            source, keys = getattr(module, "_checkpoint", (None, {}))
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    holders.setdefault(id(p), []).append((module, name, keys.get(name), source))
    error, indexes, whole = "", {}, {}  # whole: the fallback, source -> full state dict, loaded once
    current = None  # the source being read: the error names its flag and path (--model, --teacher, ...)
    try:
        for found in holders.values():
            for _, _, _, source in found:
                if source is not None and source not in indexes:
                    current = source
                    indexes[source] = _safetensors_index(source[0])
        for found in holders.values():
            current = next((s for _, _, _, s in found if s is not None), current)
            _fill_one(found, indexes, whole, device)
    except Exception as e:  # noqa: BLE001 - safetensors (SafetensorError), torch.load, pickle: their own types
        error = f"{current[3]} {current[0]}: could not load its weights ({first_line(e)})" if current else \
            f"could not load the model's weights ({first_line(e)})"
    agree_on_error(error)


def _fill_one(found: list, indexes: dict, whole: dict, device: torch.device) -> None:
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    module, name = found[0][:2]
    p = module._parameters[name]
    key, source = next(((k, s) for _, _, k, s in found if k in indexes.get(s, {})), found[0][2:])
    if source is None:
        raise RuntimeError(f"{type(module).__name__}.{name}: a meta parameter that is in no checkpoint")
    path = source[0]
    local_shape = p.to_local().shape if isinstance(p, DTensor) else p.shape
    # FSDP2 shards dim 0 as torch.chunk does: rank r holds rows [r * ceil(n / W), ...)
    rows = -(-p.shape[0] // dist.get_world_size()) if isinstance(p, DTensor) and p.dim() else 0
    start = min(dist.get_rank() * rows, p.shape[0]) if rows else 0
    if key in indexes[source]:
        with safe_open(indexes[source][key], "pt") as f:  # opened per tensor: mapped pages are let go at once
            value = f.get_slice(key)[start:start + local_shape[0]] if rows else f.get_tensor(key)
    else:
        if source not in whole:
            print0(f"note: {path} has no safetensors file with the model's keys ({key}, ...); each rank loads it "
                   f"whole once")
            whole[source] = source[1].from_pretrained(path, dtype=torch.float32,
                                                      trust_remote_code=source[2]).state_dict()
        value = whole[source][key][start:start + local_shape[0]] if rows else whole[source][key]
    # a fresh copy: a safetensors slice can be a view of the mapped file, which would stay mapped (and resident)
    local = torch.empty(local_shape, dtype=p.dtype, device=device)
    if value.shape != local_shape:
        raise RuntimeError(f"{key}: read {tuple(value.shape)} for a shard of {tuple(local_shape)}")
    local.copy_(value)
    del value
    if isinstance(p, DTensor):
        local = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    new = nn.Parameter(local, requires_grad=p.requires_grad)
    for module, name, _, _ in found:  # FSDP2 picks the new tensor up at its lazy init (reset_sharded_param)
        module._parameters[name] = new


# ----------------------------------------------------------------------------------------------------------------------
# The memory plan


def memory_plan(num_params: int, trainable: int, world_size: int, strategy: str, precision: str,
                frozen: list[tuple[int, int]] = (), largest_unit: int = 0,
                largest_frozen_unit: int = 0) -> dict[str, float]:
    """Bytes of model state per rank (activations not counted): fp32 parameters; fp32 gradients and AdamW's two fp32
    moments of the trainable ones (DDP: twice the gradients, its buckets); each frozen model (a reference, a teacher,
    a reward model: `frozen` holds (parameters, input-embedding parameters) of each) in fp32, or under bf16 without
    FSDP with its Linear weights in bf16 (models.frozen_copy). FSDP divides all of that by the ranks and adds the
    largest unit gathered whole: the all-gather's buffer and the parameters copied out of it (a trained unit in
    backward also its gradient and the reduce-scatter's buffer).
    -> {parameters, gradients, adamw, reference, gathered, per_rank, all_ranks}."""
    shards = world_size if strategy == "fsdp" else 1
    buckets = 2 if strategy == "ddp" and world_size > 1 else 1  # DDP all-reduces through a copy of the gradients
    plan = {"parameters": 4.0 * num_params / shards, "gradients": 4.0 * buckets * trainable / shards,
            "adamw": 8.0 * trainable / shards, "reference": 0.0, "gathered": 0.0}
    for n, embedding in frozen:
        plan["reference"] += (4 * embedding + 2 * (n - embedding) if precision == "bf16" and shards == 1
                              else 4 * n) / shards
    if shards > 1:
        plan["gathered"] = max(4.0 * largest_unit * (3 if trainable else 2), 4.0 * largest_frozen_unit * 2)
    plan["per_rank"] = sum(plan.values())
    plan["all_ranks"] = plan["per_rank"] * world_size
    return plan


def _sizes(model: nn.Module) -> tuple[int, int, int, int]:
    """(parameters, trainable, input-embedding parameters, the largest FSDP unit's own parameters)."""
    params = {id(p): p for p in model.parameters()}.values()
    units = fsdp_units(model)
    unit_sizes = [sum(p.numel() for p in {id(p): p for p in u.parameters()}.values()) for u in units]
    # a unit's own parameters: its total minus those of the units nested in it (FSDP2 gathers them separately)
    own = [size - sum(s for v, s in zip(units, unit_sizes) if v is not u and any(v is m for m in u.modules()))
           for u, size in zip(units, unit_sizes)]
    base = base_of(model)
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
            embedding.weight.numel() if embedding is not None else 0, max(own, default=0))


def print_memory_plan(model: nn.Module, frozen: list[nn.Module], dist_info: DistInfo, strategy: str,
                      precision: str) -> dict[str, float]:
    """memory_plan for this run, one line on rank 0 (parameter counts of sharded tensors are the global ones)."""
    n, trainable, _, unit = _sizes(model)
    frozen_sizes = [_sizes(f) for f in frozen]
    plan = memory_plan(n, trainable, dist_info.world_size, strategy, precision, [(s[0], s[2]) for s in frozen_sizes],
                       unit, max((s[3] for s in frozen_sizes), default=0))
    g = {k: f"{v / 1e9:.2f} GB" for k, v in plan.items()}
    run = f"{strategy} x{dist_info.world_size}" if dist.is_initialized() else "one process"
    print0(f"memory plan per rank ({run}, {precision}, activations not counted): "
           f"parameters {g['parameters']} + gradients {g['gradients']} + AdamW {g['adamw']} + frozen models "
           f"{g['reference']} + largest unit gathered {g['gathered']} = {g['per_rank']} (all ranks {g['all_ranks']})")
    return plan
