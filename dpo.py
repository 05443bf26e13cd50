"""Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), one file.

    python dpo.py                                   # bundled SmolLM2-135M-Instruct on the built-in arithmetic task
    python dpo.py --dataset ../shared/data/hh_harmless_test.jsonl --beta 0.1 --max-length 256
    python dpo.py --loss-type simpo --beta 2.0 --simpo-gamma 1.0   # SimPO: no reference model
    python dpo.py --loss-type orpo --beta 0.1                      # ORPO: no reference model, beta is its lambda
    torchrun --nproc_per_node 8 dpo.py --model path/to/hf_model --dataset prefs.jsonl --beta 0.1

Rows are {"prompt", "chosen", "rejected"}: strings, or chat message lists (the prompt gets the chat template).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
import tyro
from torch import nn

import tasks
from common import (Batch, BaseTrainer, LossOutput, TrainArgs, UserError, add_lora, check_flag, check_prompt,
                    check_text, check_usable_rows, collate_completions, print0, run_main, sequence_logps,
                    tokenize_completions, use_segment_attention)


class LossType(StrEnum):
    sigmoid = "sigmoid"  # DPO, eq. 7 of the paper (with label_smoothing: conservative DPO, cDPO)
    ipo = "ipo"  # Azar et al. 2023, eq. 17, on length-averaged log-probs
    hinge = "hinge"  # SLiC (Zhao et al. 2023), hinge on the reward margin
    robust = "robust"  # Chowdhury et al. 2024, unbiased under label noise rate = label_smoothing
    simpo = "simpo"  # Meng et al. 2024, length-normalised reward beta * avg log pi, target margin gamma; no reference
    orpo = "orpo"  # Hong et al. 2024, NLL on chosen + lambda (= beta) x log odds ratio; no reference

    @property
    def needs_reference(self) -> bool:
        """SimPO and ORPO are defined on the policy alone: no reference model is built."""
        return self not in (LossType.simpo, LossType.orpo)

    @property
    def length_averaged(self) -> bool:
        """dpo_loss gets log-probs averaged over completion tokens (as its paper defines it), else summed."""
        return self in (LossType.ipo, LossType.simpo, LossType.orpo)

    @property
    def smoothable(self) -> bool:
        """A logistic loss that --label-smoothing mixes with its flipped-label version."""
        return self in (LossType.sigmoid, LossType.robust, LossType.simpo)


@dataclass
class Args(TrainArgs):
    beta: float = 0.1
    """KL strength: rewards are beta * log(pi / pi_ref); for IPO it is tau (the target margin is 1 / (2 beta)); for
    SimPO the reward scale (the paper uses 2-2.5); for ORPO the weight lambda of the odds-ratio term (TRL's name)"""
    loss_type: LossType = LossType.sigmoid
    """sigmoid (DPO), ipo, hinge, robust, simpo, orpo. IPO, SimPO and ORPO read length-averaged log-probs, and so do
    their logged rewards/* (TRL's IPO logs summed ones). ORPO's NLL is the mean over the chosen completion's tokens
    (the paper's L_SFT; TRL and the official code average it over prompt and completion, so one lambda weighs
    differently)"""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (TRL's name and default)"""
    label_smoothing: float = 0.0
    """assumed probability that a preference label is flipped (cDPO / robust DPO / SimPO); 0 = plain DPO"""
    rpo_alpha: float = 0.0
    """weight of an NLL loss on the chosen completion (RPO, Pang et al. 2024); 0 = off"""
    reference_free: bool = False
    """use a uniform reference (log pi_ref = 0): no reference model at all (always so for simpo and orpo)"""
    precompute_ref_logps: bool = False
    """compute reference log-probs once before training, then free the reference model (saves its memory and forward)"""
    padding_free: bool = True
    """pack each micro-batch into one row, each prompt once, shared by its chosen and rejected completion (exact).
    --no-padding-free pads to the longest sequence (for models whose attention transformers cannot route)"""
    learning_rate: float = 1e-5
    """peak AdamW learning rate"""
    total_steps: int = 60
    """optimizer steps (0 = run only the step-0 eval)"""
    warmup_steps: int = 5
    """linear warm-up steps of the scheduler"""
    eval_every: int = 20
    """steps between evals (0 = only at start and end)"""
    log_every: int = 5
    """steps between log lines / metrics.jsonl records"""

    def validate(self) -> None:
        super().validate()
        self.loss_type = LossType(self.loss_type)  # a plain string when built in code
        check_flag(self, "beta", self.beta > 0, "must be > 0")
        check_flag(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)")
        check_flag(self, "rpo_alpha", self.rpo_alpha >= 0, "must be >= 0")
        check_flag(self, "simpo_gamma", True, "must be finite")
        if self.label_smoothing and not self.loss_type.smoothable:
            raise UserError(f"--label-smoothing applies to --loss-type sigmoid, robust or simpo, not {self.loss_type}")
        if self.rpo_alpha and self.loss_type == LossType.orpo:
            raise UserError("--rpo-alpha: --loss-type orpo has its own NLL term on the chosen completion")

    @property
    def uses_reference(self) -> bool:
        return self.loss_type.needs_reference and not self.reference_free


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] log pi(y_w|x), summed over completion tokens (length_averaged: averaged)
    policy_rejected_logps: torch.Tensor,  # [B] log pi(y_l|x)
    ref_chosen_logps: torch.Tensor,  # [B] log pi_ref(y_w|x) (simpo / orpo: zeros, their losses ignore it)
    ref_rejected_logps: torch.Tensor,  # [B] log pi_ref(y_l|x)
    beta: float,
    loss_type: LossType | str = LossType.sigmoid,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and implicit rewards beta * log(pi / pi_ref) for chosen and rejected [B] (detached)."""
    # h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l): the implicit reward margin divided by beta
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    loss_type = LossType(loss_type)
    if loss_type == LossType.sigmoid:
        # DPO eq. 7: -log sigmoid(beta h); cDPO mixes in the flipped label with probability eps
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss_type == LossType.robust:
        # rDPO eq. 5: ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps), unbiased for label-flip rate eps
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  + label_smoothing * F.logsigmoid(-beta * logits)) / (1 - 2 * label_smoothing)
    elif loss_type == LossType.hinge:
        losses = torch.relu(1 - beta * logits)
    elif loss_type == LossType.ipo:
        # IPO eq. 17: (h - 1/(2 tau))^2, h on length-averaged log-probs (as the IPO authors confirmed)
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == LossType.simpo:
        # SimPO eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), label smoothing as TRL
        z = beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == LossType.orpo:
        # ORPO eqs. 4-7: L_SFT + lambda L_OR, L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)), odds = P / (1 - P)
        # with P = exp(mean token log-prob); L_SFT = -mean token log-prob of y_w; log(1 - P) = log(-expm1(log P)),
        # log P clamped just below 0 there: a completion the model is certain of (log P = 0.0) keeps finite gradients
        log1m = lambda lp: torch.log(-torch.expm1(lp.clamp(max=-1e-6)))  # noqa: E731
        log_odds = (policy_chosen_logps - log1m(policy_chosen_logps)) - (policy_rejected_logps
                                                                          - log1m(policy_rejected_logps))
        losses = -policy_chosen_logps - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(loss_type)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


class DPOTrainer(BaseTrainer):
    script_name = "dpo"
    summary_keys = ("loss", "rewards/accuracies", "rewards/margins", "greedy_accuracy")
    args: Args

    def build_model(self) -> nn.Module:
        model = add_lora(super().build_model(), self.args)
        if self.args.padding_free:
            use_segment_attention(model)
        if self.args.uses_reference:
            self.init_reference(model)
        return model

    def setup_data(self) -> None:
        a = self.args
        train_rows, eval_rows = tasks.load_rows(a, "preference")
        self.train_data = self._tokenize(train_rows, "train")
        self.eval_data = self._tokenize(eval_rows, "eval")
        check_usable_rows(a, self.train_data, self.eval_data, eval_rows)
        if a.precompute_ref_logps and a.uses_reference:  # [B, 2]: each pair's chosen and rejected log-probs
            self.precompute_reference(lambda ref, batch: sequence_logps(ref, batch).view(2, -1).T)

    def _tokenize(self, rows: list[tuple[str, dict]], split: str) -> list[dict]:
        out, truncated, dropped = [], 0, 0
        for source, row in rows:
            check_prompt(source, row.get("prompt"))
            for key in ("chosen", "rejected"):
                check_text(source, key, row.get(key), roles=("assistant",))
            ex, cut = tokenize_completions(self.tokenizer, row["prompt"], [row["chosen"], row["rejected"]],
                                           self.args.max_length, self.args.max_prompt_length, self.end_of_turn, source)
            truncated += cut and ex is not None
            dropped += ex is None
            if ex is not None:
                out.append(ex | {"source": source})
        print0(f"{split}: {len(out)} pairs ({truncated} truncated, {dropped} dropped: a completion would vanish "
               f"within --max-length {self.args.max_length})")
        return out

    def make_batch(self, examples: list[dict]) -> Batch:
        """Chosen then rejected sequences of every pair ([c_1..c_B, r_1..r_B]) in one forward; packed, each prompt
        appears once, both completions continuing from it."""
        pairs = [(e["prompt"], e["completions"][k]) for k in (0, 1) for e in examples]
        tensors, segments = collate_completions(pairs, self.tokenizer.pad_token_id, self.args.padding_free)
        if "ref_logps" in examples[0]:  # precomputed: [chosen..., rejected...]
            tensors["ref_logps"] = torch.stack([e["ref_logps"] for e in examples]).T.reshape(-1)
        # num_tokens counts every sequence's tokens (the prompt twice), as padded training would see them
        return Batch(tensors, num_samples=len(examples), num_tokens=sum(len(p) + len(c) for p, c in pairs),
                     sources=[e["source"] for e in examples], attention_segments=segments)

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        a = self.args
        policy_logps = sequence_logps(model, batch)  # [2B]
        if "ref_logps" in batch.tensors:
            ref_logps = batch["ref_logps"].to(policy_logps.dtype)
        elif not a.uses_reference:
            ref_logps = torch.zeros_like(policy_logps)
        else:
            with torch.no_grad(), self.reference() as ref:
                ref_logps = sequence_logps(ref, batch)
        # RPO: NLL per chosen token, averaged per pair (a per-sample mean keeps accumulation/world-size invariance)
        nll = (-policy_logps.chunk(2)[0] / batch["lengths"].chunk(2)[0]).mean()
        if a.loss_type.length_averaged:  # IPO, SimPO and ORPO are defined on length-averaged log-probs
            policy_logps, ref_logps = policy_logps / batch["lengths"], ref_logps / batch["lengths"]
        pc, pr = policy_logps.chunk(2)
        rc, rr = ref_logps.chunk(2)
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, a.beta, a.loss_type, a.label_smoothing, a.simpo_gamma)
        loss = losses.mean() + a.rpo_alpha * nll if a.rpo_alpha else losses.mean()
        metrics = {"loss": loss.detach()}  # what is optimized; with RPO its NLL part also as nll_loss (TRL's name)
        if a.rpo_alpha > 0 or a.loss_type == LossType.orpo:  # ORPO's loss holds this NLL already
            metrics["nll_loss"] = nll.detach()
        metrics |= {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                    "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                    "rewards/margins": (chosen_r - rejected_r).mean(),
                    "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        return LossOutput(loss, metrics)

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate() if self.eval_data else {}
        return metrics | tasks.greedy_eval(self)


def main(args: Args | None = None) -> DPOTrainer:
    args = args or tyro.cli(Args)
    trainer = DPOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
