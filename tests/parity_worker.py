"""Run DPO for a few steps and save what each optimizer step saw (for the world-size parity tests).

    python tests/parity_worker.py GRADS_OUT [dpo.py flags]
    torchrun --nproc_per_node 2 tests/parity_worker.py GRADS_OUT [dpo.py flags]
"""
import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_main  # noqa: E402
from dpo import Args, DPOTrainer  # noqa: E402


def worker():
    out, args = sys.argv[1], tyro.cli(Args, args=sys.argv[2:])
    trainer = DPOTrainer(args)
    grads, step = [], trainer.optimizer.step

    def capture(*a, **k):  # the synced gradients, after clipping, as the optimizer sees them
        grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
        return step(*a, **k)
    trainer.optimizer.step = capture
    trainer.train()
    if trainer.dist.is_main:
        torch.save({"grads": grads, "weights": trainer.model.state_dict()}, out)


if __name__ == "__main__":
    run_main(worker)
