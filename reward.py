"""Reward model training: a Bradley-Terry model of pairwise preferences (Ouyang et al. 2022, eq. 1,
https://arxiv.org/abs/2203.02155), one file.

    python reward.py                                # bundled SmolLM2-135M-Instruct on the built-in arithmetic pairs
    python reward.py --dataset ../shared/data/hh_harmless_test.jsonl --max-length 256
    torchrun --nproc_per_node 8 reward.py --model path/to/sft_model --dataset prefs.jsonl

Rows are {"prompt", "chosen", "rejected"} as in dpo.py, with an optional numeric "margin" (Llama 2's margin loss).
The model is an AutoModelForSequenceClassification with one output built from a causal-LM checkpoint (its new head
initialised with std 1/sqrt(hidden + 1), as the N+ implementation details do); the reward of a sequence is the head
applied to the hidden state of its last token (the completion's end-of-turn token, so the score can tell a finished
reply from a cut one). output_dir/final loads with AutoModelForSequenceClassification.from_pretrained and is what
`ppo.py --reward-model` reads; its config's `reward_at_last_token` tells ppo.py to score there, not where transformers'
pooling would (the last token that is not pad: with pad == EOS the one before the EOS, where TRL's models score).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import tyro
from torch import nn

import tasks
from common import (Batch, BaseTrainer, LossOutput, TrainArgs, UserError, add_lora, base_of, check_flag, check_prompt,
                    check_text, check_usable_rows, load_model, pack_prefix_tree, print0, run_main, segment_forward,
                    tokenize_completions, use_segment_attention)


@dataclass
class Args(TrainArgs):
    center_rewards_coefficient: float = 0.0
    """weight of mean((r_chosen + r_rejected)^2), which keeps rewards centred on 0 (Eisenstein et al. 2023; TRL's
    name); 0 = off"""
    padding_free: bool = True
    """pack each micro-batch into one row in which each prompt appears once, shared by its chosen and rejected
    completion (exact; needs a transformers model with AttentionInterface attention); --no-padding-free pads"""
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
        check_flag(self, "center_rewards_coefficient", self.center_rewards_coefficient >= 0, "must be >= 0")


def reward_loss(
    chosen_rewards: torch.Tensor,  # [B] r(x, y_w)
    rejected_rewards: torch.Tensor,  # [B] r(x, y_l)
    margin: torch.Tensor | None = None,  # [B] required reward gap (Llama 2, eq. 2), or None
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair losses [B]: -log sigmoid(r_w - r_l - margin) (Bradley-Terry, InstructGPT eq. 1), plus
    coef * (r_w + r_l)^2, whose mean over the batch is TRL's reward-centring term."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff) + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2


class RewardModel(nn.Module):
    """The sequence classifier, called through one forward (so DDP/FSDP see it) that scores each sequence at its last
    token: transformers' own pooling finds the last token that is not pad, which is wrong when pad == EOS."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def fsdp_roots(self) -> list[nn.Module]:
        """FSDP2 gathers per root whose forward is called: this wrapper's calls the decoder and the head itself."""
        return [self]

    def head(self) -> nn.Module:
        """The linear score head (under LoRA: peft's trainable copy of it)."""
        hf = base_of(self.classifier)
        for name in ("score", "classifier"):
            m = getattr(hf, name, None)
            if isinstance(getattr(m, "original_module", m), nn.Linear):
                return m
        raise UserError(f"--model: {type(hf).__name__} has no linear `score`/`classifier` head")

    def forward(self, t: dict[str, torch.Tensor], segments: list | None = None) -> torch.Tensor:
        """-> rewards [N] fp32: the head on the hidden state at t["last"] (flat indices into the [rows x T] batch)."""
        inputs = {k: t[k] for k in ("input_ids", "position_ids", "attention_mask") if t.get(k) is not None}
        backbone = base_of(self.classifier).base_model  # the decoder (LoRA layers are injected in place)
        run = backbone if segments is None else partial(segment_forward, backbone, segments)
        hidden = run(**inputs, use_cache=False).last_hidden_state  # [rows, T, H]
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, t["last"])
        return self.head()(last)[:, 0].float()


