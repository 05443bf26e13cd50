"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
https://arxiv.org/abs/2402.04792), one file: DPO on pairs the current policy samples and a judge ranks.

    python online_dpo.py                              # bundled SmolLM2-135M-Instruct, arithmetic prompts, verifier
    python online_dpo.py --dataset prompts.jsonl --reward-fn my_rewards:correct --reward-fn my_rewards:short \
        --reward-weights 1.0 0.1
    python online_dpo.py --dataset prompts.jsonl --reward-model path/to/reward_model   # a reward model judges
    torchrun --nproc_per_node 8 online_dpo.py --dataset prompts.jsonl --reward-fn my_rewards:correct

One step (iteration) = two completions of each prompt sampled from the current policy -> scored -> the better one is
chosen, the other rejected (a tied pair weighs nothing) -> one update with dpo.py's loss on the pairs. Flag names
follow TRL's OnlineDPOTrainer. Prompt rows are {"prompt": str or messages, ...}; the other fields reach the reward
functions. With --env the two samples are whole multi-turn episodes (as grpo.py's), judged by their reward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import tyro
from torch import nn

import tasks
from common import (BaseTrainer, LossOutput, Mean, StepOutput, TrainArgs, UserError, add_lora, check_flag, run_main,
                    use_segment_attention)
from dpo import LossType, dpo_loss
from rollout import (EpisodeArgs, Rollout, Scorer, completion_logps, episode_metrics, evaluate_replies, first_samples,
                     load_reward_model, log_samples, online_examples, rollout_batch, sample, stopwatch, token_logps)


@dataclass
class Args(TrainArgs, EpisodeArgs):
    reward_fn: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """`module:function` called as fn(prompts, completions, **row_fields) -> list[float]; repeat the flag for several
    (summed with --reward-weights); default on a built-in task: its verifier `tasks:reward` (1.0 if the first integer
    of the reply is the answer, else 0.0)"""
    reward_weights: list[float] | None = None
    """one weight per --reward-fn (default: all 1.0)"""
    reward_model: str | None = None
    """a sequence classifier that judges instead of --reward-fn (reward.py's export: ppo.py's --reward-model)"""
    beta: float = 0.1
    """KL strength: rewards are beta * log(pi / pi_ref), as in dpo.py (IPO: tau; SimPO: the reward scale; ORPO: its
    lambda)"""
    loss_type: LossType = LossType.sigmoid
    """dpo.py's losses: sigmoid (DPO), ipo, hinge, robust, simpo, orpo (TRL's OnlineDPOTrainer: sigmoid, ipo)"""
    temperature: float = 0.7
    """sampling temperature (TRL: 0.9); the DPO loss reads the model's own log-probs (temperature 1), as TRL"""
    max_new_tokens: int = 8
    """completion length cap"""
    batch_size: int = 8
    """prompts per device per rollout: two completions of each, one pair"""
    gradient_accumulation_steps: int = 1
    """micro-batches per update, each of batch_size / this whole pairs"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate"""
    total_steps: int = 30
    """iterations (rollout + updates); 0 = run only the step-0 eval"""
    log_every: int = 5
    """iterations between log lines / metrics.jsonl records"""
    eval_every: int = 10
    """iterations between evals (0 = only at start and end)"""
    max_length: int = 256
    """max tokens of prompt + completion; prompts are cut from the left to --max-prompt-length (default: the rest)"""
    padding_free: bool = True
    """log-prob forwards on one packed row in which each pair's prompt appears once (exact); --no-padding-free: the
    left-padded batch"""

    def default_max_prompt_length(self) -> int:
        return self.max_length - self.max_new_tokens

    def rows_per_step(self, world_size: int) -> int:
        return self.batch_size * world_size  # accumulation splits a rollout's prompts, it draws no more

    def validate(self) -> None:
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        super().validate()
        self.check_episode_flags(tasks.default_env(self.dataset))
        self.loss_type = LossType(self.loss_type)  # a plain string when built in code
        check_flag(self, "temperature", self.temperature > 0, "must be > 0 (greedy pairs are alike)")
        check_flag(self, "beta", self.beta > 0, "must be > 0")
        if self.reward_model and self.reward_fn:
            raise UserError("pass either --reward-fn or --reward-model, not both")
        if self.reward_weights is not None:
            if not all(math.isfinite(w) for w in self.reward_weights):
                raise UserError(f"--reward-weights {' '.join(map(str, self.reward_weights))}: must be finite")
            n_fns = max(len(self.reward_fn), 1)
            if len(self.reward_weights) != n_fns:
                raise UserError(f"--reward-weights: {len(self.reward_weights)} weights for {n_fns} reward function(s)")
        if self.batch_size % self.gradient_accumulation_steps:
            raise UserError(f"--batch-size {self.batch_size} prompts cannot be split into --gradient-accumulation-"
                            f"steps {self.gradient_accumulation_steps} micro-batches of whole pairs")


# ----------------------------------------------------------------------------------------------------------------------


class OnlineDPOTrainer(BaseTrainer):
    script_name = "online_dpo"
    state_flags = ("reward_model",)  # the judge: recorded in run.json, a resume must use the same
    summary_keys = ("reward", "greedy_accuracy")
    samples_per_s_key = "episodes_per_s"
    args: Args

    def build_model(self) -> nn.Module:
        policy = add_lora(super().build_model(), self.args)
        if self.args.padding_free:
            use_segment_attention(policy)  # before the copy: the reference inherits it
        if self.args.loss_type.needs_reference:
            self.init_reference(policy)
        self.judge = self.freeze(load_reward_model(self, self.args.reward_model, policy)) if self.args.reward_model \
            else None
        return policy

    def setup_data(self) -> None:
        a = self.args
        fns = [] if self.judge else tasks.reward_fns(a.reward_fn, a.dataset, " (repeatable) or --reward-model PATH")
        self.scorer = Scorer(self, fns, a.reward_weights, self.judge)
        train_rows, eval_rows = tasks.load_rows(a, "prompt")
        self.train_data, self.eval_data = online_examples(self, train_rows, eval_rows)  # --env: episodes' rows

    def training_step(self) -> StepOutput:
        """One iteration: sample two completions of each prompt -> score them -> the better chosen -> the reference's
        log-probs -> one DPO update on the pairs."""
        a, clock = self.args, stopwatch(self.device)
        # 1. sample two completions of each of this rank's prompts from the current policy (pairs contiguous)
        ro = sample(self, self.next_examples(), num_samples=2)
        time_generate = clock()
        # 2. score them: the better of each pair is chosen; a tie states no preference and weighs nothing
        rewards, per_fn = self.scorer(ro)
        pairs = rewards.view(-1, 2)
        first_chosen, untied = pairs[:, 0] > pairs[:, 1], (pairs[:, 0] != pairs[:, 1]).float()
        time_score = clock()
        # 3. the reference's log-probs of every completion (summed over its tokens; DPO's, at temperature 1)
        per_seq = {"chosen": torch.stack([first_chosen, ~first_chosen], 1).reshape(-1),
                   "untied": untied.repeat_interleave(2)}
        if a.loss_type.needs_reference:
            with self.reference() as ref:
                per_seq["ref_logps"] = completion_logps(self, ref, ro, temperature=1.0).sum(1)
        time_logprobs = clock()
        # 4. one update on the pairs, in micro-batches of whole pairs
        n = len(ro) // a.gradient_accumulation_steps
        update = self.update([rollout_batch(self, ro, range(s, s + n), per_seq) for s in range(0, len(ro), n)])
        lengths = ro.mask.sum(1)
        metrics = {"reward": rewards.mean(), "objective/scores": rewards.mean(),
                   "objective/scores_margin": (pairs[:, 0] - pairs[:, 1]).abs().mean(), "frac_ties": 1 - untied.mean(),
                   "completions/mean_length": lengths.mean(), "val/contain_eos_token": ro.has_eos.float().mean(),
                   "time/generation": time_generate, "time/scoring": time_score, "time/logprobs": time_logprobs,
                   "time/update": clock()}
        metrics |= {f"rewards/{name}/mean": col.mean() for name, col in per_fn.items()} | episode_metrics(ro)
        log_samples(self, first_samples(ro, rewards))
        return StepOutput.of([update], metrics, len(ro), ro.num_tokens())

    def compute_loss(self, model, batch) -> LossOutput:
        """dpo.py's loss on one micro-batch of pairs: a mean over the untied pairs of the whole update (Mean)."""
        a, t = self.args, batch.tensors
        logps = token_logps(model, batch, 1.0).sum(1)  # [2P] summed over each completion's tokens
        ref = t["ref_logps"] if "ref_logps" in t else torch.zeros_like(logps)
        if a.loss_type.length_averaged:  # IPO, SimPO and ORPO are defined on length-averaged log-probs
            logps, ref = logps / t["mask"].sum(1), ref / t["mask"].sum(1)
        chosen, w = t["chosen"], t["untied"][t["chosen"]]  # [2P] one chosen per pair; [P] 0 for a tied pair
        losses, chosen_r, rejected_r = dpo_loss(logps[chosen], logps[~chosen], ref[chosen], ref[~chosen], a.beta,
                                                a.loss_type)
        mean = lambda x: Mean((x * w).sum(), w.sum())  # noqa: E731  over the untied pairs
        return LossOutput(mean(losses), {
            "loss": mean(losses.detach()), "rewards/chosen": mean(chosen_r), "rewards/rejected": mean(rejected_r),
            "rewards/accuracies": mean((chosen_r > rejected_r).float()), "rewards/margins": mean(chosen_r - rejected_r),
            "logps/chosen": mean(logps[chosen].detach()), "logps/rejected": mean(logps[~chosen].detach())})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the eval prompts, scored by the rewards; on a built-in task also the held-out greedy
        accuracy (its verifier's mean)."""
        def metrics(ro: Rollout) -> dict:
            rewards, _ = self.scorer(ro)
            return {"reward": rewards.mean(), "completions/mean_length": ro.mask.sum(1).mean(),
                    **tasks.accuracy(self.args.dataset, ro), **episode_metrics(ro)}
        return evaluate_replies(self, self.eval_data, self.args.batch_size * 2, metrics)


def main(args: Args | None = None) -> OnlineDPOTrainer:
    args = args or tyro.cli(Args)
    trainer = OnlineDPOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
