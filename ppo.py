"""Proximal Policy Optimization for language models (RLHF / RL from verifiable rewards), one file.

    python ppo.py                                   # bundled SmolLM2-135M-Instruct, arithmetic prompts, verifier
    python ppo.py --dataset prompts.jsonl --reward-fn my_rewards:score
    python ppo.py --dataset prompts.jsonl --reward-model path/to/reward_model --critic separate
    torchrun --nproc_per_node 8 ppo.py --dataset prompts.jsonl --reward-model path/to/rm

One step (iteration) = rollout -> score -> log-probs/values -> per-token rewards -> GAE -> ppo_epochs x num_minibatches
clipped updates. Details follow PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) and "The N+
Implementation Details of RLHF with PPO" (Huang et al. 2024, https://arxiv.org/abs/2403.17031), cited below as N+.
Prompt rows are {"prompt": str or messages, ...}; the other fields reach the reward function.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import torch
import tyro
from torch import nn

import tasks
from common import (BaseTrainer, LossOutput, StepOutput, TrainArgs, UserError, add_lora, check_flag, kept_logits,
                    label_logps, run_main, segment_forward, use_segment_attention)
from rollout import (TOP_P_OFF_POLICY, EpisodeArgs, Rollout, Scorer, episode_metrics, evaluate_replies, first_samples,
                     load_reward_model, log_samples, masked_mean, online_examples, reward_head, rollout_batch, sample,
                     scatter_tokens, stopwatch, token_logps)


class CriticType(StrEnum):
    value_head = "value_head"  # a scalar head on the policy's own backbone: one forward, no second model
    separate = "separate"  # its own backbone: a copy of the reward model (N+ detail) or else of the policy


class KLEstimator(StrEnum):
    k1 = "k1"  # log pi - log pi_ref: unbiased, can be negative per token
    k3 = "k3"  # (r - 1) - log r with r = pi_ref / pi: unbiased, always >= 0, lower variance (Schulman 2020)


@dataclass
class Args(TrainArgs, EpisodeArgs):
    reward_fn: str | None = None
    """`module:function` called as fn(prompts, completions, **row_fields) -> list[float]; default: the built-in
    arithmetic verifier (1.0 if the first integer of the reply is the sum, else 0.0)"""
    reward_model: str | None = None
    """path of an AutoModelForSequenceClassification (instead of --reward-fn), read at the token it was trained on
    (`reward_token_index`); it reads the policy's token ids, so it must share the policy's tokenizer"""
    critic: CriticType = CriticType.value_head
    """value_head (default: one forward gives logits and values, half the memory) or separate"""
    kl_coef: float = 0.05
    """per-token KL penalty coefficient"""
    kl_estimator: KLEstimator = KLEstimator.k1
    """k1 or k3"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (mean kept) before GAE"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip around the rollout values"""
    vf_coef: float = 0.1
    """value loss weight"""
    ppo_epochs: int = 2
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """optimizer updates per epoch; each minibatch is split into --gradient-accumulation-steps micro-batches"""
    temperature: float = 0.7
    """sampling temperature; the log-probs divide the logits by it too (N+ detail)"""
    top_p: float = 1.0
    """must be 1 (TRL's flag, kept to refuse it in one line): the log-probs, ratios and KL are those of the full
    softmax(logits / T), so sampling from a nucleus would make every update off-policy; lower --temperature instead"""
    max_new_tokens: int = 8
    """response length cap"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of responses that never end their turn (no end-of-turn token within
    --max-new-tokens)"""
    batch_size: int = 32
    """prompts per device per rollout"""
    learning_rate: float = 1e-5
    """peak AdamW learning rate (policy and critic)"""
    total_steps: int = 30
    """iterations (rollout + updates); 0 = run only the step-0 eval"""
    log_every: int = 5
    """iterations between log lines / metrics.jsonl records"""
    eval_every: int = 10
    """iterations between evals (0 = only at start and end)"""
    max_length: int = 256
    """max tokens of prompt + response; prompts are cut from the left to --max-prompt-length (default: the rest)"""
    padding_free: bool = True
    """log-prob/value forwards on one packed row in which prompt prefixes shared by episodes (e.g. the chat template's
    system prompt) appear once (exact); --no-padding-free: the left-padded batch"""
    def default_max_prompt_length(self) -> int:
        return self.max_length - self.max_new_tokens

    def rows_per_step(self, world_size: int) -> int:
        return self.batch_size * world_size  # accumulation splits a rollout's prompts, it draws no more

    def validate(self) -> None:
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        super().validate()
        self.check_episode_flags(tasks.default_env(self.dataset))
        check_flag(self, "temperature", self.temperature > 0, "must be > 0 (greedy decoding is not PPO's sampling)")
        check_flag(self, "top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        check_flag(self, "top_p", self.top_p == 1, TOP_P_OFF_POLICY)
        for name in ("kl_coef", "vf_coef", "cliprange", "cliprange_value"):
            check_flag(self, name, getattr(self, name) >= 0, "must be >= 0")
        for name in ("gamma", "lam"):
            check_flag(self, name, 0 <= getattr(self, name) <= 1, "must be in [0, 1]")
        for name in ("ppo_epochs", "num_minibatches"):
            check_flag(self, name, getattr(self, name) >= 1, "must be >= 1")
        if self.missing_eos_penalty is not None:
            check_flag(self, "missing_eos_penalty", True, "must be finite")
        if self.lora_r and self.critic == CriticType.separate:
            raise UserError("--critic separate with --lora-r: not supported (the critic would need adapters of its "
                            "own); use the default --critic value_head, which trains fully")
        if self.reward_fn and self.reward_model:
            raise UserError("pass either --reward-fn or --reward-model, not both")
        if self.batch_size % (self.num_minibatches * self.gradient_accumulation_steps):
            raise UserError(f"--batch-size {self.batch_size} must be divisible by --num-minibatches x "
                            f"--gradient-accumulation-steps ({self.num_minibatches} x "
                            f"{self.gradient_accumulation_steps})")


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions: the PPO math on [B, L] response-token tensors, `mask` = 1 on valid response tokens


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize over valid tokens only (N+ detail: padding must not enter the statistics); unbiased variance."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from samples of pi [B, L] (http://joschu.net/blog/kl-approx.html)."""
    log_ratio = logps - ref_logps
    if estimator == KLEstimator.k1:
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # k3 = (r - 1) - log r, r = pi_ref / pi


