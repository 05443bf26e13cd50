"""The memory plan printed at start (common.memory_plan) against what processes actually take on CPU."""
import json
import subprocess
import sys

import pytest

from plumbing.sharding import memory_plan
from conftest import ENV, ROOT, build_tokenizer

GB = 1e9


def test_memory_plan_parts():
    """fp32 parameters, gradients and AdamW's two moments of what trains, the frozen models at their own sizes; FSDP
    divides each by the world size and adds the largest gathered unit (a frozen model's too); LoRA trains only the
    adapters; a bf16 frozen model keeps fp32 embeddings."""
    one = memory_plan(1000, 1000, 1, "ddp", "fp32", frozen=[(1000, 0)])
    assert (one["parameters"], one["gradients"], one["adamw"], one["reference"]) == (4000, 4000, 8000, 4000)
    assert one["per_rank"] == one["all_ranks"] == 20000
    fsdp = memory_plan(1000, 1000, 4, "fsdp", "fp32", frozen=[(1000, 0)], largest_unit=100)
    assert (fsdp["parameters"], fsdp["reference"], fsdp["gathered"]) == (1000, 1000, 1200)
    assert fsdp["per_rank"] == 20000 / 4 + 1200 and fsdp["all_ranks"] == 4 * fsdp["per_rank"]
    ddp = memory_plan(1000, 1000, 2, "ddp", "fp32")
    assert ddp["gradients"] == 8000 and ddp["parameters"] == 4000  # replicated, gradient buckets
    lora = memory_plan(1000, 10, 1, "ddp", "bf16")
    assert (lora["gradients"], lora["adamw"], lora["reference"]) == (40, 80, 0)
    bf16 = memory_plan(1000, 1000, 1, "ddp", "bf16", frozen=[(1000, 100)])
    assert bf16["reference"] == 4 * 100 + 2 * 900
    # a teacher of another size counts at its own size, and its own largest unit when it is the larger one
    teacher = memory_plan(1000, 1000, 2, "fsdp", "fp32", frozen=[(30000, 0)], largest_unit=100,
                          largest_frozen_unit=3000)
    assert teacher["reference"] == 4 * 30000 / 2 and teacher["gathered"] == 4 * 3000 * 2


def _big_model(d):
    """57M parameters (0.23 GB fp32): large enough that model state dominates a process's fixed costs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=8192, hidden_size=768, intermediate_size=2112, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=3, tie_word_embeddings=True, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1,
        bos_token_id=None)).save_pretrained(d)
    tok.save_pretrained(d)


@pytest.mark.slow
def test_memory_plan_matches_measured_memory(pairs_file, tmp_path):
    """DPO (policy + reference), fp32, one process and FSDP x2 (gloo): resident memory taken by building the trainer
    is the plan's parameters + reference, and the peak over two training steps is its gradients + AdamW (+ the
    gathered unit), each within -5% / +25% (load) and -5% / +50% (train: activations and optimizer temporaries are
    not planned); FSDP x2 takes at most 0.7x of one process per rank (0.5x of the planned state plus a gathered unit;
    activations and temporaries do not shrink with ranks, and one process's own peak varies by ~0.1 GB run to run).
    The export (final/) streams one tensor at a time: no rank, rank 0 included, holds the whole model (0.23 GB) for
    it: each takes at most two copies of the largest tensor (the embedding, 25 MB) plus 40 MB."""
    _big_model(tmp_path / "model")
    flags = [f"--model={tmp_path / 'model'}", f"--dataset={pairs_file}", "--precision=fp32", "--batch-size=1",
             "--max-length=64", "--max-prompt-length=32", "--total-steps=2", "--eval-size=4", "--save-every=0",
             "--eval-every=0", "--no-padding-free"]
    runs = {"single": ([sys.executable], []),
            "fsdp": (["torchrun", "--nproc_per_node=2", "--master_port=29591"], ["--strategy=fsdp"])}
    measured = {}
    for name, (launcher, extra) in runs.items():
        out = tmp_path / f"{name}.json"
        r = subprocess.run(launcher + ["tests/memory_worker.py", str(out)] + flags + extra +
                           [f"--output-dir={tmp_path / name}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "memory plan per rank" in r.stdout
        measured[name] = [json.loads((tmp_path / f"{name}.json.{rank}").read_text())
                          for rank in range(1 if name == "single" else 2)]
    for name, ranks in measured.items():
        for m in ranks:
            p = m["plan"]
            load, train = p["parameters"] + p["reference"], p["gradients"] + p["adamw"] + p["gathered"]
            assert 0.95 * load <= m["load"] <= 1.25 * load, (name, m["load"] / GB, load / GB)
            assert 0.95 * train <= m["train"] <= 1.5 * train, (name, m["train"] / GB, train / GB)
    for name, ranks in measured.items():
        for rank, m in enumerate(ranks):
            assert m["export"] <= 2 * m["largest_tensor"] + 40e6, (name, rank, m["export"] / GB)
    single = measured["single"][0]
    for m in measured["fsdp"]:
        ratio = (m["load"] + m["train"]) / (single["load"] + single["train"])
        assert ratio <= 0.7, (ratio, m, single)
