"""World size and strategy parity on CPU/gloo: 1 process (doubled batch) == DDP x2 == FSDP2 x2, on the gradients
themselves and the logged grad_norm (AdamW is nearly blind to gradient scale, so weights alone would not catch a
sum-instead-of-mean reduction); FSDP checkpoints resume under FSDP x2 and under 1 process; the HF export (streamed one
tensor at a time) of every run is what save_pretrained writes for its weights, byte for byte, and loads."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, checkpoint_weights, read_metrics, same_files, tensors
from conftest import ENV, tiny_flags

pytestmark = pytest.mark.slow


SHARDS = "40KB"  # the tiny model (~0.1 MB) in several safetensors shards plus their index


def launch(out_pt, run_dir, model, data, nproc=1, port=29541, env=(), **kw):
    flags = tiny_flags(model, data, run_dir, total_steps=4, save_every=2, keep_checkpoints=5, eval_every=4, **kw)
    prefix = [sys.executable] if nproc == 1 else ["torchrun", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    r = subprocess.run(prefix + ["tests/parity_worker.py", str(out_pt)] + flags, cwd=ROOT, env=ENV | dict(env),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, [ln for ln in r.stderr.splitlines() if "error" in ln.lower()][:5] + [r.stderr[-2000:]]
    return torch.load(out_pt)


def saved_by_transformers(model_dir, weights: dict, out, lora_r: int = 0, **save_kw):
    """What save_pretrained (under LoRA: of peft's merge_and_unload(); out/adapter: peft's save_pretrained) writes for a
    run's final weights (its named parameters: a tied weight once)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
    if lora_r:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out, **save_kw)
    return out


def assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=2e-4, atol=1e-6, msg=lambda m: f"{what} {n}: {m}")


