"""Group Relative Policy Optimization and its critic-free relatives (Dr. GRPO, DAPO, RLOO, GSPO), one file.

    python grpo.py                                    # bundled SmolLM2-135M-Instruct, arithmetic prompts, verifier
    python grpo.py --dataset arithmetic3              # the harder built-in task (sums of three digits)
    python grpo.py --dataset prompts.jsonl --reward-fn my_rewards:correct --reward-fn my_rewards:short \
        --reward-weights 1.0 0.1
    python grpo.py --loss-type dr_grpo --scale-rewards none         # Dr. GRPO
    python grpo.py --epsilon-high 0.28 --mask-truncated-completions   # DAPO's clip-higher and overlong filtering
    python grpo.py --advantage rloo --scale-rewards none              # RLOO
    python grpo.py --importance-sampling-level sequence --num-iterations 2   # GSPO
    torchrun --nproc_per_node 8 grpo.py --dataset prompts.jsonl --reward-fn my_rewards:correct

One step (iteration) = each prompt's --num-generations completions sampled -> scored -> advantages from the group's
rewards (no critic) -> --num-iterations clipped updates over the whole rollout. GRPO: Shao et al. 2024, DeepSeekMath
(https://arxiv.org/abs/2402.03300); Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training"
(https://arxiv.org/abs/2503.20783); DAPO: Yu et al. 2025 (https://arxiv.org/abs/2503.14476); RLOO: Ahmadian et al.
2024, "Back to Basics" (https://arxiv.org/abs/2402.14740); GSPO: Zheng et al. 2025, "Group Sequence Policy
Optimization" (https://arxiv.org/abs/2507.18071). Flag names and defaults follow TRL's GRPOTrainer.
Prompt rows are {"prompt": str or messages, ...}; the other fields reach the reward functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

import torch
import torch.distributed as dist
import tyro
from torch import nn

import tasks
from common import (BaseTrainer, LossOutput, Mean, StepOutput, TrainArgs, UserError, add_lora, check_flag, run_main,
                    use_segment_attention)
from rollout import (TOP_P_OFF_POLICY, EpisodeArgs, Rollout, Scorer, completion_logps, episode_metrics,
                     evaluate_replies, first_samples, log_samples, masked_sum, online_examples, rollout_batch, sample,
                     stopwatch, token_logps)


class ScaleRewards(StrEnum):
    group = "group"  # divide by the group's reward std (GRPO)
    batch = "batch"  # divide by the std of all rewards of the step, over all ranks (more robust, Hu 2025)
    none = "none"  # no division: Dr. GRPO's unbiased choice (the std re-weights prompts by their difficulty)


class AdvantageType(StrEnum):
    grpo = "grpo"  # r_i - mean_j r_j
    rloo = "rloo"  # leave-one-out: r_i - mean_{j != i} r_j (the baseline does not contain the sample itself)


class ImportanceSamplingLevel(StrEnum):
    token = "token"  # one ratio pi / pi_old per token (GRPO, PPO)
    sequence = "sequence"  # one per sequence, the geometric mean of its token ratios (GSPO)


class LossType(StrEnum):
    grpo = "grpo"  # per-sequence token mean, then mean over sequences (biased toward short replies, Dr. GRPO)
    dr_grpo = "dr_grpo"  # token sum / (max_new_tokens x sequences): a constant normaliser
    dapo = "dapo"  # token mean over all tokens of the optimizer step (micro-batches and ranks): TRL's default

    @property
    def length_weighted(self) -> bool:
        """A sequence's term counts with its length: not the GSPO objective, which averages sequences (eq. 5)."""
        return self != LossType.grpo


