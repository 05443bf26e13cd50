"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306), one file.

    python kto.py                                   # bundled SmolLM2-135M-Instruct on the built-in arithmetic task
    python kto.py --dataset feedback.jsonl --beta 0.1 --desirable-weight 1.0 --undesirable-weight 1.33
    torchrun --nproc_per_node 8 kto.py --model path/to/hf_model --dataset feedback.jsonl --beta 0.1

Rows are {"prompt", "completion", "label": true/false} (unpaired feedback, TRL's format), or preference rows
{"prompt", "chosen", "rejected"}, unpaired as TRL does (chosen -> desirable, rejected -> undesirable): strings, or
chat message lists (the prompt gets the chat template).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch import nn

import tasks
from common import (Batch, BaseTrainer, LossOutput, Mean, TrainArgs, UserError, add_lora, check_flag, check_prompt,
                    check_text, check_usable_rows, collate_completions, print0, run_main, sequence_logps,
                    tokenize_completions, use_segment_attention)


@dataclass
class Args(TrainArgs):
    beta: float = 0.1
    """KL strength: rewards are beta * log(pi / pi_ref), the value function's sigmoid has slope beta"""
    desirable_weight: float = 1.0
    """lambda_D, weight of a desirable row's loss (paper eq. 8: lambda_D n_D / (lambda_U n_U) in [1, 4/3])"""
    undesirable_weight: float = 1.0
    """lambda_U, weight of an undesirable row's loss"""
    precompute_ref_logps: bool = False
    """compute reference log-probs once before training, then free the reference model (saves its memory and forward).
    Each row's mismatched KL completion is then fixed before training: its predecessor's in a seeded shuffle of all
    rows (TRL fixes them too, rotated within each batch of the file in order, which it then trains on in that order);
    without this flag each micro-batch rotates its own rows' completions (x_i with y_(i-1)), as TRL's batches do"""
    padding_free: bool = True
    """pack each micro-batch into one row, each prompt once, shared by its completion and its KL pair's (exact;
    needs a transformers model with AttentionInterface attention); --no-padding-free pads to the longest sequence"""
    batch_size: int = 8
    """unpaired rows per device per micro-batch (the KL estimate pairs each prompt with another row's completion)"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate"""
    total_steps: int = 60
    """optimizer steps (0 = run only the step-0 eval)"""
    warmup_steps: int = 5
    """linear warm-up steps of the scheduler"""
    eval_every: int = 30
    """steps between evals (0 = only at start and end)"""
    log_every: int = 5
    """steps between log lines / metrics.jsonl records"""

    def validate(self) -> None:
        super().validate()
        check_flag(self, "beta", self.beta > 0, "must be > 0")
        check_flag(self, "desirable_weight", self.desirable_weight >= 0, "must be >= 0")
        check_flag(self, "undesirable_weight", self.undesirable_weight >= 0, "must be >= 0")


def kto_loss(
    policy_logps: torch.Tensor,  # [B] log pi(y|x), summed over completion tokens
    ref_logps: torch.Tensor,  # [B] log pi_ref(y|x)
    desirable: torch.Tensor,  # [B] bool, the row's label
    z0: torch.Tensor,  # [] the reference point, KL(pi || pi_ref) estimated on mismatched pairs: detached, >= 0
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses [B] and implicit rewards beta * log(pi / pi_ref) [B] (detached).

    KTO eq. 7: L = lambda_y - v(x, y), v = lambda_D sigmoid(beta (r - z0)) for a desirable y, lambda_U sigmoid(beta
    (z0 - r)) for an undesirable one, r = log pi(y|x) / pi_ref(y|x)."""
    logratios = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - F.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - F.sigmoid(beta * (z0 - logratios))))
    return losses, beta * logratios.detach()


def with_mismatched_completions(examples: list[dict]) -> list[dict]:
    """Each row (x_i, y_i) also gets y_{i-1}, the first the last's: the mismatched pairs (x_i, y_{i-1}) that estimate
    z0 use the same completions as the rows, paired with other prompts (TRL's _get_kl_dataset)."""
    return [e | {"completions": [e["completion"], examples[i - 1]["completion"]]} for i, e in enumerate(examples)]


def with_margins(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's rewards/margins: the difference of the two classes' mean rewards."""
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        return metrics | {"rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}
    return metrics


class KTOTrainer(BaseTrainer):
    script_name = "kto"
    summary_keys = ("loss", "rewards/margins", "greedy_accuracy")
    args: Args

    def build_model(self) -> nn.Module:
        model = add_lora(super().build_model(), self.args)
        if self.args.padding_free:
            use_segment_attention(model)
        self.init_reference(model)
        return model

    def setup_data(self) -> None:
        a = self.args
        train_rows, eval_rows = tasks.load_rows(a, "preference")
        self.train_data = self._tokenize(train_rows, "train")
        self.eval_data = self._tokenize(eval_rows, "eval")
        check_usable_rows(a, self.train_data, self.eval_data, eval_rows)
        if a.batch_size * self.dist.world_size < 2:
            raise UserError("--batch-size 1: the KL estimate pairs each prompt with another row's completion of the "
                            "micro-batch, so it needs >= 2 rows (over all ranks)")
        n_d = sum(e["label"] for e in self.train_data)
        ratio = a.desirable_weight * n_d / max(a.undesirable_weight * (len(self.train_data) - n_d), 1e-9)
        if not 1 <= ratio <= 4 / 3:
            print0(f"note: {n_d} desirable, {len(self.train_data) - n_d} undesirable rows: lambda_D n_D / (lambda_U "
                   f"n_U) = {ratio:.2f}; the paper (eq. 8) recommends [1, 4/3] (--desirable-weight)")
        # fixed KL pairs for the eval rows (and with --precompute-ref-logps the training rows): each row with its
        # predecessor's completion in a seeded shuffle (a file's rows of one prompt are often adjacent); training rows
        # are otherwise paired within each micro-batch (next_batch)
        gen = torch.Generator().manual_seed(a.seed)
        shuffled = lambda data: [data[i] for i in torch.randperm(len(data), generator=gen).tolist()]  # noqa: E731
        self.eval_data = with_mismatched_completions(shuffled(self.eval_data))
        if a.precompute_ref_logps:  # [B, 2]: each row's and its KL pair's log-probs
            self.train_data = with_mismatched_completions(shuffled(self.train_data))
            self.precompute_reference(lambda ref, batch: sequence_logps(ref, batch).view(2, -1).T)

    def _tokenize(self, rows: list[tuple[str, dict]], split: str) -> list[dict]:
        out, truncated, dropped = [], 0, 0
        for source, row in rows:
            check_prompt(source, row.get("prompt"))
            if "chosen" in row or "rejected" in row:  # a preference row: two unpaired rows
                items = [("chosen", True), ("rejected", False)]
            else:
                items = [("completion", row.get("label"))]
                if not isinstance(row.get("label"), bool):
                    raise UserError(f"{source}: field 'label' must be true or false, got {row.get('label')!r}")
            for key, label in items:
                check_text(source, key, row.get(key), roles=("assistant",))
                ex, cut = tokenize_completions(self.tokenizer, row["prompt"], [row[key]], self.args.max_length,
                                               self.args.max_prompt_length, self.end_of_turn, source)
                truncated += cut and ex is not None
                dropped += ex is None
                if ex is not None:
                    out.append({"prompt": ex["prompt"], "completion": ex["completions"][0], "label": label,
                                "source": source})
        n_d = sum(e["label"] for e in out)
        print0(f"{split}: {len(out)} rows, {n_d} desirable, {len(out) - n_d} undesirable ({truncated} truncated, "
               f"{dropped} dropped: the completion would vanish within --max-length {self.args.max_length})")
        return out

    def next_batch(self) -> Batch:
        """Every rank draws the same global micro-batch and pairs it (x_i, y_{i-1}) as one process would, then takes
        its share: the KL pairs, and so z0, do not depend on the world size."""
        if self.args.precompute_ref_logps:  # pairs fixed (and scored) in setup_data
            return super().next_batch()
        rows = with_mismatched_completions([self.train_data[i] for i in self.sampler.next_indices(all_ranks=True)])
        return self.make_batch(rows[self.dist.rank::self.dist.world_size]).to(self.device)

    def make_batch(self, examples: list[dict]) -> Batch:
        """Each row's sequence, then its KL pair's ([y_1..y_B, y'_1..y'_B]) in one forward; packed, each prompt
        appears once, both completions continuing from it."""
        pairs = [(e["prompt"], e["completions"][k]) for k in (0, 1) for e in examples]
        tensors, segments = collate_completions(pairs, self.tokenizer.pad_token_id, self.args.padding_free)
        tensors["desirable"] = torch.tensor([e["label"] for e in examples])
        if "ref_logps" in examples[0]:  # precomputed: [rows..., KL pairs...]
            tensors["ref_logps"] = torch.stack([e["ref_logps"] for e in examples]).T.reshape(-1)
        # num_tokens counts every sequence's tokens (the prompt twice), as padded training would see them
        return Batch(tensors, num_samples=len(examples), num_tokens=sum(len(p) + len(c) for p, c in pairs),
                     sources=[e["source"] for e in examples], attention_segments=segments)

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        a = self.args
        policy_logps = sequence_logps(model, batch)  # [2B]
        if "ref_logps" in batch.tensors:
            ref_logps = batch["ref_logps"].to(policy_logps.dtype)
        else:
            with torch.no_grad(), self.reference() as ref:
                ref_logps = sequence_logps(ref, batch)
        pol, pol_mismatched = policy_logps.chunk(2)
        ref, ref_mismatched = ref_logps.chunk(2)
        # z0 = KL(pi || pi_ref) on the mismatched pairs of the whole micro-batch (all ranks: one all-reduce; a filler
        # eval batch counts 0), clamped at 0 and detached as in TRL
        z0 = torch.stack([(pol_mismatched - ref_mismatched).detach().sum(),
                          pol.new_tensor(len(pol_mismatched))]) * (batch.num_samples > 0)
        if dist.is_initialized():
            dist.all_reduce(z0)
        z0 = (z0[0] / z0[1].clamp(min=1)).clamp(min=0)
        desirable = batch["desirable"]
        losses, rewards = kto_loss(pol, ref, desirable, z0, a.beta, a.desirable_weight, a.undesirable_weight)
        loss = losses.mean()
        # each class's mean exactly (a micro-batch may hold no row of a class); margins: with_margins when logged
        metrics = {"loss": loss.detach(), "kl": z0}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            metrics[f"rewards/{name}"] = Mean(rewards[rows].sum(), rows.sum())
            metrics[f"logps/{name}"] = Mean(pol.detach()[rows].sum(), rows.sum())
        return LossOutput(loss, metrics)

    def log(self, metrics: dict, prefix: str) -> None:
        super().log(with_margins(metrics), prefix)

    def evaluate(self) -> dict[str, float]:
        metrics = with_margins(super().evaluate()) if self.eval_data else {}
        return metrics | tasks.greedy_eval(self)


def main(args: Args | None = None) -> KTOTrainer:
    args = args or tyro.cli(Args)
    trainer = KTOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
