"""The CUDA path on one GPU in one short run: every script in bf16, plain and FSDP2 (torchrun, one process), a resume
on CUDA, the DPO and GRPO benchmarks (ours) with tokens/s and MFU against the card's measured bf16 matmul peak, and
the fast test suite.

    python benchmarks/gpu_check.py --model DIR --data ../shared/data/hh_harmless_test.jsonl --out OUT   # ~6 min, H100

A model directory with a config and a tokenizer but no weights gets random weights of that shape: a GPU node without
network cannot fetch the bundled model, and throughput does not depend on the weights (random weights never emit EOS,
so every GRPO completion runs to --max-new-tokens). Writes OUT/gpu_check.md, the two benchmark tables and the logs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
from harness import REPO

SCRIPTS = ("sft", "reward", "dpo", "ppo", "grpo")
sh = harness.run_logged  # every command of the check: logged, and ended with its children on a timeout


def with_weights(model: Path, work: Path) -> tuple[str, bool]:
    """The model directory itself if it holds weights, else a copy with random weights of its config's shape."""
    if any(model.glob("*.safetensors")) or any(model.glob("*.bin")):
        return str(model), False
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    out = work / "random_model"
    shutil.copytree(model, out, dirs_exist_ok=True)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(out)
    return str(out), True


def smoke_chain(script: str, model: str, work: Path, timeout: int) -> list[dict]:
    """`python script.py` (plain) and `torchrun --nproc_per_node 1 script.py --strategy fsdp`, a few steps each on
    the built-in task; for dpo.py also an FSDP2 resume (save at step 2, kill nothing, resume 4 -> 6)."""
    common = ["--model", model, "--total-steps", "4", "--log-every", "1", "--eval-every", "0", "--save-every", "0"]
    port = 29500 + SCRIPTS.index(script)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", str(port)]
    runs = [("plain", [sys.executable, f"{script}.py"] + common),
            ("fsdp", torchrun + [f"{script}.py", "--strategy", "fsdp"] + common)]
    if script == "dpo":
        runs.append(("fsdp-resume", torchrun + ["dpo.py", "--strategy", "fsdp", "--model", model, "--log-every", "1",
                                                "--eval-every", "0", "--save-every", "2", "--total-steps", "6",
                                                "--resume"]))
    out = []
    for mode, cmd in runs:
        d = work / f"{script}-{'fsdp' if mode.startswith('fsdp') else mode}"
        cmd = cmd + ["--output-dir", str(d)]
        if mode == "fsdp" and script == "dpo":  # checkpoints at 2 and 4 for the resume that follows
            cmd[cmd.index("--save-every") + 1] = "2"
        env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        rc, wall = sh(cmd, work / f"{script}-{mode}.log", timeout, env=env)
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (
            d / "metrics.jsonl").exists() else []
        train = [r for r in recs if "train/grad_norm" in r]
        key = "eval/accuracy" if script == "reward" else "eval/greedy_accuracy"
        evals = [r for r in recs if key in r]
        out.append({"script": script, "mode": mode, "rc": rc, "wall_s": wall,
                    "last_step": train[-1].get("step") if train else None,
                    "loss": next((train[-1][k] for k in ("train/loss", "train/loss/policy_avg", "train/reward")
                                  if k in train[-1]), None) if train else None,
                    "grad_norm": train[-1].get("train/grad_norm") if train else None,
                    "eval": [r[key] for r in evals],
                    "final": (d / "final").is_dir(),
                    "tail": (work / f"{script}-{mode}.log").read_text()[-600:] if rc else ""})
    return out