@dataclass
class Args(TrainArgs, EpisodeArgs):
    reward_fn: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """`module:function` called as fn(prompts, completions, **row_fields) -> list[float]; repeat the flag for several
    (summed with --reward-weights); default on a built-in task: its verifier `tasks:reward` (1.0 if the first integer
    of the reply is the answer, else 0.0)"""
    reward_weights: list[float] | None = None
    """one weight per --reward-fn (default: all 1.0)"""
    num_generations: int = 8
    """completions per prompt (the group); a group never spans two ranks"""
    scale_rewards: ScaleRewards | None = None
    """group, batch or none (Dr. GRPO); default: group, and none under --advantage rloo"""
    advantage: AdvantageType = AdvantageType.grpo
    """grpo (group-mean baseline) or rloo (leave-one-out baseline; unscaled, so it needs --scale-rewards none)"""
    loss_type: LossType | None = None
    """dapo, grpo or dr_grpo: how per-token losses are averaged; default dapo (TRL's), and grpo with sequence-level
    ratios (GSPO's objective averages sequences: the length-weighted dapo / dr_grpo are refused there)"""
    importance_sampling_level: ImportanceSamplingLevel = ImportanceSamplingLevel.token
    """token (GRPO) or sequence (GSPO: the ratio of a sequence is exp(mean over its loss tokens of log pi / pi_old),
    clipped per sequence; the GSPO paper clips at 3e-4 / 4e-4, so set --epsilon-low / --epsilon-high with it)"""
    epsilon_low: float = 0.2
    """ratio clip below: 1 - epsilon_low"""
    epsilon_high: float | None = None
    """ratio clip above: 1 + epsilon_high (DAPO's clip-higher uses 0.28); default: --epsilon-low"""
    num_iterations: int = 1
    """optimizer updates per generation (GRPO's mu); > 1 keeps the rollout's log-probs as the old policy"""
    beta: float = 0.0
    """KL(pi || pi_ref) coefficient, k3 estimator; 0 (TRL's default) builds no reference model"""
    mask_truncated_completions: bool = False
    """completions that never end their turn (no end-of-turn token within --max-new-tokens) get no loss (DAPO's
    overlong filtering); their rewards still count in the group statistics"""
    temperature: float = 0.7
    """sampling temperature (TRL: 1.0; a 135M model's replies at 1.0 are mostly noise); the log-probs divide the
    logits by it too"""
    top_p: float = 1.0
    """must be 1 (TRL's flag, kept to refuse it in one line): the log-probs, ratios and KL are those of the full
    softmax(logits / T), so sampling from a nucleus would make every update off-policy; lower --temperature instead"""
    max_new_tokens: int = 8
    """completion length cap (also Dr. GRPO's constant normaliser)"""
    batch_size: int = 4
    """prompts per device per rollout: batch_size x num_generations episodes per device per step"""
    gradient_accumulation_steps: int = 1
    """micro-batches per update, each of batch_size / this whole groups"""
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
    """log-prob forwards on one packed row in which each group's prompt appears once (exact); --no-padding-free: the
    left-padded batch"""
    def default_max_prompt_length(self) -> int:
        return self.max_length - self.max_new_tokens

    def rows_per_step(self, world_size: int) -> int:
        return self.batch_size * world_size  # accumulation splits a rollout's prompts, it draws no more

    def validate(self) -> None:
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        super().validate()
        self.check_episode_flags(tasks.default_env(self.dataset))
        check_flag(self, "num_generations", self.num_generations >= 2,
                   "must be >= 2 (a group of one has no baseline or std: its advantage is undefined)")
        check_flag(self, "temperature", self.temperature > 0, "must be > 0 (greedy groups are all alike)")
        check_flag(self, "top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        check_flag(self, "top_p", self.top_p == 1, TOP_P_OFF_POLICY)
        if self.scale_rewards is None:
            self.scale_rewards = ScaleRewards.none if self.advantage == AdvantageType.rloo else ScaleRewards.group
        elif self.advantage == AdvantageType.rloo and self.scale_rewards != ScaleRewards.none:
            raise UserError(f"--advantage rloo with --scale-rewards {self.scale_rewards}: RLOO's advantage is "
                            f"r_i - mean of the others, unscaled; pass --scale-rewards none (or leave it out)")
        sequence = self.importance_sampling_level == ImportanceSamplingLevel.sequence
        self.loss_type = LossType(self.loss_type or (LossType.grpo if sequence else LossType.dapo))
        if sequence and self.loss_type.length_weighted:
            raise UserError(f"--loss-type {self.loss_type} with --importance-sampling-level sequence: weighs each "
                            f"sequence's clipped term by its length, where GSPO (eq. 5) averages sequences equally; "
                            f"use --loss-type grpo (the default with sequence-level ratios)")
        check_flag(self, "epsilon_low", 0 <= self.epsilon_low < 1, "must be in [0, 1)")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low
        check_flag(self, "epsilon_high", self.epsilon_high >= 0, "must be >= 0")
        check_flag(self, "beta", self.beta >= 0, "must be >= 0")
        check_flag(self, "num_iterations", self.num_iterations >= 1, "must be >= 1")
        if self.reward_weights is not None:
            if not all(math.isfinite(w) for w in self.reward_weights):
                raise UserError(f"--reward-weights {' '.join(map(str, self.reward_weights))}: must be finite")
            n_fns = max(len(self.reward_fn), 1)
            if len(self.reward_weights) != n_fns:
                raise UserError(f"--reward-weights: {len(self.reward_weights)} weights for {n_fns} reward function(s)")
        if self.batch_size % self.gradient_accumulation_steps:
            raise UserError(f"--batch-size {self.batch_size} prompts cannot be split into --gradient-accumulation-"
                            f"steps {self.gradient_accumulation_steps} micro-batches of whole groups")


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions: rewards [B, G] (B prompts, G completions each); per-token tensors [N, L], N = B x G sequences of L
# completion tokens, `mask` = 1 on tokens that enter the loss.


def group_advantages(rewards: torch.Tensor, scale: ScaleRewards, estimator: AdvantageType,
                     batch_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence advantages [B, G] from the group's rewards -> (advantages, zero_std [B]).

    GRPO (Shao et al. 2024, sec. 4.1.2): A_i = (r_i - mean(r)) / std(r); Dr. GRPO (Liu et al. 2025, eq. 3) drops the
    std; RLOO (Ahmadian et al. 2024, eq. 9): A_i = r_i - 1/(G-1) sum_{j != i} r_j. A group whose rewards are all equal
    carries no signal: its advantages are exactly 0, never 0/0 (std +1e-4 as TRL, then zeroed)."""
    G = rewards.shape[1]
    total = rewards.sum(1, keepdim=True)
    baseline = (total - rewards) / (G - 1) if estimator == AdvantageType.rloo else total / G
    adv = rewards - baseline
    std = rewards.std(1, keepdim=True)  # unbiased, as TRL
    zero_std = (rewards == rewards[:, :1]).all(1)
    if scale == ScaleRewards.group:
        adv = adv / (std + 1e-4)
    elif scale == ScaleRewards.batch:
        adv = adv / (batch_std + 1e-4)
    return adv.masked_fill(zero_std[:, None], 0.0), zero_std


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) from samples of pi [N, L]: (r - 1) - log r with r = pi_ref / pi (Schulman 2020;
    GRPO eq. 4): unbiased, always >= 0."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


def clipped_token_loss(logps, old_logps, advantages, eps_low: float, eps_high: float, mask: torch.Tensor | None = None,
                       level: ImportanceSamplingLevel = ImportanceSamplingLevel.token):
    """Per-token clipped surrogate [N, L] (GRPO eq. 3; asymmetric clip-higher, DAPO eq. 10):
    -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = pi / pi_old, A [N] broadcast over tokens. level sequence
    (GSPO eqs. 5 and 7): r_i = exp(1/|o_i| sum_t log pi / pi_old over the loss tokens `mask` of sequence i), the
    geometric mean of its token ratios, clipped per sequence and broadcast to its tokens (as TRL).
    -> (loss, low_clipped, high_clipped) with the clipped indicators as TRL counts them."""
    log_ratio = logps - old_logps
    if level == ImportanceSamplingLevel.sequence:
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logps)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    low = ((ratio < 1 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    return loss, low, high


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType,
                   max_new_tokens: int) -> torch.Tensor | Mean:
    """The loss of one micro-batch from per-token losses [N, L].

    grpo (GRPO eq. 3): 1/N sum_i 1/|o_i| sum_t l_it; dr_grpo (Dr. GRPO eq. 3): 1/(N x max_new_tokens) sum_i sum_t l_it,
    both means over sequences, which equal-sized micro-batches and ranks average exactly; dapo (DAPO eq. 8):
    1/sum_i |o_i| sum_i sum_t l_it over ALL sequences of the optimizer update, as Mean(token sum, tokens): the loop
    sums both over micro-batches and ranks."""
    masked = per_token * mask
    if loss_type == LossType.grpo:
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == LossType.dr_grpo:
        return masked.sum() / (mask.shape[0] * max_new_tokens)
    return Mean(masked.sum(), mask.sum())


def per_sequence(indicator: torch.Tensor, mask: torch.Tensor) -> Mean:
    """A per-token 0/1 indicator that is constant along each sequence [N, L] -> its mean over the sequences that
    have loss tokens (an exact Mean)."""
    has = mask.sum(1) > 0
    return Mean((indicator * mask).amax(1)[has].sum().detach(), has.sum())


def reward_std_over_ranks(rewards: torch.Tensor) -> torch.Tensor:
    """The std of every reward of the step, over all ranks (one all-reduce; --scale-rewards batch): the same on any
    world size."""
    r = rewards.double()
    stats = torch.stack([r.sum(), (r ** 2).sum(), torch.ones_like(r).sum()])
    if dist.is_initialized():
        dist.all_reduce(stats)
    total, squares, n = stats.tolist()
    return torch.tensor(max((squares - total ** 2 / n) / max(n - 1, 1), 0.0) ** 0.5, device=rewards.device)


# ----------------------------------------------------------------------------------------------------------------------


class GRPOTrainer(BaseTrainer):
    script_name = "grpo"
    summary_keys = ("reward", "greedy_accuracy")
    samples_per_s_key = "episodes_per_s"
    args: Args

    def build_model(self) -> nn.Module:
        policy = add_lora(super().build_model(), self.args)
        if self.args.padding_free:
            use_segment_attention(policy)  # before the copy: the reference inherits it
        if self.args.beta > 0:  # beta = 0: no KL term, so no reference is built or held (as TRL)
            self.init_reference(policy)
        return policy

    def setup_data(self) -> None:
        a = self.args
        self.scorer = Scorer(self, tasks.reward_fns(a.reward_fn, a.dataset, " (repeatable)"), a.reward_weights)
        train_rows, eval_rows = tasks.load_rows(a, "prompt")
        self.train_data, self.eval_data = online_examples(self, train_rows, eval_rows)  # --env: episodes' rows

    def training_step(self) -> StepOutput:
        """One iteration: sample each prompt's group -> score it -> group advantages -> old and reference log-probs
        -> --num-iterations updates over the whole rollout."""
        a, G, clock = self.args, self.args.num_generations, stopwatch(self.device)
        # 1. sample G completions of each of this rank's prompts from the current policy (groups contiguous)
        ro = sample(self, self.next_examples(), num_samples=G)
        time_generate = clock()
        # 2. score them, and each completion's advantage over its group (no critic)
        rewards, per_fn = self.scorer(ro)
        batch_std = reward_std_over_ranks(rewards) if a.scale_rewards == ScaleRewards.batch else None
        advantages, zero_std = group_advantages(rewards.view(-1, G), a.scale_rewards, a.advantage, batch_std)
        time_score = clock()
        # 3. the old policy's and the reference's log-probs, where the loss needs them
        # (DAPO's overlong filtering: a truncated completion gets no loss; its reward still shaped its group)
        loss_mask = ro.mask * ro.has_eos[:, None] if a.mask_truncated_completions else ro.mask
        per_seq = {"advantages": advantages.reshape(-1), "loss_mask": loss_mask}
        if a.num_iterations > 1:  # else the old policy is the current one: ratio 1, the plain policy gradient
            per_seq["old_logps"] = completion_logps(self, self.model, ro)
        if a.beta > 0:
            with self.reference() as ref:
                per_seq["ref_logps"] = completion_logps(self, ref, ro)
        time_logprobs = clock()
        # 4. --num-iterations updates, each over the whole rollout in micro-batches of whole groups
        n = len(ro) // a.gradient_accumulation_steps
        micro_batches = [rollout_batch(self, ro, range(s, s + n), per_seq) for s in range(0, len(ro), n)]
        updates = [self.update(micro_batches) for _ in range(a.num_iterations)]
        lengths = ro.mask.sum(1)
        metrics = {"reward": rewards.mean(), "reward_std": rewards.view(-1, G).std(1).mean(),
                   "frac_reward_zero_std": zero_std.float().mean(), "completions/mean_length": lengths.mean(),
                   "completions/min_length": lengths.min(), "completions/max_length": lengths.max(),
                   "completions/clipped_ratio": (~ro.has_eos).float().mean(),
                   "time/generation": time_generate, "time/scoring": time_score, "time/logprobs": time_logprobs,
                   "time/update": clock()}
        metrics |= {f"rewards/{name}/mean": col.mean() for name, col in per_fn.items()} | episode_metrics(ro)
        log_samples(self, first_samples(ro, rewards))
        return StepOutput.of(updates, metrics, len(ro), ro.num_tokens())

    def compute_loss(self, model, batch) -> LossOutput:
        """The clipped surrogate (+ beta x k3 KL) of one micro-batch of the rollout, aggregated by --loss-type."""
        a, t = self.args, batch.tensors
        logps, entropy = token_logps(model, batch, a.temperature, entropy=True)  # [N, L]
        old = t["old_logps"] if "old_logps" in t else logps.detach()
        mask = t["loss_mask"]
        per_token, low, high = clipped_token_loss(logps, old, t["advantages"], a.epsilon_low, a.epsilon_high, mask,
                                                  a.importance_sampling_level)
        metrics = {}
        if "ref_logps" in t:
            kl = k3_kl(logps, t["ref_logps"])
            per_token = per_token + a.beta * kl
            metrics["kl"] = masked_sum(kl, mask)
        loss = aggregate_loss(per_token, mask, a.loss_type, a.max_new_tokens * (a.max_turns if self.env else 1))
        # token metrics: exact means over the step's tokens, every micro-batch and rank, as TRL logs them; with
        # sequence-level ratios the clip fractions are over sequences (one clip decision each), as TRL counts them
        clipped = per_sequence if a.importance_sampling_level == ImportanceSamplingLevel.sequence else masked_sum
        return LossOutput(loss, metrics | {
            "entropy": masked_sum(entropy, t["mask"]), "clip_ratio/low_mean": clipped(low, mask),
            "clip_ratio/high_mean": clipped(high, mask), "clip_ratio/region_mean": clipped(low + high, mask)})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the eval prompts, scored by the rewards; on a built-in task also the held-out greedy
        accuracy (its verifier's mean)."""
        def metrics(ro: Rollout) -> dict:
            rewards, _ = self.scorer(ro)
            return {"reward": rewards.mean(), "completions/mean_length": ro.mask.sum(1).mean(),
                    **tasks.accuracy(self.args.dataset, ro), **episode_metrics(ro)}
        return evaluate_replies(self, self.eval_data, self.args.batch_size * self.args.num_generations, metrics)


def main(args: Args | None = None) -> GRPOTrainer:
    args = args or tyro.cli(Args)
    trainer = GRPOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
