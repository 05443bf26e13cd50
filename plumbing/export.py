"""The final model in HF format, streamed: output_dir/final holds what `save_pretrained` of the one-process model
writes (safetensors shards, their index when there are several, config, generation config, tokenizer; under LoRA the
merged model and final/adapter), but no process ever holds the whole model.

Rank 0 writes the safetensors files itself, one tensor at a time: every rank gathers that tensor (an all-gather of
its FSDP shards, the only collective), rank 0 writes its bytes and drops it. A LoRA weight is merged as it is
gathered (W + scale B A, peft's own formula, local to the tensor). The layout (tensor names, tied weights once, shard
boundaries, the index, each file's header) is planned up front from shapes alone with transformers' and
huggingface_hub's own rules, so it equals save_pretrained's. Why not "each rank writes its part, then consolidate"
(torch DCP's HuggingFaceStorageWriter): its consolidation also runs in one process, reading every shard back and
writing the model a second time, and its files differ from save_pretrained's (names, header metadata, ties).

final/ appears atomically: written as final.tmp/, fsynced, renamed. A full disk is one line naming final.tmp (exit
2), the partial directory removed, an earlier final/ intact. Leftovers of a killed export (final.tmp/, and the
final.old-*/ a kill between the two renames of a re-export leaves) are cleared by the next export.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from plumbing.checkpoint import fsync, write_failure
from plumbing.models import quiet_peft
from plumbing.run import UserError, agree_on_error, first_error, print0

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def export_final(output_dir: Path, hf_model: nn.Module, tokenizer, is_main: bool, say=print0,
                 eos_token_ids: list[int] | None = None, max_shard_size: int | str | None = None) -> None:
    """Write output_dir/final: AutoModelForCausalLM (or the model's own class).from_pretrained(output_dir/final).
    `hf_model` is the HF model (or peft model) to export, live: sharded (FSDP2 DTensors) or whole. Every rank calls
    this (the gathers are collectives). eos_token_ids: the run's end-of-turn ids, written as the generation config's
    eos_token_id so that `generate` stops where training did. max_shard_size: as save_pretrained's; default
    $CLEANRL_RLHF_MAX_SHARD_SIZE, else save_pretrained's own default (50GB)."""
    max_shard_size = max_shard_size or os.environ.get("CLEANRL_RLHF_MAX_SHARD_SIZE", "50GB")
    final = Path(output_dir) / "final"
    tmp = final.with_name("final.tmp")
    plan = ExportPlan(hf_model, max_shard_size)  # shapes only: no collective, nothing gathered
    error = ""
    if is_main:
        try:
            clear_leftovers(final)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = write_failure("export failed:", tmp, e)
    if not (error := first_error(error)):
        error = plan.write_weights(tmp, is_main)
    if not error and plan.peft:
        error = _write_adapter(tmp / "adapter", hf_model, is_main)
    if is_main and not error:
        try:
            _write_configs(tmp, plan.base, tokenizer, eos_token_ids)
            for f in tmp.rglob("*"):
                if f.is_file():
                    fsync(f)
            swap_in(tmp, final)
            say(f"exported {final}")
        except Exception as e:  # noqa: BLE001 - tokenizers and json report a full disk in their own types
            error = write_failure("export failed:", tmp, e)
    if error and is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    agree_on_error(error)


def clear_leftovers(final: Path) -> None:
    """Before an export: a final.tmp/ is a killed export's (incomplete: removed). A final.old-*/ is a complete
    earlier export that a kill between swap_in's two renames left aside: it goes back to final/ if there is none
    (the older state stays until the new one is complete), else it is removed."""
    olds = sorted((p for p in final.parent.glob("final.old*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
    for p in [*olds, final.with_name("final.tmp")]:
        shutil.rmtree(p, ignore_errors=True)


def swap_in(tmp: Path, final: Path) -> None:
    """tmp/ becomes final/; an earlier final/ (a resumed run that ran on) is renamed aside first, under a name no
    other export uses, then removed."""
    old = final.with_name(f"final.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# What is written: the tensors save_pretrained would write, planned from shapes


@dataclass
class Source:
    """One tensor of the export and where its values come from."""
    tensor: torch.Tensor  # the live parameter or buffer: a DTensor (one rank's rows) under FSDP
    lora: tuple | None = None  # (A, B, scaling, transpose): the value is W + transpose(B @ A) * scaling
    parameter: bool = True


class ExportPlan:
    """The export's tensors in save_pretrained's order and names: the model's state dict; under LoRA the merged
    model's (each adapted weight merged, adapters and the frozen copies of modules_to_save dropped); each tied weight
    once, under the name from_pretrained expects; transformers' weight conversions reverted (MoE experts), one
    decoder layer at a time. Then its shards (huggingface_hub's split, as save_pretrained) and each file's layout."""

    def __init__(self, hf_model: nn.Module, max_shard_size: int | str):
        from huggingface_hub.serialization import split_state_dict_into_shards_factory
        from huggingface_hub.serialization._torch import get_torch_storage_size
        self.peft = hasattr(hf_model, "peft_config")
        self.base = hf_model.get_base_model() if self.peft else hf_model
        sources = _merged_sources(self.base, hf_model.active_adapter) if self.peft else _plain_sources(self.base)
        sources = _drop_tied(sources, self.base)
        self.total_parameters = sum(s.tensor.numel() for s in {id(s.tensor): s for s in sources.values()}.values()
                                    if s.parameter)
        meta = {k: _meta(s.tensor) for k, s in sources.items()}
        # groups of source keys whose outputs are computed together; outputs: out key -> its group
        self.groups, self.outputs, out_meta, self.converted = _conversion_groups(self.base, meta)
        self.sources = sources
        self.group_outputs: dict[tuple, list[str]] = {g: [] for g in self.groups}
        for o, g in self.outputs.items():
            self.group_outputs[g].append(o)
        # huggingface_hub's split, as save_pretrained calls it (split_torch_state_dict_into_shards), on meta tensors:
        # outputs that are views of one converted tensor share its storage, as the real ones do
        self.split = split_state_dict_into_shards_factory(
            out_meta, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
            get_storage_size=get_torch_storage_size,
            get_storage_id=lambda t: (t.untyped_storage()._cdata, get_torch_storage_size(t)))
        self.out_meta = out_meta
        dtensor = next((s.tensor for s in sources.values() if _is_dtensor(s.tensor)), None)
        self.sharded = dtensor is not None  # FSDP: every rank gathers each tensor, and checks for a failed write
        self.device = dtensor.device_mesh.device_type if self.sharded else "cpu"

    def write_weights(self, tmp: Path, is_main: bool) -> str:
        """Stream the weights into tmp/: rank 0 writes, every rank gathers. -> '' or the error every rank agrees
        on (a failed write stops every rank at the same tensor)."""
        if not self.sharded and not is_main:  # whole on every rank (one process, DDP): rank 0 alone reads them
            return first_error("")
        error, pending = "", {}  # pending: a group's computed outputs not written yet
        delay = float(os.environ.get("CLEANRL_RLHF_TEST_EXPORT_DELAY", 0))
        for filename, keys in self.split.filename_to_tensors.items():
            order = sorted(keys, key=lambda k: (-self.out_meta[k].element_size(), k))  # safetensors' data order
            f = None
            if is_main and not error:
                try:
                    f = open(tmp / filename, "wb")
                    f.write(_header([(k, self.out_meta[k]) for k in order]))
                except OSError as e:
                    error = write_failure("export failed:", tmp, e)
            try:
                for key in order:
                    if self._stop(error):
                        break
                    if key not in pending:
                        pending |= self._compute(self.outputs[key], keep=f is not None)
                    value = pending.pop(key)
                    if f is not None and not error:
                        try:
                            f.write(_tensor_bytes(value, self.out_meta[key]))
                        except OSError as e:
                            error = write_failure("export failed:", tmp, e)
                    del value
                    if delay:  # test hook: widen the window for a signal or a kill mid-export, once
                        time.sleep(delay)
                        delay = 0.0
            finally:
                if f is not None:
                    try:
                        f.close()  # flushes: a full disk may show only here
                    except OSError as e:
                        error = error or write_failure("export failed:", tmp, e)
            if self._stop(error):
                break
        if is_main and not error and self.split.is_sharded:
            index = {"metadata": {"total_parameters": self.total_parameters, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            try:
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            except OSError as e:
                error = write_failure("export failed:", tmp, e)
        return first_error(error)

    def _stop(self, error: str) -> bool:
        """Whether any rank failed (a collective under FSDP, so that all stop gathering at the same tensor)."""
        if not (self.sharded and dist.is_initialized()):
            return bool(error)
        flag = torch.tensor([float(bool(error))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def _compute(self, group: tuple[str, ...], keep: bool) -> dict[str, torch.Tensor | None]:
        """The output tensors of one group of sources (one tensor, or a decoder layer under a weight conversion),
        whole, on the CPU; keep=False (a rank that does not write): gathered for the collective, then dropped."""
        state = {k: _value(self.sources[k]) for k in group}
        if not keep:
            return dict.fromkeys(self.group_outputs[group])
        if self.converted:
            from transformers.core_model_loading import revert_weight_conversion
            state = revert_weight_conversion(self.base, state)
        return {k: v.cpu().contiguous() for k, v in state.items()}


def _plain_sources(base: nn.Module) -> dict[str, Source]:
    params = {id(p) for p in base.parameters()}
    return {k: Source(t, parameter=id(t) in params) for k, t in base.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor)}


def _merged_sources(base: nn.Module, adapter: str) -> dict[str, Source]:
    """The state dict of peft's merge_and_unload() of `base` (a model with LoRA layers injected), named and ordered as
    it would be, each value a Source: the adapted weights carry their adapter, merged when computed."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import layer as lora_layers
    from peft.utils import ModulesToSaveWrapper
    modules = dict(base.named_modules())
    params = {id(p) for p in base.parameters()}
    out = {}
    for key, t in base.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):  # a module's extra state: not a weight
            continue
        parts = key.split(".")
        # the innermost LoRA layer or modules_to_save wrapper holding this entry, if any
        owner = next((i for i in range(len(parts) - 1, 0, -1)
                      if isinstance(modules.get(".".join(parts[:i])), (LoraLayer, ModulesToSaveWrapper))), None)
        if owner is None:
            out[key] = Source(t, parameter=id(t) in params)
            continue
        module, prefix, rest = modules[".".join(parts[:owner])], parts[:owner], parts[owner:]
        if isinstance(module, ModulesToSaveWrapper):  # the trained copy replaces the original
            if rest[:2] == ["modules_to_save", adapter]:
                out[".".join(prefix + rest[2:])] = Source(t, parameter=id(t) in params)
            continue
        if rest[0] != "base_layer":  # lora_A, lora_B, ...: merged into the base weight below
            continue
        name = ".".join(prefix + rest[1:])
        lora = None
        if rest[1:] == ["weight"] and adapter in module.scaling:
            variant = getattr(module, "lora_variant", {}).get(adapter) or module.use_dora.get(adapter)
            if variant or getattr(module, "lora_bias", {}).get(adapter):
                raise UserError(f"export: {name} has a LoRA variant (DoRA, ...) or a LoRA bias, which this export "
                                f"cannot merge")
            if isinstance(module, lora_layers.Linear):
                lora = (module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter],
                        module.fan_in_fan_out)
            elif isinstance(module, lora_layers.Embedding):
                lora = (module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], module.scaling[adapter],
                        True)
            else:
                raise UserError(f"export: {name} is a LoRA {type(module).__name__}, which this export cannot merge "
                                f"(Linear and Embedding only)")
        out[name] = Source(t, lora, parameter=id(t) in params)
    return out


def _drop_tied(sources: dict[str, Source], base: nn.Module) -> dict[str, Source]:
    """Each tied weight once, as transformers' remove_tied_weights_from_state_dict keeps it: of the names sharing a
    tensor, those the model declares tied (its `_tied_weights_keys`, e.g. lm_head.weight) go, in sorted order, until
    one is left."""
    from transformers.modeling_utils import _get_tied_weight_keys
    patterns = _get_tied_weight_keys(base)
    shared: dict[int, list[str]] = {}
    for k, s in sources.items():
        shared.setdefault(id(s.tensor), []).append(k)
    drop = set()
    for names in (n for n in shared.values() if len(n) > 1):
        tied = [n for n in sorted(names) if any(re.search(p, n) for p in patterns)]
        kept = [n for n in names if n not in tied[:len(names) - 1]]
        drop |= set(names) - set(kept[:1])
    return {k: s for k, s in sources.items() if k not in drop}


def _conversion_groups(base: nn.Module, meta: dict[str, torch.Tensor]):
    """transformers reverts its load-time weight conversions on save (renamings; an MoE's fused experts back to one
    tensor per expert), planned here on meta tensors. -> (groups of source keys computed together, output key -> its
    group, the output meta state dict in save_pretrained's order, whether anything is reverted). Each tensor is its
    own group unless a conversion merges or splits tensors: then each decoder layer is one (conversions stay within
    one)."""
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
    whole = dict(meta)
    out_meta = revert_weight_conversion(base, whole)
    if out_meta is whole:  # nothing to revert. A model from from_pretrained (the one-process run's) records the
        # conversions it used, none here, and is saved in this order: one built on the meta device (FSDP) records none
        out_meta = {k: meta[k] for k in sorted(meta, key=dot_natural_key)}
        return [(k,) for k in meta], {k: (k,) for k in out_meta}, out_meta, False
    try:
        each = {k: revert_weight_conversion(base, {k: meta[k]}) for k in meta}
    except Exception:  # noqa: BLE001 - a conversion that needs several tensors at once
        each = {}
    if each and all(len(o) == 1 for o in each.values()) and {o for d in each.values() for o in d} == set(out_meta):
        renamed = {next(iter(each[k])): (k,) for k in meta}  # renamings only (none, from from_pretrained)
        return [(k,) for k in meta], renamed, out_meta, any(o != g[0] for o, g in renamed.items())
    layers = {n for m in base.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    units = {name for name, m in base.named_modules() if type(m).__name__ in layers}
    by_unit: dict[str, list[str]] = {}
    for k in meta:
        parts = k.split(".")
        unit = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in units), "")
        by_unit.setdefault(unit, []).append(k)
    groups, outputs = [tuple(ks) for ks in by_unit.values()], {}
    for g in groups:
        for k in revert_weight_conversion(base, {k: meta[k] for k in g}):
            outputs[k] = g
    if set(outputs) != set(out_meta):
        raise UserError(f"export: {type(base).__name__}'s weight conversion spans decoder layers; this export "
                        f"cannot stream it")
    return groups, outputs, out_meta, True


# ----------------------------------------------------------------------------------------------------------------------
# Values and bytes


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")  # a DTensor's shape is the global one


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather of a DTensor's shards (a collective), else the tensor itself."""
    t = t.detach()
    return t.full_tensor() if _is_dtensor(t) else t


def _value(s: Source) -> torch.Tensor:
    w = _full(s.tensor)
    if s.lora is not None:  # peft's merge: weight += transpose(B @ A, fan_in_fan_out) * scaling
        a, b, scaling, transpose = s.lora
        delta = _full(b) @ _full(a)
        delta = (delta.T if transpose else delta) * scaling
        w = w + delta
    return w


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _header(tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """A safetensors header for `tensors` (meta), in this data order, with save_pretrained's metadata, as the
    safetensors library writes it (compact JSON padded with spaces to 8 bytes)."""
    head, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"export: {key} has dtype {t.dtype}, which this export cannot write")
        n = t.numel() * t.element_size()
        head[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor, meta: torch.Tensor) -> memoryview:
    if t.shape != meta.shape or t.dtype != meta.dtype:
        raise RuntimeError(f"export: computed {tuple(t.shape)} {t.dtype}, planned {tuple(meta.shape)} {meta.dtype}")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # little-endian, as safetensors


# ----------------------------------------------------------------------------------------------------------------------
# The rest of final/: the adapter, configs, tokenizer


def _write_adapter(path: Path, peft_model: nn.Module, is_main: bool) -> str:
    """final/adapter: the adapter alone (PeftModel.from_pretrained), as peft's save_pretrained writes it, from the
    entries peft itself picks (gathered one at a time: adapters are small)."""
    from peft.utils import get_peft_model_state_dict
    state = peft_model.state_dict(keep_vars=True)
    picked = {id(v) for v in get_peft_model_state_dict(peft_model, state_dict=state).values()}
    with torch.no_grad():
        adapter = {k: _full(v).cpu() for k, v in state.items() if id(v) in picked}
    error = ""
    if is_main:
        try:
            with quiet_peft():
                peft_model.save_pretrained(path, state_dict=adapter)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk in its own type
            error = write_failure("export failed:", path.parent, e)
    return first_error(error)


def _write_configs(tmp: Path, base: nn.Module, tokenizer, eos_token_ids: list[int] | None) -> None:
    """config.json and generation_config.json as save_pretrained writes them (the dtype, the architecture without
    FSDP2's class prefix, remote code), the generation config stopping at the run's end-of-turn ids; the tokenizer."""
    config = copy.deepcopy(base.config)
    config.dtype = str(base.dtype).split(".")[1]
    config.architectures = [type(base).__name__.removeprefix("FSDP")]
    if base.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save
        custom_object_save(base, tmp, config=config)
    config.save_pretrained(tmp)
    if base.can_generate():
        generation = copy.deepcopy(base.generation_config)
        if eos_token_ids:
            generation.eos_token_id = list(eos_token_ids) if len(eos_token_ids) > 1 else eos_token_ids[0]
        generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