def test_single_ddp_fsdp_parity_resume_and_export(tiny_model_dir, pairs_file, tmp_path):
    # precomputed reference log-probs: under DDP/FSDP each rank computes a share and all gather them
    # no clipping: clipped gradients would hide a sum-instead-of-mean reduction from the gradient comparison
    common = dict(model=tiny_model_dir, data=pairs_file, gradient_accumulation_steps=2, precompute_ref_logps=True,
                  max_grad_norm=0.0, learning_rate=1e-4)
    shards = {"CLEANRL_RLHF_MAX_SHARD_SIZE": SHARDS}
    single = launch(tmp_path / "single.pt", tmp_path / "single", batch_size=4, env=shards, **common)
    ddp = launch(tmp_path / "ddp.pt", tmp_path / "ddp", nproc=2, batch_size=2, strategy="ddp", **common)
    fsdp = launch(tmp_path / "fsdp.pt", tmp_path / "fsdp", nproc=2, batch_size=2, strategy="fsdp", env=shards, **common)
    for name, run in (("ddp", ddp), ("fsdp", fsdp)):
        assert len(run["grads"]) == len(single["grads"]) == 4
        for step, (g1, g2) in enumerate(zip(single["grads"], run["grads"]), 1):
            assert_same(g1, g2, f"{name} grads step {step}")
        assert_same(single["weights"], run["weights"], f"{name} weights")
        m1 = [m for m in read_metrics(tmp_path / "single") if "train/grad_norm" in m]
        m2 = [m for m in read_metrics(tmp_path / name) if "train/grad_norm" in m]
        assert len(m1) == len(m2) == 4
        for x, y in zip(m1, m2):
            for k in ("train/grad_norm", "train/loss", "train/rewards/margins"):
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (name, k)
        ev1 = [m for m in read_metrics(tmp_path / "single") if "eval/loss" in m]
        ev2 = [m for m in read_metrics(tmp_path / name) if "eval/loss" in m]
        assert [m["eval/loss"] for m in ev1] == pytest.approx([m["eval/loss"] for m in ev2], rel=1e-5)

    # interrupted after the step-2 checkpoint, resumed under FSDP x2 and under 1 process: same continuation
    for name, nproc, bs, strategy in (("resume_fsdp", 2, 2, "fsdp"), ("resume_single", 1, 4, "ddp")):
        run_dir = tmp_path / name
        shutil.copytree(tmp_path / "fsdp", run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
        shutil.rmtree(run_dir / "final")
        resumed = launch(tmp_path / f"{name}.pt", run_dir, nproc=nproc, batch_size=bs, strategy=strategy, resume=True,
                         port=29543, **common)
        assert resumed["first_step"] == 3
        for step, (g1, g2) in enumerate(zip(fsdp["grads"][2:], resumed["grads"]), 3):
            assert_same(g1, g2, f"{name} grads step {step}")
        assert_same(fsdp["weights"], resumed["weights"], f"{name} weights")

    # the export: save_pretrained's files for the same weights, byte for byte: shards and index (single and FSDP:
    # SHARDS), the tied embedding once (FSDP wrote lm_head.weight beside it), configs; it loads, and FSDP's equals
    # the one-process export tensor for tensor (as its weights do)
    for name, run, kw in (("single", single, {"max_shard_size": SHARDS}), ("ddp", ddp, {}),
                          ("fsdp", fsdp, {"max_shard_size": SHARDS})):
        same_files(tmp_path / name / "final", saved_by_transformers(tiny_model_dir, run["weights"],
                                                                    tmp_path / f"{name}_ref", **kw))
        assert "lm_head.weight" not in tensors(tmp_path / name / "final")
    assert (tmp_path / "fsdp" / "final" / "model.safetensors.index.json").exists()
    assert_same(tensors(tmp_path / "single" / "final"), tensors(tmp_path / "fsdp" / "final"), "export")
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    assert_same({n: p.detach() for n, p in exported.named_parameters()}, fsdp["weights"], "fsdp export")


def test_lora_parity_across_world_sizes_resume_and_export(tiny_model_dir, pairs_file, tmp_path):
    """LoRA (reference = adapters off): the adapters' gradients agree for 1 process x batch 4, DDP x2 and FSDP x2;
    the FSDP run resumed from its step-2 checkpoint (adapters and their AdamW state only) on 1 process continues
    exactly; the merged export (merged one tensor at a time) is peft's merge_and_unload() saved, and final/adapter
    peft's own save_pretrained, byte for byte, and equals base + adapter."""
    common = dict(model=tiny_model_dir, data=pairs_file, lora_r=4, max_grad_norm=0.0, learning_rate=1e-3)
    single = launch(tmp_path / "single.pt", tmp_path / "single", batch_size=4, **common)
    assert single["grads"][0] and all("lora_" in n for n in single["grads"][0])
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp")):
        run = launch(tmp_path / f"{name}.pt", tmp_path / name, nproc=2, batch_size=2, strategy=strategy, port=29545,
                     **common)
        for step, (g1, g2) in enumerate(zip(single["grads"], run["grads"]), 1):
            assert_same(g1, g2, f"lora {name} grads step {step}")
        assert_same(single["weights"], run["weights"], f"lora {name} weights")
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_00000002"
    saved = {k for k in checkpoint_weights(ckpt)}
    assert saved and all("lora_" in k for k in saved)  # the frozen base is not copied into checkpoints
    run_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    shutil.rmtree(run_dir / "final")
    resumed = launch(tmp_path / "resumed.pt", run_dir, batch_size=4, resume=True, **common)
    for step, (g1, g2) in enumerate(zip(single["grads"][2:], resumed["grads"]), 3):
        assert_same(g1, g2, f"lora resumed grads step {step}")
    assert_same(single["weights"], resumed["weights"], "lora resumed weights")

    for name in ("single", "fsdp"):
        run = single if name == "single" else torch.load(tmp_path / "fsdp.pt")
        ref = saved_by_transformers(tiny_model_dir, run["weights"], tmp_path / f"{name}_ref", lora_r=4)
        same_files(tmp_path / name / "final", ref)
        same_files(tmp_path / name / "final" / "adapter", ref / "adapter", skip=("README.md",))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        tmp_path / "fsdp" / "final" / "adapter")
    ids = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_fsdp_generation_equals_single_process(tiny_model_dir, tmp_path):
    """Greedy eval on the built-in task (sft.py, --total-steps 0): FSDP x2 from meta-device shards, one unit gathered
    at a time (the default) and the whole model gathered once (--gather-for-generation), replies exactly as one
    process's; each prints its memory plan."""
    flags = [f"--model={tiny_model_dir}", "--precision=fp32", "--total-steps=0", "--batch-size=4", "--max-length=64"]
    replies = {}
    for name, prefix, extra in (
            ("single", [sys.executable], []),
            ("fsdp", ["torchrun", "--nproc_per_node=2", "--master_port=29547"], ["--strategy=fsdp"]),
            ("gather", ["torchrun", "--nproc_per_node=2", "--master_port=29549"],
             ["--strategy=fsdp", "--gather-for-generation"])):
        r = subprocess.run(prefix + ["sft.py"] + flags + extra + [f"--output-dir={tmp_path / name}"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "memory plan per rank" in r.stdout
        (line,) = [ln for ln in r.stdout.splitlines() if "sample replies:" in ln]
        replies[name] = dict(item.split(" -> ", 1) for item in line.split("sample replies: ", 1)[1].split("; "))
    assert replies["fsdp"] == replies["gather"]
    shared = replies["single"].keys() & replies["fsdp"].keys()  # rank 0 answers every other question
    assert shared and all(replies["single"][q] == replies["fsdp"][q] for q in shared)
