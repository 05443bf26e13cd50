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
from collections.abc import Callable

import torch
import torch.distributed as dist
import tyro
from torch import nn

import tasks
from common import (Batch, BaseTrainer, LossOutput, MetricWindow, StepOutput, TrainArgs, UserError, add_lora, ceil_div,
                    check_flag, progress, rank_batches, run_main, train_eval_rows)
from packing import kept_logits, label_logps, pack_prefix_tree, use_segment_attention
from rollout import (TOP_P_OFF_POLICY, call_reward_fn, generate, left_pad, load_reward_fn, prompt_examples,
                     stopwatch)


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


@dataclass
class Args(TrainArgs):
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
    loss_type: LossType = LossType.dapo
    """dapo (TRL's default), grpo or dr_grpo: how per-token losses are averaged"""
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

    def validate(self) -> None:
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        super().validate()
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


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_new_tokens: int,
                   token_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Scalar loss of one micro-batch from per-token losses [N, L].

    grpo (GRPO eq. 3): 1/N sum_i 1/|o_i| sum_t l_it; dr_grpo (Dr. GRPO eq. 3): 1/(N x max_new_tokens) sum_i sum_t l_it;
    dapo (DAPO eq. 8): 1/sum_i |o_i| sum_i sum_t l_it over ALL sequences of the optimizer step: `token_mean` maps this
    micro-batch's token sum to its share of that mean (Batch.token_mean); default: its own token mean. grpo and
    dr_grpo are means over sequences, which equal-sized micro-batches and ranks average exactly."""
    masked = per_token * mask
    if loss_type == LossType.grpo:
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == LossType.dr_grpo:
        return masked.sum() / (mask.shape[0] * max_new_tokens)
    return token_mean(masked.sum()) if token_mean is not None else masked.sum() / mask.sum().clamp(min=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def logits_entropy(logits: torch.Tensor, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits / T) per row [N] (fp32, in row chunks: no [N, V] fp32 copy at once)."""
    out = []
    for s in range(0, len(logits), chunk):
        z = logits[s:s + chunk].float() / temperature
        logp = torch.log_softmax(z, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------


class GRPOTrainer(BaseTrainer):
    script_name = "grpo"
    fixed_shapes = False  # groups of ragged completions: new shapes every step fragment a kept glibc heap
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
        if a.reward_fn:
            self.reward_fns = [(spec, load_reward_fn(spec)) for spec in a.reward_fn]
        elif tasks.is_task(a.dataset):
            self.reward_fns = [("tasks:reward", tasks.reward)]
        else:
            raise UserError(f"--dataset {a.dataset}: pass --reward-fn module:function (repeatable)")
        self.reward_weights = torch.tensor(a.reward_weights or [1.0] * len(self.reward_fns), device=self.device)
        if tasks.is_task(a.dataset):
            train_rows, eval_rows = tasks.prompt_rows(a.dataset, False), tasks.prompt_rows(a.dataset, True)
        else:
            train_rows, eval_rows = train_eval_rows(a)
        self.train_data = prompt_examples(self.tokenizer, train_rows, a.max_prompt_length, "train")
        self.eval_data = prompt_examples(self.tokenizer, eval_rows, a.max_prompt_length, "eval")
        # identical init everywhere is done; from here the global RNG drives sampling and must differ per rank
        torch.manual_seed(a.seed + 1000 * self.dist.rank)

    def make_batch(self, examples: list[dict]) -> Batch:
        """Left-padded prompts (generation continues from the right edge)."""
        ids, mask = left_pad([e["prompt_ids"] for e in examples], self.tokenizer.pad_token_id)
        return Batch({"input_ids": ids, "attention_mask": mask}, len(examples), int(mask.sum()),
                     row_ids=[e["loc"] for e in examples])

    # --- one iteration ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, examples: list[dict], greedy: bool, num_samples: int = 1):
        """Each prompt num_samples times, groups contiguous, from one prefill per prompt. -> (prompt batch of every
        sample, completions [N, L] padded after the first end-of-turn token, mask [N, L], has_eos [N])."""
        a = self.args
        prompts = self.make_batch(examples).to(self.device)
        self.model.eval()
        with self.autocast():
            out = generate(self.model, self.tokenizer, prompts["input_ids"], prompts["attention_mask"],
                           a.max_new_tokens, 0.0 if greedy else a.temperature, a.top_p, synced=self.fsdp,
                           num_samples=num_samples, stop_ids=self.end_of_turn, gather=a.gather_for_generation)
        if num_samples > 1:
            prompts = self.make_batch([e for e in examples for _ in range(num_samples)]).to(self.device)
        return prompts, *out

    def score(self, examples: list[dict], completions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weighted reward sum [N], each function's rewards [N, F]); a failing function is one line on all ranks."""
        # padded after the end of turn: the functions see the reply and nothing the model sampled after it
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        per_fn = torch.stack([call_reward_fn(fn, name, examples, texts, self.device) for name, fn in self.reward_fns],
                             1)
        return per_fn @ self.reward_weights, per_fn

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """group_advantages on this rank's groups [B, G]; --scale-rewards batch takes the std of the whole step's
        rewards over all ranks (one all-reduce), so it does not depend on the world size."""
        batch_std = None
        if self.args.scale_rewards == ScaleRewards.batch:
            r = rewards.double()
            stats = torch.stack([r.sum(), (r ** 2).sum(), torch.ones_like(r).sum()])
            if dist.is_initialized():
                dist.all_reduce(stats)
            total, squares, n = stats.tolist()
            batch_std = torch.tensor(max((squares - total ** 2 / n) / max(n - 1, 1), 0.0) ** 0.5, device=rewards.device)
        return group_advantages(rewards, self.args.scale_rewards, self.args.advantage, batch_std)

    def forward_batch(self, prompts: Batch, completions, mask) -> dict[str, torch.Tensor]:
        """Full-sequence tensors for a policy forward; position ids from the attention mask (left padding)."""
        input_ids = torch.cat([prompts["input_ids"], completions], 1)
        attention_mask = torch.cat([prompts["attention_mask"], mask.long()], 1)
        keep = torch.zeros_like(attention_mask, dtype=torch.bool)
        keep[:, prompts["input_ids"].shape[1] - 1:-1] = mask.bool()  # position t predicts completion token t + 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "keep": keep, "completion_mask": mask,
                "completions": completions, "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}

    def model_inputs(self, t: dict) -> tuple[dict[str, torch.Tensor], list | None]:
        """The left-padded batch itself, or (padding_free) one packed row in which prefixes the sequences share
        appear once: a group's G completions share their prompt token for token, so it is computed once for them."""
        if not self.args.padding_free:
            return t, None
        rows = t["attention_mask"].bool()  # prompt tokens, then the completion up to its first EOS
        seqs = [ids[m].tolist() for ids, m in zip(t["input_ids"], rows)]
        n_prompt = rows[:, :rows.shape[1] - t["completions"].shape[1]].sum(1).tolist()
        packed, segments = pack_prefix_tree(seqs, n_prompt)
        return {k: v.to(self.device) for k, v in packed.items()}, segments

    def completion_logps(self, model, t: dict, entropy: bool = False):
        """[N, L] log-probs of the completions under softmax(logits / T) (the sampling distribution), 0 where the
        mask is 0; with entropy=True also the per-token entropy [N, L] (no gradient)."""
        logits = kept_logits(model, *self.model_inputs(t))
        mask = t["completion_mask"].bool()
        flat = label_logps(logits, t["completions"][mask], self.args.temperature)
        logps = torch.zeros(mask.shape, device=flat.device, dtype=flat.dtype).masked_scatter(mask, flat)
        if not entropy:
            return logps
        ent = torch.zeros_like(logps).masked_scatter(mask, logits_entropy(logits, self.args.temperature))
        return logps, ent

    @torch.no_grad()
    def build_rollout(self, examples: list[dict], prompts: Batch, completions, mask, has_eos, rewards) -> dict:
        """Rollout tensors of N = B x G sequences (groups contiguous): advantages, loss mask, and the old / reference
        log-probs that the loss needs (old ones only when the policy moves between generation and update)."""
        a = self.args
        adv, zero_std = self.advantages(rewards.view(-1, a.num_generations))
        t = self.forward_batch(prompts, completions, mask)
        # DAPO overlong filtering: a truncated completion gets no loss (its reward still shaped its group's baseline)
        loss_mask = mask * has_eos[:, None].float() if a.mask_truncated_completions else mask
        t |= {"advantages": adv.reshape(-1), "loss_mask": loss_mask}
        if a.num_iterations > 1 or a.beta > 0:
            self.model.eval()
            with self.autocast():
                if a.num_iterations > 1:
                    t["old_logps"] = self.completion_logps(self.model, t)
                if a.beta > 0:
                    with self.reference() as ref:
                        t["ref_logps"] = self.completion_logps(ref, t)
        return t | {"zero_std": zero_std}

    @torch.no_grad()
    def rollout(self) -> tuple[dict, dict[str, float], list]:
        a, clock = self.args, stopwatch(self.device)
        examples = [self.train_data[i] for i in self.sampler.next_indices()]
        group_examples = [e for e in examples for _ in range(a.num_generations)]  # groups contiguous
        prompts, completions, mask, has_eos = self.sample(examples, greedy=False, num_samples=a.num_generations)
        time_generate = clock()
        rewards, per_fn = self.score(group_examples, completions)
        time_score = clock()
        t = self.build_rollout(group_examples, prompts, completions, mask, has_eos, rewards)
        zero_std = t.pop("zero_std")
        t["rows"] = [e["loc"] for e in group_examples]  # named by a non-finite loss
        time_logprobs = clock()
        lengths = mask.sum(1)
        metrics = {"reward": rewards.mean(), "reward_std": rewards.view(-1, a.num_generations).std(1).mean(),
                   "frac_reward_zero_std": zero_std.float().mean(), "completions/mean_length": lengths.mean(),
                   "completions/min_length": lengths.min(), "completions/max_length": lengths.max(),
                   "completions/clipped_ratio": (~has_eos).float().mean(),
                   # where an iteration's time goes (seconds; time/update is added by training_step)
                   "time/generation": time_generate, "time/scoring": time_score, "time/logprobs": time_logprobs}
        for (name, _), col in zip(self.reward_fns, per_fn.T):
            metrics[f"rewards/{name}/mean"] = col.mean()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        samples = [{"prompt": e["prompt"] if isinstance(e["prompt"], str) else e["prompt"][-1]["content"],
                    "completion": c, "reward": r}
                   for e, c, r in list(zip(group_examples, texts, rewards.tolist()))[:3]]
        return t, {k: float(v) for k, v in metrics.items()}, samples

    def micro_batches(self, t: dict) -> list[Batch]:
        """The rollout as --gradient-accumulation-steps equal micro-batches of whole groups, in order (a group stays
        together, so its prompt is shared in the packed forward). One update per pass sees the whole rollout, so
        the order does not matter."""
        rows, t = t.get("rows", []), {k: v for k, v in t.items() if k != "rows"}
        n = len(t["completions"])
        size = n // self.args.gradient_accumulation_steps
        return [Batch({k: v[s:s + size] for k, v in t.items()}, size, int(t["attention_mask"][s:s + size].sum()),
                      num_loss_tokens=int(t["loss_mask"][s:s + size].sum()),
                      row_ids=list(dict.fromkeys(rows[s:s + size]))) for s in range(0, n, size)]

    def compute_loss(self, model, batch: Batch) -> LossOutput:
        """The clipped surrogate (+ beta x k3 KL) of one micro-batch, aggregated by --loss-type."""
        a, t = self.args, batch.tensors
        logps, entropy = self.completion_logps(model, t, entropy=True)
        # one update per generation: the old policy is the current one (ratio 1, gradient of the plain PG loss)
        old = t["old_logps"] if "old_logps" in t else logps.detach()
        mask = t["loss_mask"]
        per_token, low, high = clipped_token_loss(logps, old, t["advantages"], a.epsilon_low, a.epsilon_high, mask,
                                                  a.importance_sampling_level)
        metrics = {}
        if "ref_logps" in t:
            kl = k3_kl(logps, t["ref_logps"])
            per_token = per_token + a.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        loss = aggregate_loss(per_token, mask, a.loss_type, a.max_new_tokens, batch.token_mean)
        return LossOutput(loss, metrics | {
            "entropy": masked_mean(entropy, t["completion_mask"]), "clip_ratio/low_mean": masked_mean(low, mask),
            "clip_ratio/high_mean": masked_mean(high, mask), "clip_ratio/region_mean": masked_mean(low + high, mask)})

    def training_step(self) -> StepOutput:
        t, metrics, self._samples = self.rollout()
        clock = stopwatch(self.device)
        updates = [self.micro_batches(t) for _ in range(self.args.num_iterations)]  # GRPO's mu passes
        out = self.step(updates, metrics, num_samples=len(t["completions"]), num_tokens=int(t["attention_mask"].sum()))
        out.metrics["time/update"] = clock()
        return out

    def on_step_end(self, out: StepOutput) -> None:
        if self.global_step % self.args.log_every == 0 and self.dist.is_main:
            for s in self._samples:
                self.write(f"  sample: {s['prompt']!r} -> {s['completion']!r} (reward {s['reward']:.2f})")
            self.log({"samples": self._samples}, "train")
            if self.wandb is not None:
                import wandb
                table = wandb.Table(columns=["prompt", "completion", "reward"],
                                    data=[[s["prompt"], s["completion"], s["reward"]] for s in self._samples])
                self.wandb.log({"train/samples_table": table}, step=self.global_step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the eval prompts, scored by the rewards; on a built-in task also the held-out greedy
        accuracy (its verifier's mean). Batches are split across ranks like training batches."""
        window, data = MetricWindow(), self.eval_data
        size = self.args.batch_size * self.args.num_generations  # a rollout's worth of sequences per forward
        batches = rank_batches(data, size, self.dist.rank, self.dist.world_size)
        for mine, n_real in progress(batches, "eval", ceil_div(len(data), size * self.dist.world_size)):
            _, completions, mask, _ = self.sample(mine, greedy=True)
            rewards, _ = self.score(mine, completions)
            m = {"reward": rewards.mean(), "completions/mean_length": mask.sum(1).mean()}  # filler rows weigh 0
            if tasks.is_task(self.args.dataset):
                texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
                m["greedy_accuracy"] = sum(tasks.reward(None, texts, [e["fields"]["answer"] for e in mine])) / len(mine)
            window.add(m, n_real)
        return window.reduce(self.device, rates=False)


def main(args: Args | None = None) -> GRPOTrainer:
    args = args or tyro.cli(Args)
    trainer = GRPOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
