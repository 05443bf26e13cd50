"""Build dpo.py's trainer, run two optimizer steps and record, per rank, the memory plan and what the process
actually took (for tests/test_memory.py):

    python tests/memory_worker.py OUT.json [dpo.py flags]
    torchrun --nproc_per_node 2 tests/memory_worker.py OUT.json --strategy fsdp [dpo.py flags]

load: resident memory after building the trainer minus before (parameters and reference); train: the peak of two
training steps (VmHWM, reset first) minus the resident memory before them (gradients, AdamW state, gathered units);
export: the peak of the HF export (final/) minus the resident memory before it.
"""
import gc
import json
import os
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_main  # noqa: E402
from dpo import Args, DPOTrainer  # noqa: E402


def status(key: str) -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key + ":"))


def worker():
    out, rest = sys.argv[1], sys.argv[2:]
    args = tyro.cli(Args, args=rest)
    # what every run pays whatever the model's size, before the baseline: model code, tokenizer, process group
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from plumbing.models import load_tokenizer
    from plumbing.run import setup_distributed
    setup_distributed()
    load_tokenizer(args.model)
    gc.collect()
    before = status("VmRSS")
    trainer = DPOTrainer(args)
    gc.collect()
    loaded = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on
        f.write("5")
    for _ in range(2):
        trainer.training_step()
    record = {"plan": trainer.memory_plan, "load": loaded - before, "train": status("VmHWM") - loaded}
    gc.collect()
    trained = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    trainer.export()
    record |= {"export": status("VmHWM") - trained,
               "largest_tensor": max(4 * p.numel() for p in trainer.model.parameters())}
    Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(json.dumps(record))


if __name__ == "__main__":
    run_main(worker)