def shape_rewards(scores, logps, ref_logps, mask, kl_coef: float, estimator: KLEstimator):
    """Per-token rewards [B, L]: -kl_coef * KL on every response token, plus the sequence score [B] on the last
    valid one (N+ details; Ziegler et al. 2019). -> (rewards, kl, non_score_reward)."""
    kl = kl_penalty(logps, ref_logps, estimator) * mask
    non_score = -kl_coef * kl
    last = (mask.sum(1) - 1).long()
    rewards = non_score.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, kl, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over response tokens [B, L].
    The value after the last valid token is 0 (the episode ends there). -> (advantages, returns)."""
    values = values * mask
    rewards = rewards * mask
    last, out = torch.zeros_like(values[:, 0]), []
    for i in reversed(range(values.shape[1])):  # token index
        next_value = values[:, i + 1] if i + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def policy_loss(logps, old_logps, advantages, mask, cliprange):
    """PPO clipped surrogate (eq. 7), token-level mean. -> (loss, clipfrac, approxkl, ratio)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return loss, clipfrac, approxkl, ratio


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss (N+; OpenAI lm-human-preferences): 0.5 max((v - R)^2, (clip(v) - R)^2) -> (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask)


def on_sampled(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, L] -> [N, M]: each row's values at its sampled tokens (mask 1), left-aligned; single-turn rows unchanged."""
    keep = mask.bool()
    pos = mask.long().cumsum(1) - 1
    rows = torch.arange(len(mask), device=mask.device)[:, None].expand_as(keep)
    out = x.new_zeros(len(mask), int(mask.sum(1).max()))
    out[rows[keep], pos[keep]] = x[keep]
    return out


