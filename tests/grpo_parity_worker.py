"""GRPO (or online DPO) under torchrun: the gradients of one update on a fixed rollout (this rank's share of global
groups 0-3), for GRPO for every --loss-type with token- and sequence-level (GSPO) importance sampling, then a short
training run (a smoke test of the whole loop on several ranks).

    torchrun --nproc_per_node 2 tests/grpo_parity_worker.py OUT.pt [online_dpo] [the script's flags]
"""
import sys
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_main  # noqa: E402
from conftest import grads_per_variant, grpo_micro_batches, update_grads  # noqa: E402


def worker():
    out, rest = sys.argv[1], sys.argv[2:]
    if rest and rest[0] == "online_dpo":
        import online_dpo as script
        trainer = script.OnlineDPOTrainer(tyro.cli(script.Args, args=rest[1:]))
    else:
        import grpo as script
        trainer = script.GRPOTrainer(tyro.cli(script.Args, args=rest))
    rank, world = trainer.dist.rank, trainer.dist.world_size
    micro_batches = grpo_micro_batches(trainer, list(range(4))[rank::world], old_policy_shift=0.1, script=script)
    grads = grads_per_variant(trainer, micro_batches) if script.__name__ == "grpo" else {
        "update": update_grads(trainer, micro_batches)}
    # the smoke run: the tiny random model's replies rarely end, so overlong filtering would leave nothing to update
    if hasattr(trainer.args, "mask_truncated_completions"):
        trainer.args.mask_truncated_completions = False
    trainer.train()
    if trainer.dist.is_main:
        torch.save({"grads": grads}, out)


if __name__ == "__main__":
    run_main(worker)
