"""The CUDA path on one GPU in one short run: every script in bf16, plain and FSDP2 (torchrun, one process), a resume,
bench_dpo.py and bench_grpo.py (ours) with tokens/s and MFU against the card's measured bf16 peak, the fast tests.

    python benchmarks/gpu_check.py --model DIR --data ../shared/data/hh_harmless_test.jsonl --out OUT   # ~6 min, H100

A model directory without weights gets random weights of its shape (a GPU node without network cannot fetch the
bundled model; random weights never emit EOS, so every GRPO completion runs to the token cap). Writes
OUT/gpu_check.md, the two benchmark tables and logs.tar.gz.
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

SCRIPTS = ("sft", "reward", "dpo", "ppo", "grpo")
DPO = {"batch": 16, "max_length": 512}
GRPO = {"episodes": 256, "max_new_tokens": 128}  # 32 prompts x 8
TIMEOUT = {"smoke": 150, "bench": 200, "tests": 100}  # seconds each, so that the run stays under 10 minutes
sh = harness.run_logged  # every command: logged, and ended with its children on a timeout


def with_weights(model: Path, work: Path) -> tuple[str, bool]:
    """The model directory itself if it holds weights, else a copy with random weights of its config's shape."""
    if any(model.glob("*.safetensors")) or any(model.glob("*.bin")):
        return str(model), False
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    shutil.copytree(model, out := work / "random_model", dirs_exist_ok=True)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(out)
    return str(out), True


