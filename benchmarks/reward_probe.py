"""Where a reward model on the built-in task gets its accuracy, and why it misses the near-miss pairs.

    python sft.py --output-dir runs/sft
    python reward.py --model runs/sft/final --learning-rate 5e-5 --total-steps 100 --output-dir runs/reward
    python benchmarks/reward_probe.py --sft runs/sft/final --reward-models runs/reward/final

On the held-out pairs of `tasks.preference_rows` (every wrong candidate per question), split into near misses
(rejected = sum +- 1 or 2, the errors an SFT model makes) and the rest (product, difference, an operand), it reports:

1. the SFT model's own log-likelihood as a classifier: log pi(chosen) > log pi(rejected);
2. a linear probe (logistic regression on the chosen - rejected difference, trained on the training pairs) of the SFT
   model's hidden state at the reply's end-of-turn token, the token `reward.py` scores, at every third layer: can a
   score head read correctness off the SFT model without retraining the backbone?
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


@torch.no_grad()
def last_hidden(model, ids: list[int]) -> torch.Tensor:
    """[layers + 1, H] hidden states at the last token (the reply's end-of-turn token)."""
    hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1].float() for h in hs])


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

    def diffs(rows):  # [N, layers + 1, H]
        return torch.stack([last_hidden(sft, pr + c) - last_hidden(sft, pr + r) for pr, c, r, _ in rows])

    d_train, d_held = diffs(train), diffs(held)
    for layer in range(3, d_train.shape[1], 3):  # layer 0 is the token embedding: the same for both
        x, y = d_train[:, layer], d_held[:, layer]
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
        print(f"| linear probe, SFT hidden state at the end-of-turn token, layer {layer} "
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