def collate(examples: list[dict], pad_id: int, padding_free: bool) -> Batch:
    """Chosen then rejected sequences of every pair ([c_1..c_B, r_1..r_B]) in one forward; t["last"] indexes each
    sequence's last token (its EOS unless truncated) in the flattened [rows x T] hidden states, found from lengths,
    never from pad ids (pad == EOS in SmolLM2).

    padding_free: one packed row in which each prompt appears once, both completions continuing from it. Each
    sequence gets a sentinel token appended so that pack_prefix_tree reports the packed position predicting it,
    i.e. the sequence's last real token; the sentinels are leaves of the trie, so no real token attends to them."""
    seqs = [e["prompt"] + e["completions"][k] for k in (0, 1) for e in examples]
    segments = None
    if padding_free:
        tensors, segments = pack_prefix_tree([s + [0] for s in seqs], [len(s) for s in seqs])
        tensors["last"] = tensors.pop("keep")[0].nonzero()[:, 0][tensors.pop("logit_index")]
    else:
        width = max(map(len, seqs))
        tensors = {"input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs]),
                   "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                   "last": torch.tensor([i * width + len(s) - 1 for i, s in enumerate(seqs)])}
    tensors["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return Batch(tensors, num_samples=len(examples), num_tokens=sum(map(len, seqs)),
                 sources=[e["source"] for e in examples], attention_segments=segments)


class RewardTrainer(BaseTrainer):
    script_name = "reward"
    summary_keys = ("loss", "accuracy", "margin")
    args: Args

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification
        a = self.args
        # FSDP: on the meta device, each rank later reads its own rows of the checkpoint (sharding.fill_meta_shards)
        classifier = load_model(a.model, a.trust_remote_code, self.dist.local_rank,
                                auto_class=AutoModelForSequenceClassification, num_labels=1, meta=self.fsdp)
        archs = classifier.config.architectures or []
        model = RewardModel(classifier)
        if not any(x.endswith("ForSequenceClassification") for x in archs):  # a causal LM: the head is new
            # N+ detail: std 1/sqrt(hidden + 1), drawn from a generator seeded by --seed: real values even on a meta
            # model, the same head on one process and under FSDP
            head, std = model.head(), 1 / math.sqrt(classifier.config.hidden_size + 1)
            gen = torch.Generator().manual_seed(a.seed)
            head.weight = nn.Parameter(torch.randn(head.weight.shape, generator=gen) * std)
            if head.bias is not None:
                head.bias = nn.Parameter(torch.zeros(head.bias.shape))
        classifier.config.pad_token_id = self.tokenizer.pad_token_id  # ppo.py and HF pooling read it
        # scored at the last token (not HF pooling's last non-pad one): ppo.py --reward-model reads this flag
        classifier.config.reward_at_last_token = True
        model.classifier = add_lora(classifier, a, task_type="SEQ_CLS")  # the score head trains fully
        if a.padding_free:
            use_segment_attention(model.classifier)
        return model

    def hf_model(self) -> nn.Module:
        return self.model.classifier

    def setup_data(self) -> None:
        a = self.args
        train_rows, eval_rows = tasks.load_rows(a, "preference")
        self.train_data = self._tokenize(train_rows, "train")
        self.eval_data = self._tokenize(eval_rows, "eval")
        check_usable_rows(a, self.train_data, self.eval_data, eval_rows)

    def _tokenize(self, rows: list[tuple[str, dict]], split: str) -> list[dict]:
        out, truncated, dropped = [], 0, 0
        for source, row in rows:
            check_prompt(source, row.get("prompt"))
            for key in ("chosen", "rejected"):
                check_text(source, key, row.get(key), roles=("assistant",))
            margin = row.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise UserError(f"{source}: field 'margin' must be a finite number, got {margin!r}")
            ex, cut = tokenize_completions(self.tokenizer, row["prompt"], [row["chosen"], row["rejected"]],
                                           self.args.max_length, self.args.max_prompt_length, self.end_of_turn, source)
            truncated += cut and ex is not None
            dropped += ex is None
            if ex is not None:
                out.append(ex | {"source": source, "margin": float(margin)})
        print0(f"{split}: {len(out)} pairs ({truncated} truncated, {dropped} dropped: a completion would vanish "
               f"within --max-length {self.args.max_length})")
        return out

    def make_batch(self, examples: list[dict]) -> Batch:
        return collate(examples, self.tokenizer.pad_token_id, self.args.padding_free)

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        rewards = model(batch.tensors, batch.attention_segments)  # [2B]
        chosen, rejected = rewards.chunk(2)
        loss = reward_loss(chosen, rejected, batch["margin"], self.args.center_rewards_coefficient).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        return LossOutput(loss, {"loss": loss.detach(), "accuracy": (chosen > rejected).float().mean(),
                                 "margin": (chosen - rejected).mean(), "rewards/chosen": chosen.mean(),
                                 "rewards/rejected": rejected.mean()})


def main(args: Args | None = None) -> RewardTrainer:
    args = args or tyro.cli(Args)
    trainer = RewardTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