def smoke_chain(script: str, model: str, work: Path) -> list[dict]:
    """`python script.py` and `torchrun --nproc_per_node 1 script.py --strategy fsdp`, 4 steps each on the built-in
    task; for dpo.py also an FSDP2 resume from the fsdp run's step-4 checkpoint to step 6."""
    flags = ["--model", model, "--total-steps", "4", "--log-every", "1", "--eval-every", "0", "--save-every", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port",
                str(29500 + SCRIPTS.index(script))]
    runs = [("plain", [sys.executable, f"{script}.py"] + flags),
            ("fsdp", torchrun + [f"{script}.py", "--strategy", "fsdp"] + flags)]
    if script == "dpo":
        runs[1][1][-1] = "2"  # --save-every 2: checkpoints for the resume
        runs.append(("fsdp-resume", torchrun + ["dpo.py", "--strategy", "fsdp"] + flags[:2] + [
            "--total-steps", "6", "--log-every", "1", "--eval-every", "0", "--save-every", "2", "--resume"]))
    out, key = [], "eval/accuracy" if script == "reward" else "eval/greedy_accuracy"
    for mode, cmd in runs:
        d, log = work / f"{script}-{mode.split('-')[0]}", work / f"{script}-{mode}.log"
        rc, wall = sh(cmd + ["--output-dir", str(d)], log, TIMEOUT["smoke"],
                      env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        recs = harness.read_jsonl(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
        last = ([r for r in recs if "train/grad_norm" in r] or [{}])[-1]
        out.append({"script": script, "mode": mode, "rc": rc, "wall_s": wall, "last_step": last.get("step"),
                    "loss": next((last[k] for k in ("train/loss", "train/loss/policy_avg", "train/reward")
                                  if k in last), None), "grad_norm": last.get("train/grad_norm"),
                    "eval": [r[key] for r in recs if key in r], "final": (d / "final").is_dir(),
                    "tail": log.read_text()[-600:] if rc else ""})
    return out


def grpo_mfu(bench_dir: Path, n_params: int, peak_tflops: float) -> list[str]:
    """Generation: 2N per prompt token (prefill) and per generated token; the packed update: 6N per token (each
    group's prompt once + every completion token); attention not counted."""
    res = json.loads((bench_dir / "results.json").read_text())
    bs, g = res["meta"]["batch_size"], res["meta"]["num_generations"]
    prompt_len, rows = int(str(res["meta"]["prompt_tokens"]).split("-")[-1]), []
    for name, r in res["results"].items():
        if "error" in r:
            rows.append(harness.failed(r, name))
            continue
        gen, split, it = r["gen_tokens_mean"], r["split_median"], r["median_s"]
        upd_tokens = bs // g * prompt_len + gen
        gen_flops, upd_flops = 2 * n_params * (bs * prompt_len + gen), 6 * n_params * upd_tokens
        rows.append([name, f"{it:.2f}", f"{bs / it:.1f}", f"{gen / split['generation']:.0f}",
                     f"{upd_tokens / split['update']:.0f}",
                     f"{100 * upd_flops / split['update'] / peak_tflops / 1e12:.1f}%",
                     f"{100 * (gen_flops + upd_flops) / it / peak_tflops / 1e12:.1f}%",
                     " / ".join(f"{split[k]:.2f}" for k in harness.SPLIT_KEYS)])
    return harness.table(["run", "s/iteration", "episodes/s", "generated tokens/s", "update tokens/s", "update MFU",
                          "iteration MFU", "generation / scoring / log-probs / update s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (weights optional, see above)")
    p.add_argument("--data", default=harness.HH_DATA, help="preference rows for bench_dpo")
    p.add_argument("--out", required=True, help="where gpu_check.md, the tables and logs.tar.gz go")
    p.add_argument("--parts", default="smoke,dpo,grpo,tests", help="comma-separated")
    a = p.parse_args()
    out, work, parts = Path(a.out), Path(tempfile.mkdtemp(prefix="gpu_check_")), a.parts.split(",")
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers
    cuda = torch.cuda.is_available()
    model, random_weights = with_weights(Path(a.model), work)
    n_params, n_total = harness.non_embedding_params(model)
    peak = harness.matmul_peak(dtypes=("bf16",), reps=10)["bf16"] / 1e3 if cuda else float("nan")  # TFLOP/s
    L = [f"# The CUDA path on {torch.cuda.get_device_name(0) if cuda else 'no GPU (CPU run)'}\n",
         f"- torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}; bf16 "
         f"torch.mm peak measured in this run: {peak:.0f} TFLOP/s",
         f"- model: `{a.model}` ({n_total / 1e6:.0f}M parameters, N = {n_params / 1e6:.1f}M without the input "
         f"embedding){', random weights of its shape (no weights on this node)' if random_weights else ''}\n"]
    print("\n".join(L), flush=True)

    def save() -> None:  # after every part, so a run cut short still leaves what it measured
        (out / "gpu_check.md").write_text("\n".join(L) + "\n")
        with tarfile.open(out / "logs.tar.gz", "w:gz") as t:
            for f in sorted(work.rglob("*.log")) + sorted(work.rglob("metrics.jsonl")) + sorted(work.rglob("*.json")):
                if f.stat().st_size < 5_000_000:
                    t.add(f, arcname=str(f.relative_to(work)))

    def bench(name: str, flags: list[str]) -> bool:
        rc, wall = sh([sys.executable, f"benchmarks/bench_{name}.py", "--model", model, *flags, "--output",
                       str(out / f"results_{name}_gpu.md"), "--workdir", str(work / f"bench_{name}")],
                      work / f"bench_{name}.log", TIMEOUT["bench"])
        L.append(f"## {name.upper()} benchmark: exit {rc}, {wall:.0f} s; table in results_{name}_gpu.md\n")
        return (out / f"results_{name}_gpu.md").exists()

    if "smoke" in parts:
        with ThreadPoolExecutor(len(SCRIPTS)) as pool:
            chains = list(pool.map(lambda s: smoke_chain(s, model, work), SCRIPTS))
        fin = lambda x: "-" if x is None else f"{x:.4g}"
        ok = lambda r: r["rc"] == 0 and r["grad_norm"] is not None and math.isfinite(r["grad_norm"])
        L += ["## Every script on CUDA, bf16, 4 steps on the built-in task (all run at once on the one GPU)\n",
              "eval = held-out greedy accuracy (reward.py: held-out pair accuracy) at the start and the end; dpo.py "
              "fsdp-resume continues the fsdp run from its step-4 checkpoint to step 6.\n",
              *harness.table(["script", "mode", "exit", "wall s", "last step", "loss (grpo: reward)", "grad norm",
                              "eval before -> after", "final/"], [
                  [f"{r['script']}.py", r["mode"], f"{r['rc']}{'' if ok(r) else ' FAIL'}", f"{r['wall_s']:.0f}",
                   r["last_step"], fin(r["loss"]), fin(r["grad_norm"]),
                   " -> ".join(f"{x:.3f}" for x in r["eval"]) or "-", "yes" if r["final"] else "no"]
                  for c in chains for r in c]), ""]
        for r in (r for c in chains for r in c if r["tail"]):
            print(f"--- {r['script']} {r['mode']} failed:\n{r['tail']}", flush=True)
        save()
    if "dpo" in parts and bench("dpo", ["--data", a.data, "--configs", "ours-bf16,ours-bf16-pre,ours-fp32-pre",
                                        "--batch-size", str(DPO["batch"]), "--max-length", str(DPO["max_length"]),
                                        "--warmup-steps", "3", "--timed-steps", "8"]):
        L += ["| " + (out / "results_dpo_gpu.md").read_text().split("\n\n| ")[1].split("\n\n")[0], ""]  # 1st table
    save()
    if "grpo" in parts and bench("grpo", ["--configs", "ours", "--batch-size", str(GRPO["episodes"]),
                                          "--num-generations", "8", "--max-new-tokens", str(GRPO["max_new_tokens"]),
                                          "--warmup-steps", "1", "--timed-steps", "3"]):
        L += [f"{GRPO['episodes']} episodes per iteration, at most {GRPO['max_new_tokens']} new tokens. Update MFU = "
              f"6N x (prompt once per group + completion tokens) / update s; iteration MFU adds generation at 2N per "
              f"prompt and generated token, over the whole iteration.\n", *grpo_mfu(work / "bench_grpo", n_params,
                                                                                   peak), ""]
    save()
    if "tests" in parts:
        rc, wall = sh([sys.executable, "-m", "pytest", "tests", "-m", "not slow", "-q", "-x", "-p", "no:cacheprovider"],
                      work / "pytest.log", TIMEOUT["tests"])
        tail = (work / "pytest.log").read_text().strip().splitlines()[-1:]
        L.append(f"## `pytest tests -m 'not slow'` on this node: exit {rc}, {wall:.0f} s: {' '.join(tail)}\n")
    save()
    print("\n".join(L), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
