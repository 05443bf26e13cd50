"""On-policy distillation: Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", https://arxiv.org/abs/2306.13649), one file. Flag names and
the loss follow TRL's GKDTrainer (`lmbda`, `beta`, `temperature`, `generalized_jsd_loss`).

    python distill.py                               # context distillation of the bundled model on the built-in task
    python distill.py --teacher path/to/big_model --dataset rows.jsonl --lmbda 0.5 --beta 0.5
    torchrun --nproc_per_node 8 distill.py --model small --teacher big --dataset rows.jsonl --strategy fsdp

A step is one optimizer update (as SFT). Each row's completion is, with probability --lmbda, sampled by the student
(on-policy; decided per row from the seed and the row's place in the data stream, so the same on every world size),
else the data's own. The loss is the generalized JSD between the student's and the teacher's next-token
distributions over the whole vocabulary at every completion position, a token mean over the step's completion tokens.

Rows are SFT rows {"prompt", "completion"} (strings or chat message lists). --teacher is any model sharing the
student's tokenizer. Without --teacher, on a built-in task: context distillation (Snell et al. 2022,
https://arxiv.org/abs/2209.15189): the teacher is the bundled model itself, frozen at step 0, with --num-shots solved
examples of the task before the question; the student sees the bare question and learns to answer as if it had them.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.utils.checkpoint import checkpoint

import tasks
from common import (Batch, BaseTrainer, LossOutput, Mean, StepOutput, TrainArgs, UserError, add_lora, check_flag,
                    check_prompt, check_text, check_usable_rows, collate_completions, encode_prompt, kept_logits,
                    label_logps, load_model, load_tokenizer, print0, run_main, tokenize_completions,
                    tokenizer_difference, use_segment_attention)
from rollout import sample


@dataclass
class Args(TrainArgs):
    teacher: str | None = None
    """teacher model (a local directory or hub id) sharing the student's tokenizer; default on a built-in task: the
    student's own starting weights with --num-shots solved examples in the prompt (context distillation)"""
    lmbda: float = 0.5
    """fraction of rows whose completion the student samples (on-policy); the rest keep the data's (TRL's name)"""
    beta: float = 0.0
    """generalized JSD interpolation: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher)
    (TRL's default is 0.5; forward KL measured best for the default context distillation). The loss is its mean over
    every completion token of the step, as TRL's (the GKD paper averages per sequence first)"""
    temperature: float = 0.9
    """sampling temperature, and the temperature of both distributions in the loss (as TRL's DistillationTrainer;
    TRL's GKDTrainer samples at it but takes the loss at 1)"""
    max_new_tokens: int = 8
    """longest sampled completion (the task's replies: a number, or a short sentence)"""
    num_shots: int = 2
    """context distillation: solved training questions the teacher sees before each question"""
    padding_free: bool = True
    """pack each micro-batch into one row in which a prefix the sequences share (the teacher's few-shot examples, a
    system prompt) is computed once (exact); --no-padding-free pads to the longest sequence"""
    loss_chunk: int = 64
    """completion positions per chunk of the loss: only a chunk's logits are ever in fp32 (recomputed in backward)"""
    batch_size: int = 8
    """sequences per device per micro-batch"""
    learning_rate: float = 3e-5
    """peak AdamW learning rate"""
    total_steps: int = 20
    """optimizer steps (0 = run only the step-0 eval)"""
    warmup_steps: int = 3
    """linear warm-up steps of the scheduler"""
    eval_every: int = 0
    """steps between evals (0 = only at start and end)"""
    log_every: int = 5
    """steps between log lines / metrics.jsonl records"""

    def validate(self) -> None:
        check_flag(self, "lmbda", 0 <= self.lmbda <= 1, "must be in [0, 1]")
        check_flag(self, "beta", 0 <= self.beta <= 1, "must be in [0, 1]")
        check_flag(self, "temperature", self.temperature > 0, "must be > 0")
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        check_flag(self, "num_shots", self.num_shots >= 1, "must be >= 1")
        check_flag(self, "loss_chunk", self.loss_chunk >= 1, "must be >= 1")
        super().validate()


