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
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial

import torch
import tyro
from torch import nn

import tasks
from common import (Batch, BaseTrainer, LossOutput, MetricWindow, StepOutput, TrainArgs, UserError, add_lora, ceil_div,
                    check_flag, load_model, progress, rank_batches, run_main, train_eval_rows)
from packing import kept_logits, label_logps, pack_prefix_tree, segment_forward, use_segment_attention
from rollout import (TOP_P_OFF_POLICY, call_reward_fn, generate, left_pad, load_reward_fn, prompt_examples,
                     stopwatch)


class CriticType(StrEnum):
    value_head = "value_head"  # a scalar head on the policy's own backbone: one forward, no second model
    separate = "separate"  # its own backbone: a copy of the reward model (N+ detail) or else of the policy


class KLEstimator(StrEnum):
    k1 = "k1"  # log pi - log pi_ref: unbiased, can be negative per token
    k3 = "k3"  # (r - 1) - log r with r = pi_ref / pi: unbiased, always >= 0, lower variance (Schulman 2020)


@dataclass
class Args(TrainArgs):
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

    def validate(self) -> None:
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        super().validate()
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row [B]: right for left AND right padding (pad may equal EOS)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(1)


@dataclass
class RolloutBuffer:
    """One iteration's rollouts: sequences [B, T] (input_ids, attention_mask, position_ids, keep) and response-token
    tensors [B, L] (responses, response_mask, old_logps, old_values, advantages, returns)."""
    tensors: dict[str, torch.Tensor]
    row_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tensors["responses"])

    def minibatches(self, num_minibatches: int, accumulation: int):
        """A fresh shuffle per epoch; yields each minibatch as its list of equal micro-batches."""
        n = len(self)
        mb, micro = n // num_minibatches, n // num_minibatches // accumulation
        perm = torch.randperm(n, device=self.tensors["responses"].device)
        for m in range(num_minibatches):
            idx = perm[m * mb:(m + 1) * mb]
            yield [Batch({k: v[idx[j:j + micro]] for k, v in self.tensors.items()}, micro,
                         int(self.tensors["response_mask"][idx[j:j + micro]].sum()),
                         [self.row_ids[i] for i in idx[j:j + micro].tolist()] if self.row_ids else [])
                   for j in range(0, mb, micro)]


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


def reward_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence classifier; a head of several outputs is not a reward model."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise UserError(f"--reward-model: its `{name}` head has {head.out_features} outputs; a reward model "
                                f"has one (num_labels=1)")
            return head
    raise UserError(f"--reward-model {type(model).__name__}: no linear `score`/`classifier` head found")