def grpo_mfu(bench_dir: Path, n_params: int, peak_tflops: float) -> list[str]:
    res = json.loads((bench_dir / "results.json").read_text())
    meta, lines = res["meta"], []
    bs, g = meta["batch_size"], meta["num_generations"]
    prompt_len = int(str(meta["prompt_tokens"]).split("-")[-1])
    for name, r in res["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        gen = r["gen_tokens_mean"]
        split = r["split_median"]
        # generation: 2N per prompt token (prefill) and per generated token; the packed update: prompt once per
        # group + every completion token, 6N each (forward + backward)
        gen_flops = 2 * n_params * (bs * prompt_len + gen)
        upd_tokens = bs // g * prompt_len + gen
        upd_flops = 6 * n_params * upd_tokens
        it = r["median_s"]
        lines.append(f"| {name} | {it:.2f} | {bs / it:.1f} | {gen / split['generation']:.0f} | "
                     f"{upd_tokens / split['update']:.0f} | "
                     f"{100 * upd_flops / split['update'] / (peak_tflops * 1e12):.1f}% | "
                     f"{100 * (gen_flops + upd_flops) / it / (peak_tflops * 1e12):.1f}% | "
                     + " / ".join(f"{split[k]:.2f}" for k in ("generation", "scoring", "logprobs", "update")) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (weights optional, see above)")
    p.add_argument("--data", default="../shared/data/hh_harmless_test.jsonl", help="preference rows for bench_dpo")
    p.add_argument("--out", required=True, help="where gpu_check.md, the tables and logs.tar.gz go")
    p.add_argument("--dpo-batch-size", type=int, default=16)
    p.add_argument("--dpo-max-length", type=int, default=512)
    p.add_argument("--grpo-batch-size", type=int, default=256, help="episodes per iteration")
    p.add_argument("--grpo-max-new-tokens", type=int, default=128)
    p.add_argument("--parts", default="smoke,dpo,grpo,tests", help="comma-separated")
    p.add_argument("--smoke-timeout", type=int, default=150)
    p.add_argument("--bench-timeout", type=int, default=200, help="seconds per benchmark (the run stays < 10 min)")
    p.add_argument("--test-timeout", type=int, default=100)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # checkpoints and exports: none of it comes back
    parts = a.parts.split(",")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "no GPU (CPU run)"
    model, random_weights = with_weights(Path(a.model), work)
    n_params, n_total = harness.non_embedding_params(model)
    # best bf16 TFLOP/s of a square torch.mm loop (4096 and 8192) on this device
    peak = harness.matmul_peak(dtypes=("bf16",), reps=10)["bf16"] / 1e3 if cuda else float("nan")
    L = [f"# The CUDA path on {name}\n",
         f"- torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}; "
         f"bf16 torch.mm peak measured in this run: {peak:.0f} TFLOP/s",
         f"- model: `{a.model}` ({n_total / 1e6:.0f}M parameters, N = {n_params / 1e6:.1f}M without the input "
         f"embedding){', random weights of its shape (no weights on this node)' if random_weights else ''}\n"]
    print("\n".join(L), flush=True)

    def save() -> None:  # after every part, so a run cut short still leaves what it measured
        (out / "gpu_check.md").write_text("\n".join(L) + "\n")
        with tarfile.open(out / "logs.tar.gz", "w:gz") as t:
            for f in sorted(work.rglob("*.log")) + sorted(work.rglob("metrics.jsonl")) + sorted(work.rglob("*.json")):
                if f.stat().st_size < 5_000_000:
                    t.add(f, arcname=str(f.relative_to(work)))

    if "smoke" in parts:
        with ThreadPoolExecutor(len(SCRIPTS)) as pool:
            chains = list(pool.map(lambda s: smoke_chain(s, model, work, a.smoke_timeout), SCRIPTS))
        L += ["## Every script on CUDA, bf16, 4 steps on the built-in task (all run at once on the one GPU)\n",
              "eval = held-out greedy accuracy (reward.py: held-out pair accuracy) at the start and the end; dpo.py "
              "fsdp-resume continues the fsdp run from its step-4 checkpoint to step 6.\n",
              "| script | mode | exit | wall s | last step | loss (grpo: reward) | grad norm | eval before -> after "
              "| final/ |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for c in chains for r in c):
            fin = lambda x: "-" if x is None else f"{x:.4g}"
            ok = r["rc"] == 0 and r["grad_norm"] is not None and math.isfinite(r["grad_norm"])
            L.append(f"| {r['script']}.py | {r['mode']} | {r['rc']}{'' if ok else ' FAIL'} | {r['wall_s']:.0f} | "
                     f"{r['last_step']} | {fin(r['loss'])} | {fin(r['grad_norm'])} | "
                     f"{' -> '.join(f'{x:.3f}' for x in r['eval']) or '-'} | {'yes' if r['final'] else 'no'} |")
            if r["tail"]:
                print(f"--- {r['script']} {r['mode']} failed:\n{r['tail']}", flush=True)
        L.append("")
        print("\n".join(L[-12:]), flush=True)
        save()

    if "dpo" in parts:
        rc, wall = sh([sys.executable, "benchmarks/bench_dpo.py", "--model", model, "--data", a.data,
                       "--configs", "ours-bf16,ours-bf16-pre,ours-fp32-pre", "--batch-size", str(a.dpo_batch_size),
                       "--max-length", str(a.dpo_max_length), "--warmup-steps", "3", "--timed-steps", "8",
                       "--output", str(out / "results_dpo_gpu.md"), "--workdir", str(work / "bench_dpo")],
                      work / "bench_dpo.log", a.bench_timeout)
        L.append(f"## DPO benchmark: exit {rc}, {wall:.0f} s; table in results_dpo_gpu.md\n")
        if (out / "results_dpo_gpu.md").exists():
            table = (out / "results_dpo_gpu.md").read_text().split("\n\n| ")[1]  # the first table
            L += ["| " + table.split("\n\n")[0], ""]
        save()

    if "grpo" in parts:
        rc, wall = sh([sys.executable, "benchmarks/bench_grpo.py", "--model", model, "--configs", "ours",
                       "--batch-size", str(a.grpo_batch_size), "--num-generations", "8", "--max-new-tokens",
                       str(a.grpo_max_new_tokens), "--warmup-steps", "1", "--timed-steps", "3",
                       "--output", str(out / "results_grpo_gpu.md"), "--workdir", str(work / "bench_grpo")],
                      work / "bench_grpo.log", a.bench_timeout)
        L.append(f"## GRPO benchmark: exit {rc}, {wall:.0f} s; table in results_grpo_gpu.md\n")
        if (work / "bench_grpo" / "results.json").exists():
            L += [f"{a.grpo_batch_size} episodes per iteration ({a.grpo_batch_size // 8} prompts x 8), at most "
                  f"{a.grpo_max_new_tokens} new tokens. Update MFU = 6N x (prompt once per group + completion "
                  f"tokens) / update s; iteration MFU adds generation at 2N per prompt and generated token, over "
                  f"the whole iteration. Attention FLOPs are not counted.\n",
                  "| run | s/iteration | episodes/s | generated tokens/s | update tokens/s | update MFU | "
                  "iteration MFU | generation / scoring / log-probs / update s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            L += grpo_mfu(work / "bench_grpo", n_params, peak) + [""]
        save()

    if "tests" in parts:
        rc, wall = sh([sys.executable, "-m", "pytest", "tests", "-m", "not slow", "-q", "-x", "-p", "no:cacheprovider"],
                      work / "pytest.log", a.test_timeout)
        tail = (work / "pytest.log").read_text().strip().splitlines()[-1:]
        L.append(f"## `pytest tests -m 'not slow'` on this node: exit {rc}, {wall:.0f} s: {' '.join(tail)}\n")

    save()
    print("\n".join(L), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