def _jsd_block(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
               temperature: float) -> torch.Tensor:
    """[n, V] x [n, V] -> [n] generalized JSD per position, in fp32 (the plain, un-chunked definition)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 -> fp32; fp64 (tests) stays
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    # F.kl_div(input, target, log_target=True) = sum target * (log target - input) = KL(target || input), as TRL
    if beta == 0:  # forward KL(p_T || p_S): mode covering (TRL: kl_div(student, teacher))
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:  # reverse KL(p_S || p_T): mode seeking (TRL: kl_div(teacher, student))
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    # m = beta p_T + (1 - beta) p_S in log space; JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)
    m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
    return (beta * F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True).sum(-1))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0,
                    chunk: int | None = None) -> torch.Tensor:
    """Per-token generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, Sec. 3 / eq. 2; TRL's
    generalized_jsd_loss with the same beta):

        JSD_beta(p_T || p_S) = beta KL(p_T || m) + (1 - beta) KL(p_S || m),   m = beta p_T + (1 - beta) p_S

    with p = softmax(logits / temperature) over the whole vocabulary; beta = 0 is the forward KL(p_T || p_S) and
    beta = 1 the reverse KL(p_S || p_T) (the limits of the formula itself are 0 there, so, as TRL, the edges are
    plain KLs). student_logits, teacher_logits [N, V] (any float dtype) -> [N] fp32 (fp64 for fp64 input).

    chunk: rows per chunk, each recomputed in backward (activation checkpointing), so only one chunk's fp32
    log-softmaxes exist at a time, in forward and in backward; None = one block (the plain reference)."""
    if chunk is None or chunk >= student_logits.shape[0]:
        return _jsd_block(student_logits, teacher_logits, beta, temperature)
    # split, not slice: a slice's backward writes a zero-filled [N, V] gradient per chunk, split's concatenates once
    return torch.cat([checkpoint(_jsd_block, s, t, beta, temperature, use_reentrant=False)
                      for s, t in zip(student_logits.split(chunk), teacher_logits.split(chunk))])


TEACHER_KEYS = ("input_ids", "attention_mask", "position_ids", "keep", "logit_index")


def few_shot_prompt(task: str, q: tuple[int, ...], num_shots: int) -> list[dict]:
    """The teacher's prompt for context distillation: num_shots solved training questions (fixed, never q itself),
    then q, as one chat conversation. The solved replies are sentences ("The answer is 12."): a small model adds up
    better after a few words than with the number as its first token (the verifier reads the first integer anyway)."""
    pool = tasks.questions(task, held_out=False)
    shots = [s for s in random.Random(7).sample(pool, num_shots + 1) if s != q][:num_shots]
    turns = [m for s in shots for m in tasks.prompt(s) + [{"role": "assistant", "content": f"The answer is {sum(s)}."}]]
    return turns + tasks.prompt(q)


@dataclass
class DistillBatch(Batch):
    teacher_attention_segments: list | None = field(default=None)
    """attention segments of the teacher's packed row (its prompts differ from the student's)"""


class DistillTrainer(BaseTrainer):
    script_name = "distill"
    summary_keys = ("loss", "greedy_accuracy")
    args: Args

    @property
    def context_distillation(self) -> bool:
        return self.args.teacher is None

    def build_model(self) -> nn.Module:
        a = self.args
        student = super().build_model()
        if a.padding_free:
            use_segment_attention(student)  # before the copy: a context-distillation teacher inherits it
        if self.context_distillation:
            if not tasks.is_task(a.dataset):
                raise UserError(f"--dataset {a.dataset}: pass --teacher (context distillation without one needs a "
                                f"built-in task's solved examples: --dataset {' or '.join(tasks.TASKS)})")
            student = add_lora(student, a)
            self.init_reference(student)  # the teacher: the student at step 0 (under LoRA: adapters off)
            self.teacher_model = None
            return student
        # the same tokenizer (the same ids for the same text), not merely as many rows: the loss compares
        # distributions id by id
        teacher_tok = load_tokenizer(a.teacher, a.trust_remote_code, self.dist.local_rank, flag="--teacher")
        if why := tokenizer_difference(self.tokenizer, teacher_tok):
            raise UserError(f"--teacher {a.teacher}: its tokenizer is not the student's ({why}); the teacher must "
                            f"share the student's tokenizer")
        teacher = load_model(a.teacher, a.trust_remote_code, self.dist.local_rank, flag="--teacher", meta=self.fsdp)
        # embeddings padded past the tokenizer (Qwen2.5 0.5B: 151936 rows, 7B: 152064) are fine: rows that no token
        # maps to are never used, and the loss compares the first `vocab` logits of both
        rows = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
        self.vocab = min(rows)
        if self.vocab < len(self.tokenizer):
            raise UserError(f"--teacher {a.teacher}: {rows[1]} output rows (the student: {rows[0]}) for a tokenizer of "
                            f"{len(self.tokenizer)} tokens: a model without a row for every token")
        if a.padding_free:
            use_segment_attention(teacher)
        self.teacher_model = self.freeze(teacher)  # placed, and under FSDP sharded, like the student
        return add_lora(student, a)

    @contextlib.contextmanager
    def teacher(self):
        """The teacher's model: --teacher, or for context distillation the student as it started (the reference)."""
        if self.teacher_model is not None:
            yield self.teacher_model
        else:
            with self.reference() as ref:
                yield ref

    def setup_data(self) -> None:
        a = self.args
        train_rows, eval_rows = tasks.load_rows(a, "sft")
        self.train_data = self._tokenize(train_rows, "train")
        self.eval_data = self._tokenize(eval_rows, "eval")
        check_usable_rows(a, self.train_data, self.eval_data, eval_rows)

    def _tokenize(self, rows: list[tuple[str, dict]], split: str) -> list[dict]:
        a, out, truncated, dropped = self.args, [], 0, 0
        for source, row in rows:
            check_prompt(source, row.get("prompt"))
            check_text(source, "completion", row.get("completion"), roles=("assistant",))
            ex, cut = tokenize_completions(self.tokenizer, row["prompt"], [row["completion"]], a.max_length,
                                           a.max_prompt_length, self.end_of_turn, source)
            truncated += cut and ex is not None
            dropped += ex is None
            if ex is None:
                continue
            teacher_prompt = ex["prompt"]
            if self.context_distillation:  # the task's rows carry their question's operands
                q = tuple(row["operands"])
                teacher_prompt = encode_prompt(self.tokenizer, few_shot_prompt(a.dataset, q, a.num_shots), source)
            out.append({"source": source, "prompt": ex["prompt"], "teacher_prompt": teacher_prompt,
                        "completion": ex["completions"][0], "on_policy": False})
        print0(f"{split}: {len(out)} rows ({truncated} truncated, {dropped} dropped: the completion would vanish "
               f"within --max-length {a.max_length})")
        return out

    def make_batch(self, examples: list[dict]) -> Batch:
        """Two right-padded batches with the same completions: the student's (plain prompt) and the teacher's
        (its own prompt, e.g. few-shot), so their kept logits line up position for position."""
        pad, packed = self.tokenizer.pad_token_id, self.args.padding_free
        student, segments = collate_completions([(e["prompt"], e["completion"]) for e in examples], pad, packed)
        teacher, teacher_segments = collate_completions([(e["teacher_prompt"], e["completion"]) for e in examples],
                                                        pad, packed)
        tensors = student | {f"teacher_{k}": v for k, v in teacher.items() if k in TEACHER_KEYS}
        tensors["on_policy"] = torch.tensor([e["on_policy"] for e in examples])
        return DistillBatch(tensors, len(examples), student["input_ids"].numel() if packed else
                            int(student["attention_mask"].sum()), sources=[e["source"] for e in examples],
                            attention_segments=segments, teacher_attention_segments=teacher_segments)

    def on_policy(self, position: int) -> bool:
        """Whether the row at this place of the data stream gets a sampled completion: seeded per position (string
        seeds are hashed with SHA-512), so every world size and a resumed run decide the same."""
        return random.Random(f"{self.args.seed}:{position}").random() < self.args.lmbda

    @torch.no_grad()
    def sample_completions(self, rows: list[dict]) -> None:
        """Replace each row's completion by one the student samples at --temperature (up to its end of turn)."""
        if not rows and not self.fsdp:
            return
        batch = rows or [dict(self.train_data[0])]  # FSDP: every rank takes part in every generation
        ro = sample(self, [{"prompt_ids": e["prompt"], "source": e["source"]} for e in batch])
        for e, c, n in zip(rows, ro.completions.tolist(), ro.lengths.tolist()):
            e["completion"] = c[:min(n, self.args.max_length - len(e["prompt"]))]

    def training_step(self) -> StepOutput:
        a, world = self.args, self.dist.world_size
        micro = []
        for _ in range(a.gradient_accumulation_steps):
            start = self.sampler.consumed  # this rank's rows sit at start + rank, start + rank + world, ...
            indices = self.sampler.next_indices()
            micro.append([self.train_data[i] | {"on_policy": self.on_policy(start + self.dist.rank + k * world)}
                          for k, i in enumerate(indices)])
        self.sample_completions([e for m in micro for e in m if e["on_policy"]])
        return self.update([self.make_batch(m).to(self.device) for m in micro])

    def compute_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        a, t = self.args, batch.tensors
        with torch.no_grad(), self.teacher() as teacher:
            teacher_logits = kept_logits(teacher, {k: t.get(f"teacher_{k}") for k in TEACHER_KEYS},
                                         batch.teacher_attention_segments)  # [N, V]
        student_logits = kept_logits(model, t, batch.attention_segments)  # [N, V]: the same tokens, the same order
        if self.teacher_model is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
            # padded embeddings: the rows past the tokenizer's tokens are never used (build_model)
            student_logits, teacher_logits = student_logits[:, :self.vocab], teacher_logits[:, :self.vocab]
        per_token = generalized_jsd(student_logits, teacher_logits, a.beta, a.temperature, a.loss_chunk)  # [N]
        token_sum, n = per_token.sum(), len(per_token)
        with torch.no_grad():  # mean per-token log-probs of the completion tokens under the loss's distributions
            student_logps = label_logps(student_logits.detach(), t["labels"], a.temperature).sum()
            teacher_logps = label_logps(teacher_logits, t["labels"], a.temperature).sum()
        metrics = {"loss": Mean(token_sum.detach(), n), "student_logps": Mean(student_logps, n),
                   "teacher_logps": Mean(teacher_logps, n),
                   "on_policy_fraction": Mean(t["on_policy"].float().sum(), batch.num_samples),
                   "completions/mean_length": Mean(float(n), batch.num_samples)}
        return LossOutput(Mean(token_sum, n), metrics)  # the mean over the update's completion tokens

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate() if self.eval_data else {}
        return metrics | tasks.greedy_eval(self)


def main(args: Args | None = None) -> DistillTrainer:
    args = args or tyro.cli(Args)
    trainer = DistillTrainer(args)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_main(main)