def reward_token_index(config, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the token whose hidden state a reward model scores: the one it was trained on. reward.py's models
    (config.reward_at_last_token) at the last token, the reply's end-of-turn token when it has one. Any other
    sequence classifier where transformers' pooling reads it, which is where TRL's RewardTrainer trained it: the last
    token that is not config.pad_token_id, i.e. with pad == EOS the token BEFORE the EOS."""
    last = last_token_index(attention_mask)
    if getattr(config, "reward_at_last_token", False) or config.pad_token_id is None:
        return last
    return last_token_index(attention_mask * (input_ids != config.pad_token_id))


@torch.no_grad()
def reward_model_scores(rm: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Scalar score at `reward_token_index` [B]; position ids from the mask so left padding is harmless."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = rm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
    at = reward_token_index(rm.config, input_ids, attention_mask)
    return reward_head(rm)(hidden[torch.arange(len(hidden), device=hidden.device), at])[:, 0].float()


# ----------------------------------------------------------------------------------------------------------------------


class PPOTrainer(BaseTrainer):
    script_name = "ppo"
    state_flags = ("critic",)  # a separate critic is a second backbone in the saved state
    summary_keys = ("scores", "greedy_accuracy")
    samples_per_s_key = "episodes_per_s"
    args: Args

    def build_model(self) -> nn.Module:
        a = self.args
        policy = add_lora(super().build_model(), a)
        if a.padding_free:
            use_segment_attention(policy)  # before the copies: the reference and a policy-based critic inherit it
        self.init_reference(policy)
        self.reward_model = None
        if a.reward_model:
            from transformers import AutoModelForSequenceClassification
            self.reward_model = load_model(a.reward_model, a.trust_remote_code, self.dist.local_rank,
                                           auto_class=AutoModelForSequenceClassification, flag="--reward-model")
            if not any(x.endswith("ForSequenceClassification") for x in self.reward_model.config.architectures or []):
                raise UserError(f"--reward-model {a.reward_model}: not a sequence classifier (its config says "
                                f"{self.reward_model.config.architectures}); train one with reward.py")
            reward_head(self.reward_model)  # refuses heads of several outputs
            self.reward_model.eval().requires_grad_(False).to(self.device)
            if self.reward_model.config.vocab_size != policy.config.vocab_size:
                raise UserError(f"--reward-model {a.reward_model}: vocabulary of {self.reward_model.config.vocab_size} "
                                f"tokens, the policy has {policy.config.vocab_size}: they must share a tokenizer")
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
        return ActorCritic(policy, head, backbone)

    def hf_model(self) -> nn.Module:
        return self.model.policy

    def setup_data(self) -> None:
        a = self.args
        if a.reward_model:
            self.reward_fn = None
        elif a.reward_fn:
            self.reward_fn = load_reward_fn(a.reward_fn)
        elif tasks.is_task(a.dataset):
            self.reward_fn = tasks.reward
        else:
            raise UserError(f"--dataset {a.dataset}: pass --reward-fn module:function or --reward-model PATH")
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
    def sample(self, examples: list[dict], greedy: bool) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (prompt batch, responses [B, L] padded after the first end-of-turn token, response mask [B, L],
        has_eos [B])."""
        a = self.args
        prompts = self.make_batch(examples).to(self.device)
        self.model.policy.eval()  # N+ detail: no dropout while sampling
        with self.autocast():
            out = generate(self.model.policy, self.tokenizer, prompts["input_ids"], prompts["attention_mask"],
                           a.max_new_tokens, 0.0 if greedy else a.temperature, a.top_p, synced=self.fsdp,
                           stop_ids=self.end_of_turn, gather=a.gather_for_generation)
        return prompts, *out

    def score(self, examples, prompts: Batch, responses, mask) -> torch.Tensor:
        if self.reward_model is not None:
            ids = torch.cat([prompts["input_ids"], responses], 1)
            attn = torch.cat([prompts["attention_mask"], mask.long()], 1)
            with self.autocast():
                return reward_model_scores(self.reward_model, ids, attn)
        completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)  # padded after the turn end
        return call_reward_fn(self.reward_fn, self.args.reward_fn or "tasks:reward", examples, completions,
                              self.device)

    def forward_batch(self, prompts: Batch, responses, mask) -> dict[str, torch.Tensor]:
        """Full-sequence tensors for a policy/critic forward; position ids from the attention mask (left padding)."""
        input_ids = torch.cat([prompts["input_ids"], responses], 1)
        attention_mask = torch.cat([prompts["attention_mask"], mask.long()], 1)
        keep = torch.zeros_like(attention_mask, dtype=torch.bool)
        keep[:, prompts["input_ids"].shape[1] - 1:-1] = mask.bool()  # position t predicts response token t + 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "keep": keep, "response_mask": mask,
                "responses": responses, "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}

    def model_inputs(self, t: dict) -> tuple[dict[str, torch.Tensor], list | None]:
        """Forward inputs for rollout tensors: the left-padded batch itself, or (padding_free) one packed row in
        which prompt prefixes that episodes share (the chat template's system prompt, ...) appear once."""
        if not self.args.padding_free:
            return t, None
        rows = t["attention_mask"].bool()  # prompt tokens, then the response up to its first EOS
        seqs = [ids[m].tolist() for ids, m in zip(t["input_ids"], rows)]
        n_prompt = rows[:, :rows.shape[1] - t["responses"].shape[1]].sum(1).tolist()
        packed, segments = pack_prefix_tree(seqs, n_prompt)
        return {k: v.to(self.device) for k, v in packed.items()}, segments

    def logps_and_values(self, model, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] log-probs of the responses (logits / temperature, N+ detail) and values; 0 where mask is 0."""
        logits, values = model(*self.model_inputs(t))
        mask = t["response_mask"].bool()
        flat = label_logps(logits, t["responses"][mask], self.args.temperature)
        logps = torch.zeros(mask.shape, device=flat.device, dtype=flat.dtype).masked_scatter(mask, flat)
        return logps, torch.zeros_like(logps).masked_scatter(mask, values.float())

    @torch.no_grad()
    def rollout(self) -> tuple[RolloutBuffer, dict[str, float], list]:
        """Sample, score, evaluate old log-probs / ref log-probs / values, shape rewards, GAE."""
        a, clock = self.args, stopwatch(self.device)
        examples = [self.train_data[i] for i in self.sampler.next_indices()]
        prompts, responses, mask, has_eos = self.sample(examples, greedy=False)
        time_generate = clock()
        scores = self.score(examples, prompts, responses, mask)
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * (~has_eos).float()
        time_score = clock()
        t = self.forward_batch(prompts, responses, mask)
        self.model.eval()
        with self.autocast():
            logps, values = self.logps_and_values(self.model, t)
            with self.reference() as ref:
                ref_logits = kept_logits(ref, *self.model_inputs(t))
        ref_logps = torch.zeros_like(logps).masked_scatter(
            mask.bool(), label_logps(ref_logits, responses[mask.bool()], a.temperature))
        rewards, kl, non_score = shape_rewards(scores, logps, ref_logps, mask, a.kl_coef, a.kl_estimator)
        if a.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, values, mask, a.gamma, a.lam)
        advantages = masked_whiten(advantages, mask) * mask
        time_logprobs = clock()
        t |= {"old_logps": logps, "old_values": values, "advantages": advantages, "returns": returns}
        var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        resid = returns - values
        metrics = {
            "objective/scores": scores.mean(), "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-logps * mask).sum(1).mean(),  # sample estimate of the sequence entropy (as TRL)
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": scores.mean() + non_score.sum(1).mean(),
            "val/num_eos_tokens": has_eos.float().sum(),
            "val/explained_variance": 1 - masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
            / var_returns.clamp(min=1e-8),
            "response_length": mask.sum(1).mean(),
            # where an iteration's time goes (seconds; time/update is added by training_step)
            "time/generation": time_generate, "time/scoring": time_score, "time/logprobs_values": time_logprobs,
        }
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        samples = [{"prompt": e["prompt"] if isinstance(e["prompt"], str) else e["prompt"][-1]["content"],
                    "response": r, "score": s}
                   for e, r, s in zip(examples[:3], texts, scores.tolist())]
        return RolloutBuffer(t, [e["loc"] for e in examples]), {k: float(v) for k, v in metrics.items()}, samples

    def compute_loss(self, model, batch: Batch) -> LossOutput:
        """The clipped PPO loss of one rollout-buffer micro-batch."""
        a, t = self.args, batch.tensors
        logps, values = self.logps_and_values(model, t)
        mask = t["response_mask"]
        pg_loss, pg_clipfrac, approxkl, ratio = policy_loss(logps, t["old_logps"], t["advantages"], mask, a.cliprange)
        vf_loss, vf_clipfrac = value_loss(values, t["old_values"], t["returns"], mask, a.cliprange_value)
        ratio_mean = masked_mean(ratio, mask).detach()
        return LossOutput(pg_loss + a.vf_coef * vf_loss, {
            "policy/approxkl_avg": approxkl.detach(), "policy/clipfrac_avg": pg_clipfrac,
            "loss/policy_avg": pg_loss.detach(), "loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac,
            "val/ratio": ratio_mean, "val/ratio_var": masked_mean((ratio.detach() - ratio_mean) ** 2, mask)})

    def training_step(self) -> StepOutput:
        a = self.args
        buffer, metrics, self._samples = self.rollout()
        clock = stopwatch(self.device)
        updates = (micro_batches for _ in range(a.ppo_epochs)
                   for micro_batches in buffer.minibatches(a.num_minibatches, a.gradient_accumulation_steps))
        tokens = int(buffer.tensors["attention_mask"].sum())
        out = self.step(updates, metrics, num_samples=len(buffer), num_tokens=tokens)
        out.metrics["time/update"] = clock()
        return out

    def on_step_end(self, out: StepOutput) -> None:
        if self.global_step % self.args.log_every == 0 and self.dist.is_main:
            for s in self._samples:
                self.write(f"  sample: {s['prompt']!r} -> {s['response']!r} (score {s['score']:.2f})")
            self.log({"samples": self._samples}, "train")
            if self.wandb is not None:
                import wandb
                table = wandb.Table(columns=["prompt", "response", "score"],
                                    data=[[s["prompt"], s["response"], s["score"]] for s in self._samples])
                self.wandb.log({"train/samples_table": table}, step=self.global_step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy responses to the eval prompts, scored by the reward; on the built-in task also by its verifier (the
        held-out greedy accuracy). Batches are split across ranks like training batches."""
        window, data = MetricWindow(), self.eval_data
        batches = rank_batches(data, self.args.batch_size, self.dist.rank, self.dist.world_size)
        for mine, n_real in progress(batches, "eval", ceil_div(len(data), self.args.batch_size * self.dist.world_size)):
            prompts, responses, mask, _ = self.sample(mine, greedy=True)
            scores = self.score(mine, prompts, responses, mask)
            batch_metrics = {"scores": scores.mean(), "response_length": mask.sum(1).mean()}
            if tasks.is_task(self.args.dataset):  # the verifier, also when a reward model or function trains
                texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
                correct = tasks.reward(None, texts, [e["fields"]["answer"] for e in mine])
                batch_metrics["greedy_accuracy"] = sum(correct) / len(correct)
            window.add(batch_metrics, n_real)
        return window.reduce(self.device, rates=False)


def main(args: Args | None = None) -> PPOTrainer:
    args = args or tyro.cli(Args)
    trainer = PPOTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
