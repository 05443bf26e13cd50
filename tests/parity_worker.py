"""Run a script's trainer and save what each optimizer step saw plus the final weights (for the world-size/strategy
parity tests). The script defaults to dpo.

    python tests/parity_worker.py OUT.pt [SCRIPT] [its flags]
    torchrun --nproc_per_node 2 tests/parity_worker.py OUT.pt sft --strategy fsdp [sft.py flags]
"""
import importlib
import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BaseTrainer, run_main  # noqa: E402
from conftest import capture_grads, full  # noqa: E402


def worker():
    out, rest = sys.argv[1], sys.argv[2:]
    script = rest.pop(0) if rest and not rest[0].startswith("-") else "dpo"
    module = importlib.import_module(script)
    trainer_cls = next(v for v in vars(module).values()
                       if isinstance(v, type) and issubclass(v, BaseTrainer) and v is not BaseTrainer)
    trainer = trainer_cls(tyro.cli(module.Args, args=rest))
    grads = capture_grads(trainer)
    trainer.train()
    weights = {n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    if trainer.dist.is_main:
        torch.save({"grads": grads, "weights": weights, "first_step": trainer.global_step - len(grads) + 1}, out)


if __name__ == "__main__":
    run_main(worker)
