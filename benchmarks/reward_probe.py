"""Where a reward model on the built-in task gets its accuracy, and why it misses the near-miss pairs.

    python sft.py --output-dir runs/sft
    python reward.py --model runs/sft/final --learning-rate 5e-5 --total-steps 100 --output-dir runs/reward
    python benchmarks/reward_probe.py --sft runs/sft/final --reward-models runs/reward/final

On the held-out pairs of `tasks.preference_rows` (every wrong candidate per question), split into near misses
(rejected = sum +- 1 or 2, the errors an SFT model makes) and the rest (product, difference, an operand), it reports:

1. the SFT model's own log-likelihood as a classifier: log pi(chosen) > log pi(rejected);
2. a linear probe (logistic regression on the chosen - rejected difference, trained on the training pairs) of the SFT
   model's hidden state at every third layer, read at the reply's end-of-turn token (the token `reward.py` scores), at
   the answer's last token (the one before it) and averaged over the reply: can a score head read correctness off the
   SFT model without retraining the backbone, here or at another pooling?
3. each trained reward model's accuracy (scored where `reward.py` scores: the last token).

Sequences are tokenized as the scripts do (`packing.tokenize_completions`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from common import end_of_turn_ids, load_tokenizer  # noqa: E402
from packing import tokenize_completions  # noqa: E402


def pairs(tok, eot: list[int], held_out: bool) -> list[tuple[list[int], list[int], list[int], bool]]:
    """-> (prompt ids, chosen ids, rejected ids, near miss?) for every wrong candidate of every question."""
    out = []
    for loc, row in tasks.preference_rows("arithmetic", held_out, per_question=99):
        s = sum(int(x) for x in loc.split(":")[1].split("+"))
        ex, _ = tokenize_completions(tok, row["prompt"], [row["chosen"], row["rejected"]], 512, 256, eot, loc)
        out.append((ex["prompt"], *ex["completions"], abs(int(row["rejected"][0]["content"]) - s) <= 2))
    return out


@torch.no_grad()
def logp(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum().item()


POOLINGS = {  # where in the reply a probe reads the hidden state; the reply is the answer's tokens + end-of-turn
    "the end-of-turn token": lambda h, n: h[-1],
    "the answer's last token": lambda h, n: h[-2],
    "the mean over the reply": lambda h, n: h[-n:].mean(0),
}


@torch.no_grad()
def reply_hidden(model, ids: list[int], n: int) -> dict[str, torch.Tensor]:
    """pooling -> [layers + 1, H] hidden states of a sequence whose last n tokens are the reply."""
    hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return {k: torch.stack([pool(h[0].float(), n) for h in hs]) for k, pool in POOLINGS.items()}


def split_acc(correct: torch.Tensor, near: torch.Tensor) -> str:
    return f"{correct.float().mean():.2f} | {correct[near].float().mean():.2f} | {correct[~near].float().mean():.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", required=True, help="the SFT model (sft.py's final/)")
    p.add_argument("--reward-models", nargs="*", default=[], help="reward.py exports to score")
    p.add_argument("--probe-l2", type=float, default=1e-2, help="L2 weight of the linear probe")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    tok = load_tokenizer(a.sft)
    eot = end_of_turn_ids(tok, a.sft)
    train, held = pairs(tok, eot, False), pairs(tok, eot, True)
    near = torch.tensor([x[3] for x in held])
    print(f"held-out pairs: {len(held)} ({int(near.sum())} near misses); training pairs for the probe: {len(train)}")
    print("\n| classifier | all | near miss (+-1, +-2) | other |\n| --- | --- | --- | --- |")

    sft = AutoModelForCausalLM.from_pretrained(a.sft).eval()
    correct = torch.tensor([logp(sft, pr, c) > logp(sft, pr, r) for pr, c, r, _ in held])
    print(f"| SFT log-likelihood, log pi(chosen) > log pi(rejected) | {split_acc(correct, near)} |")

    def diffs(rows):  # pooling -> [N, layers + 1, H]
        out = []
        for pr, c, r, _ in rows:
            hc, hr = reply_hidden(sft, pr + c, len(c)), reply_hidden(sft, pr + r, len(r))
            out.append({k: hc[k] - hr[k] for k in POOLINGS})
        return {k: torch.stack([d[k] for d in out]) for k in POOLINGS}

    all_train, all_held = diffs(train), diffs(held)
    for pooling, layer in [(p, i) for p in POOLINGS for i in range(3, all_train[p].shape[1], 3)]:
        x, y = all_train[pooling][:, layer], all_held[pooling][:, layer]  # layer 0: the token embedding
        scale = x.std(0) + 1e-3
        x, y = x / scale, y / scale
        w = torch.zeros(x.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.softplus(-(x @ w)).mean() + a.probe_l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        print(f"| linear probe, SFT hidden state at {pooling}, layer {layer} "
              f"(train {((x @ w) > 0).float().mean():.2f}) | {split_acc((y @ w).detach() > 0, near)} |")

    for path in a.reward_models:
        rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
        head = rm.score

        @torch.no_grad()
        def score(ids):
            return head(rm.model(torch.tensor([ids])).last_hidden_state[0, -1]).item()

        correct = torch.tensor([score(pr + c) > score(pr + r) for pr, c, r, _ in held])
        print(f"| reward model `{path}` | {split_acc(correct, near)} |")


if __name__ == "__main__":
    main()
