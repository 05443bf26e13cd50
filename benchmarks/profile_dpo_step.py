"""Where one bf16 DPO step of the benchmark goes, by operator (torch.profiler), next to the machine's matmul peak.

    python benchmarks/profile_dpo_step.py                       # bench_dpo's rows and settings, --precompute-ref-logps
    python benchmarks/profile_dpo_step.py --precision fp32 --steps 3

Same rows, batch and truncation as bench_dpo.py (the first batch x (warm-up + profiled) HH rows whose prompt is
shorter than --max-length). Prints the operators by self CPU time, grouped as matmul (mm/addmm/bmm/linear and the
sdpa kernels) vs the rest, and the step's HFU against the peak measured here.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import harness
from harness import REPO

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::linear", "aten::matmul")


def group(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul (mm/addmm/bmm)"
    if "scaled_dot_product" in name:
        return "attention kernels (sdpa)"
    if name in ("aten::copy_", "aten::_to_copy", "aten::to"):
        return "dtype casts and copies"
    if "adamw" in name.lower() or "_fused_adam" in name:
        return "optimizer (fused AdamW)"
    if name.startswith("_LabelLogProb") or name in ("aten::logsumexp", "aten::exp", "aten::gather",
                                                     "aten::scatter_add_"):
        return "log-prob (logsumexp/exp/gather)"
    if name in ("aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::silu", "aten::silu_backward", "aten::neg",
                "aten::cat", "aten::pow", "aten::rsqrt", "aten::mean", "aten::sum", "aten::div", "aten::sub",
                "aten::index_select", "aten::index", "aten::embedding_dense_backward", "aten::fill_", "aten::zero_",
                "aten::zeros", "aten::empty", "aten::index_add_"):
        return "elementwise / reductions / indexing"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hh_harmless_test.jsonl"))
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--no-precompute", action="store_true", help="run the reference forward inside the step")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--cudnn-sdp", default="on", choices=["on", "off"], help="CUDA: allow cuDNN's sdpa kernels")
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(a.cudnn_sdp == "on")

    model_dir = harness.default_model(a.model)
    import dpo
    n = a.batch_size * (a.warmup_steps + a.steps)
    rows, _ = harness.select_rows(Path(a.data), model_dir, n + 1, a.max_length)
    work = Path(tempfile.mkdtemp(prefix="profile_dpo_"))
    args = dpo.Args(model=model_dir, dataset=harness.write_jsonl(work / "rows.jsonl", rows[:n]),
                    eval_dataset=harness.write_jsonl(work / "eval.jsonl", rows[n:]),
                    output_dir=str(work / "out"), total_steps=a.warmup_steps + a.steps, batch_size=a.batch_size,
                    max_length=a.max_length, max_prompt_length=a.max_length, precision=a.precision,
                    learning_rate=1e-6, warmup_steps=0, precompute_ref_logps=not a.no_precompute)
    trainer = dpo.DPOTrainer(args)
    trainer.sampler = harness.SequentialSampler(len(trainer.train_data), a.batch_size)  # file order, as bench_dpo
    computed = []
    harness.on_batch(trainer, lambda b: computed.append(b["input_ids"].numel()))
    for _ in range(a.warmup_steps):
        trainer.training_step()
    computed.clear()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(a.steps):
            trainer.training_step()
        if cuda:
            torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / a.steps
    peaks = harness.matmul_peak()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups = defaultdict(float)
    for e in events:
        groups[group(e.key)] += e.self_cpu_time_total
    n_params = sum(p.numel() for n_, p in trainer.model.named_parameters() if "embed_tokens" not in n_)
    coef = 6 + 2 * a.no_precompute
    hfu = coef * n_params * (sum(computed) / a.steps) / step_s / (peaks[a.precision] * 1e9)
    print(f"\n{a.precision} DPO step: {step_s:.3f} s (profiled, {a.steps} steps), {sum(computed) / a.steps:.0f} "
          f"computed tokens/step, matmul peak {peaks[a.precision]:.0f} GFLOP/s -> HFU {100 * hfu:.1f}% "
          f"(profiler overhead included)")
    print("\n| group | share of self CPU time |\n| --- | --- |")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {100 * t / total:.1f}% |")
    print("\n| operator | self CPU ms/step | share | calls/step |\n| --- | --- | --- | --- |")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / a.steps:.1f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count // a.steps} |")
    if cuda:  # where the GPU's own time goes
        dev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        dev_total = sum(e.self_device_time_total for e in dev)
        print(f"\nGPU busy {dev_total / 1e3 / a.steps:.1f} ms/step of {1e3 * step_s:.1f} ms (cuDNN sdpa {a.cudnn_sdp})")
        print("\n| operator | self GPU ms/step | share | calls/step |\n| --- | --- | --- | --- |")
        for e in sorted(dev, key=lambda e: -e.self_device_time_total)[:a.top]:
            print(f"| `{e.key}` | {e.self_device_time_total / 1e3 / a.steps:.1f} | "
                  f"{100 * e.self_device_time_total / dev_total:.1f}% | {e.count // a.steps} |")


if __name__ == "__main__":
    main()
