"""Run DPO and save what each optimizer step saw plus the final weights (for the world-size/strategy parity tests).

    python tests/parity_worker.py OUT.pt [dpo.py flags]
    torchrun --nproc_per_node 2 tests/parity_worker.py OUT.pt --strategy fsdp [dpo.py flags]
"""
import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_main  # noqa: E402
from dpo import Args, DPOTrainer  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP shards are DTensors (a collective)


def worker():
    out, args = sys.argv[1], tyro.cli(Args, args=sys.argv[2:])
    trainer = DPOTrainer(args)
    grads, step = [], trainer.optimizer.step

    def capture(*a, **k):  # the synced gradients, after clipping, as the optimizer sees them
        grads.append({n: full(p.grad).detach().clone() for n, p in trainer.model.named_parameters()
                      if p.grad is not None})
        return step(*a, **k)
    trainer.optimizer.step = capture
    trainer.train()
    weights = {n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    if trainer.dist.is_main:
        torch.save({"grads": grads, "weights": weights, "first_step": trainer.global_step - len(grads) + 1}, out)


if __name__ == "__main__":
    run_main(worker)