def back_in_place(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of on_sampled: [N, M] -> [N, L], 0 off the sampled tokens."""
    keep = mask.bool()
    pos = mask.long().cumsum(1) - 1
    rows = torch.arange(len(mask), device=mask.device)[:, None].expand_as(keep)
    out = x.new_zeros(mask.shape)
    out[keep] = x[rows[keep], pos[keep]]
    return out


def minibatch_rows(n: int, num_minibatches: int, accumulation: int) -> list[list[list[int]]]:
    """One epoch over n rollout rows: a fresh shuffle (the global RNG), cut into num_minibatches optimizer updates of
    `accumulation` equal micro-batches each -> [update][micro-batch][row]."""
    perm, mb = torch.randperm(n).tolist(), n // num_minibatches
    micro = mb // accumulation
    return [[perm[m * mb + j:m * mb + j + micro] for j in range(0, mb, micro)] for m in range(num_minibatches)]


# ----------------------------------------------------------------------------------------------------------------------
# Models


class ActorCritic(nn.Module):
    """Policy LM + critic in one module: one optimizer, one DDP wrapper. `forward` returns logits and values only
    where they predict a response token (t["keep"], t["logit_index"]), so the LM head never runs on the prompt."""

    def __init__(self, policy: nn.Module, value_head: nn.Module, critic_backbone: nn.Module | None = None):
        super().__init__()
        self.policy, self.value_head, self.critic_backbone = policy, value_head, critic_backbone

    def forward(self, t: dict[str, torch.Tensor], segments: list | None = None):
        # the LM head's input is the final (normed) hidden state at the kept positions: catch it for the value head.
        # Calling the policy itself (not its backbone) keeps FSDP's per-model hooks in charge of gathering weights.
        caught = []
        hook = self.policy.get_output_embeddings().register_forward_pre_hook(lambda m, args: caught.append(args[0]))
        try:
            logits = kept_logits(self.policy, t, segments)  # [N, V]: one row per response token
        finally:
            hook.remove()
        # [N_kept, H]; a model without a boolean logits_to_keep ran its LM head on every position: select here too
        hidden = caught[0] if caught[0].dim() == 2 else caught[0][t["keep"]]
        if self.critic_backbone is not None:
            inputs = {k: t[k] for k in ("input_ids", "position_ids", "attention_mask") if t.get(k) is not None}
            run = self.critic_backbone if segments is None else partial(segment_forward, self.critic_backbone, segments)
            hidden = run(**inputs, use_cache=False).last_hidden_state[t["keep"]]
        if t.get("logit_index") is not None:
            hidden = hidden.index_select(0, t["logit_index"])
        return logits, self.value_head(hidden).squeeze(-1)  # [N, V], [N]


# ----------------------------------------------------------------------------------------------------------------------


class PPOTrainer(BaseTrainer):
    script_name = "ppo"
    state_flags = ("critic", "reward_model")  # a separate critic is a second backbone in the saved state
    summary_keys = ("scores", "greedy_accuracy")
    samples_per_s_key = "episodes_per_s"
    args: Args

    def build_model(self) -> nn.Module:
        a = self.args
        policy = add_lora(super().build_model(), a)
        if a.padding_free:
            use_segment_attention(policy)  # before the copies: the reference and a policy-based critic inherit it
        self.init_reference(policy)
        self.reward_model = load_reward_model(self, a.reward_model, policy) if a.reward_model else None
        hidden = policy.config.hidden_size
        if a.critic == CriticType.separate and self.reward_model is not None:
            # N+ detail: the critic starts as the reward model (backbone and head)
            backbone, head = copy.deepcopy(self.reward_model.base_model), copy.deepcopy(reward_head(self.reward_model))
            backbone.requires_grad_(True), head.requires_grad_(True)
            if a.padding_free:
                use_segment_attention(backbone)
        else:
            backbone = copy.deepcopy(policy.base_model) if a.critic == CriticType.separate else None
            # zero init: values start at 0 instead of at a random scale, so early value-loss gradients (which flow
            # into the shared backbone with the value head) do not drown the policy gradient
            head = nn.Linear(hidden, 1)
            nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        if self.reward_model is not None:  # frozen after the critic's copy: that one trains in fp32
            self.freeze(self.reward_model)
        return ActorCritic(policy, head, backbone)

    def hf_model(self) -> nn.Module:
        return self.model.policy

    def setup_data(self) -> None:
        a = self.args
        fns = [] if a.reward_model else tasks.reward_fns([a.reward_fn] if a.reward_fn else [], a.dataset,
                                                         " or --reward-model PATH")
        self.scorer = Scorer(self, fns, reward_model=self.reward_model)
        train_rows, eval_rows = tasks.load_rows(a, "prompt")
        self.train_data, self.eval_data = online_examples(self, train_rows, eval_rows)  # --env: episodes' rows

    def training_step(self) -> StepOutput:
        """One iteration: sample -> score -> log-probs, reference log-probs and values -> per-token rewards -> GAE ->
        --ppo-epochs x --num-minibatches clipped updates."""
        a, clock = self.args, stopwatch(self.device)
        # 1. sample a response to each of this rank's prompts from the current policy
        ro = sample(self, self.next_examples())
        time_generate = clock()
        # 2. score each response (a reward function or a reward model)
        scores, _ = self.scorer(ro)
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * (~ro.has_eos).float()
        time_score = clock()
        # 3. the rollout policy's log-probs and values, and the reference's log-probs
        whole, mask = rollout_batch(self, ro, range(len(ro))), ro.mask
        with torch.no_grad(), self.autocast():
            self.model.eval()
            logps, values = self.logps_and_values(self.model, whole)
            with self.reference() as ref:
                ref_logps = token_logps(ref, whole, a.temperature)
        # 4. per-token rewards (-KL on every sampled token, the score on the last), then GAE over the sampled tokens
        # (an episode's environment messages between turns are no steps of the policy: taken out, then put back)
        m = on_sampled(mask, mask)
        rewards, kl, non_score = shape_rewards(scores, on_sampled(logps, mask), on_sampled(ref_logps, mask), m,
                                               a.kl_coef, a.kl_estimator)
        if a.whiten_rewards:
            rewards = masked_whiten(rewards, m, shift_mean=False) * m
        advantages, returns = gae(rewards, on_sampled(values, mask), m, a.gamma, a.lam)
        advantages, returns = back_in_place(masked_whiten(advantages, m) * m, mask), back_in_place(returns, mask)
        time_logprobs = clock()
        # 5. --ppo-epochs passes, each a fresh shuffle into --num-minibatches updates
        per_seq = {"old_logps": logps, "old_values": values, "advantages": advantages, "returns": returns}
        updates = [self.update([rollout_batch(self, ro, rows, per_seq) for rows in micro_batches])
                   for _ in range(a.ppo_epochs)
                   for micro_batches in minibatch_rows(len(ro), a.num_minibatches, a.gradient_accumulation_steps)]
        resid = returns - values
        metrics = {
            "objective/scores": scores.mean(), "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-logps * mask).sum(1).mean(),  # sample estimate of the sequence entropy (as TRL)
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": scores.mean() + non_score.sum(1).mean(),
            "val/num_eos_tokens": ro.has_eos.float().sum(),
            "val/explained_variance": 1 - masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
            / masked_mean((returns - masked_mean(returns, mask)) ** 2, mask).clamp(min=1e-8),
            "response_length": mask.sum(1).mean(),
            "time/generation": time_generate, "time/scoring": time_score, "time/logprobs_values": time_logprobs,
            "time/update": clock()} | episode_metrics(ro)
        log_samples(self, [r | {"score": r.pop("reward")} for r in first_samples(ro, scores)])
        return StepOutput.of(updates, metrics, len(ro), ro.num_tokens())

    def compute_loss(self, model, batch) -> LossOutput:
        """The clipped PPO loss of one micro-batch of the rollout."""
        a, t = self.args, batch.tensors
        logps, values = self.logps_and_values(model, batch)
        mask = t["mask"]
        pg_loss, pg_clipfrac, approxkl, ratio = policy_loss(logps, t["old_logps"], t["advantages"], mask, a.cliprange)
        vf_loss, vf_clipfrac = value_loss(values, t["old_values"], t["returns"], mask, a.cliprange_value)
        ratio_mean = masked_mean(ratio, mask).detach()
        return LossOutput(pg_loss + a.vf_coef * vf_loss, {
            "policy/approxkl_avg": approxkl.detach(), "policy/clipfrac_avg": pg_clipfrac,
            "loss/policy_avg": pg_loss.detach(), "loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac,
            "val/ratio": ratio_mean, "val/ratio_var": masked_mean((ratio.detach() - ratio_mean) ** 2, mask)})

    def logps_and_values(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, L] log-probs of the sampled tokens (logits / T, N+ detail) and the critic's values; 0 elsewhere."""
        logits, values = model(batch.tensors, batch.attention_segments)
        mask = batch["mask"]
        return (scatter_tokens(mask, label_logps(logits, batch["labels"], self.args.temperature)),
                scatter_tokens(mask, values.float()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy responses to the eval prompts, scored by the reward; on the built-in task also by its verifier (the
        held-out greedy accuracy)."""
        def metrics(ro: Rollout) -> dict:
            return {"scores": self.scorer(ro)[0].mean(), "response_length": ro.mask.sum(1).mean(),
                    **tasks.accuracy(self.args.dataset, ro), **episode_metrics(ro)}
        return evaluate_replies(self, self.eval_data, self.args.batch_size, metrics)


def main(args: Args | None = None) -> PPOTrainer:
    args = args or tyro.cli(Args)
    trainer = PPOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
