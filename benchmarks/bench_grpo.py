"""Our GRPO (grpo.py's GRPOTrainer) against TRL's GRPOTrainer: same model, prompts, reward, group size, token cap,
sampling, loss type, beta, updates per generation and precision.

    python benchmarks/bench_grpo.py --trl-python /tmp/trl-venv/bin/python       # ~3 min on the 2-core CPU
    python benchmarks/bench_grpo.py --warmup-steps 1 --timed-steps 1 --configs ours,trl-defaults   # a quick check

Every configuration runs in its own fresh process (ours with this interpreter, TRL with --trl-python, where TRL is
installed; see benchmarks/requirements-trl.txt), one after the other, ours before and after each TRL one. Each process
runs warm-up + timed iterations; one iteration = 4 prompts x 8 completions = 32 episodes of the built-in arithmetic
prompts, scored by `tasks.reward`, then one optimizer step over all of them (num_iterations 1, loss_type dapo, beta 0).
Both sides see the same prompts in the same order. The worker reports the seconds of every iteration, where they went
(generation / scoring / log-probs / update), the generated tokens and the peak RSS; the parent writes the table to
benchmarks/results_grpo.md.

The TRL worker, the per-configuration subprocess runner and the summary are bench_ppo.py's (TRL's side is the same
GRPOTrainer there, here with num_iterations=1); this file adds our GRPO worker and the table. Like bench_ppo.py it
imports nothing at module level beyond the standard library and those two files, so the TRL venv needs neither tyro
nor this repo's requirements.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# standard library only, so both interpreters can import them (this file's directory is sys.path[0] when run)
from bench_dpo import _sync, gb, loadavg, process_peak_bytes, reset_peak_rss, vm_hwm_bytes
from bench_ppo import SPLIT_KEYS, base, run_config, summarize, worker_trl

REPO = Path(__file__).resolve().parent.parent
TARGET_SPEEDUP = 4.0  # the issue: episodes/s >= 4x TRL's, at its defaults and at its best; peak RSS <= TRL's

# settings held equal on TRL's side beyond bench_ppo's worker (GRPOConfig defaults today, pinned in case they move)
TRL_SHARED = {"loss_type": "dapo", "beta": 0.0}

# name -> side, table label, and grpo.Args fields (ours) or GRPOConfig kwargs (TRL) on top of the shared settings
CONFIGS = {
    "ours": dict(side="ours", label="ours bf16 (grpo.py defaults: padding-free, group prompt shared)", ours_kwargs={}),
    "trl-defaults": dict(side="trl", label="TRL defaults bf16 (gradient_checkpointing)", trl_kwargs={}),
    "trl-best": dict(side="trl", label="TRL bf16 gradient_checkpointing=False",
                     trl_kwargs={"gradient_checkpointing": False}),
    # not in the default set
    "ours-padded": dict(side="ours", label="ours bf16 --no-padding-free (log-prob forward on the left-padded batch)",
                        ours_kwargs={"padding_free": False}),
    "ours-fp32": dict(side="ours", label="ours fp32", ours_kwargs={"precision": "fp32"}),
    "trl-fp32": dict(side="trl", label="TRL defaults fp32", trl_kwargs={"bf16": False}),
}
# ours runs before and after each TRL configuration, so a drift of the machine shows up on both sides
DEFAULT_ORDER = ["ours", "trl-defaults", "ours", "trl-best", "ours"]


# ----------------------------------------------------------------------------------------------------------------------
# Our worker (TRL's is bench_ppo.worker_trl)


def worker_ours(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    import grpo

    class ListSampler:  # the parent's prompt indices (into the built-in training prompts), one list per iteration
        def __init__(self, steps: list[list[int]]):
            self.steps, self.consumed, self.i = steps, 0, 0

        def next_indices(self) -> list[int]:
            idx = self.steps[self.i]
            self.i, self.consumed = self.i + 1, self.consumed + len(idx)
            return idx

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    g = spec["num_generations"]
    kwargs = dict(model=spec["model"], dataset="arithmetic", output_dir=spec["output_dir"], total_steps=n_steps,
                  batch_size=spec["batch_size"] // g, num_generations=g, max_new_tokens=spec["max_new_tokens"],
                  temperature=spec["temperature"], top_p=1.0, loss_type=grpo.LossType.dapo, beta=0.0,
                  num_iterations=spec["num_iterations"], gradient_accumulation_steps=1, precision="bf16", seed=1,
                  log_every=10 ** 9, eval_every=0)
    kwargs.update(spec["ours_kwargs"])
    args = grpo.Args(**kwargs)
    t0 = time.perf_counter()
    trainer = grpo.GRPOTrainer(args)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_data) != spec["num_task_prompts"]:
        raise RuntimeError(f"ours has {len(trainer.train_data)} training prompts, the parent wrote "
                           f"{spec['num_task_prompts']}")
    trainer.sampler = ListSampler(spec["ours_steps"])
    notes = []
    dtype = next(trainer.model.parameters()).dtype
    if dtype != torch.float32:
        notes.append(f"policy weights are {dtype}")
    reset_ok = reset_peak_rss()
    times, gen_tokens, split, prompts, rewards = [], [], {k: [] for k in SPLIT_KEYS}, [], []
    for i in range(n_steps):
        prompts.append([trainer.train_data[j]["prompt"][-1]["content"] for j in spec["ours_steps"][i]
                        for _ in range(g)])  # grpo.py repeats each prompt G times, groups contiguous (as TRL)
        t = time.perf_counter()
        out = trainer.training_step()
        _sync(torch)
        times.append(time.perf_counter() - t)
        m = out.metrics
        if out.num_samples != spec["batch_size"]:
            raise RuntimeError(f"ours ran {out.num_samples} episodes, expected {spec['batch_size']}")
        gen_tokens.append(round(m["completions/mean_length"] * out.num_samples))  # EOS included, as TRL counts
        rewards.append(m["reward"])
        for k in SPLIT_KEYS:
            split[k].append(m[f"time/{k}"])
    return {"iter_s": times, "gen_tokens": gen_tokens, "split": split, "prompts": prompts, "setup_s": setup_s,
            "optimizer_steps_per_iter": args.num_iterations, "rewards": rewards,
            "train_peak_rss": vm_hwm_bytes() if reset_ok else None, "process_peak_rss": process_peak_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "notes": notes,
            "learning_rate": args.learning_rate, "padding_free": args.padding_free, "precision": args.precision}


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def render(results: dict, runs: list[str], meta: dict) -> str:
    bs, g = meta["batch_size"], meta["num_generations"]
    L = [f"# GRPO benchmark: ours (grpo.py) vs TRL {meta.get('trl_version', '?')} GRPOTrainer\n"]
    L.append(f"- machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['threads']}; "
             f"torch {meta['torch']} (ours), {meta.get('trl_torch', '?')} (TRL venv), "
             f"transformers {meta['transformers']} (ours) / {meta.get('trl_transformers', '?')} (TRL)")
    L.append(f"- model: {meta['model']} (the same directory for both sides), fp32 master weights, bf16 autocast on "
             f"both sides (ours `--precision bf16`, TRL `bf16=True`) unless the label says fp32")
    L.append(f"- prompts: the built-in arithmetic task's training prompts (`tasks.prompt_rows(\"arithmetic\", "
             f"held_out=False)`, chat messages, {meta['prompt_tokens']} tokens after the chat template), in their "
             f"fixed order: ours trains on them (`--dataset arithmetic`) with its sampler swapped for one that hands "
             f"out prompts 4s..4s+3 at iteration s; TRL reads the same rows from a file with `shuffle_dataset=False`")
    L.append(f"- episodes per iteration: {bs} = {bs // g} prompts x {g} completions (ours `--batch-size {bs // g} "
             f"--num-generations {g}`; TRL `per_device_train_batch_size={bs}, num_generations={g}`, so "
             f"`generation_batch_size={bs}, steps_per_generation=1`)")
    L.append(f"- sampling: temperature {meta['temperature']}, top_p 1, top_k off, at most {meta['max_new_tokens']} "
             f"new tokens (ours `--max-new-tokens`, TRL `max_completion_length`), stopping at EOS; the generated "
             f"tokens per iteration are measured (EOS included) and shown")
    L.append("- reward: `tasks.reward` (1.0 if the first integer of the reply is the sum) on both sides (ours: the "
             "built-in task's default; TRL: a wrapper that takes the text out of its chat-message completions)")
    L.append(f"- loss and updates: loss type dapo, beta 0 (no reference model on either side), "
             f"num_iterations {meta['num_iterations']} (one optimizer step over all {bs} episodes per generation, so "
             f"neither side computes old-policy log-probs), gradient accumulation 1, clip epsilon 0.2")
    L.append("- otherwise each side's defaults, which do not change the work per iteration (ours: lr 2e-5, fused AdamW; "
             "TRL: lr 1e-6, adamw_torch_fused, a log record every 10 optimizer steps)")
    L.append(f"- timing: {meta['warmup']} warm-up + {meta['timed']} timed iterations per configuration, each in a "
             f"fresh process; s/iteration = median [min-max]. Ours: `trainer.training_step()`. TRL: from the "
             f"on_step_end callback of the previous optimizer step (on_train_begin for the first) to this one's. "
             f"episodes/s = {bs} / s/iteration")
    L.append("- split (medians): ours from the step's own `time/generation`, `time/scoring`, `time/logprobs` "
             "(advantages and the rollout tensors; no forward at beta 0 and one update per generation), "
             "`time/update`; TRL: `_generate` (chat template, generate, decode), `_calculate_rewards`, the rest of "
             "`_generate_and_score_completions` (advantages, metrics), update = iteration - "
             "`_generate_and_score_completions`")
    L.append("- peak RSS: 'train' = VmHWM of the worker reset just before the first iteration; 'process' = "
             "ru_maxrss over the process's life (imports, loading, training)")
    L.append(f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}. Other "
             f"processes may have been running on the same cores.\n")

    L.append("| run | configuration | s/iteration (median [min-max]) | episodes/s | generated tokens/iteration "
             "| generation s | scoring s | log-probs s | update s | peak RSS train GB | peak RSS process GB "
             "| load before -> after |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = [k for k in runs if "error" not in results[k]]
    for k in runs:
        r, cfg = results[k], CONFIGS[base(k)]
        if "error" in r:
            L.append(f"| {k} | {cfg['label']} | failed: {r['error']} | | | | | | | | | |")
            continue
        s = r["split_median"]
        L.append(f"| {k} | {cfg['label']} | {r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | "
                 f"{r['episodes_per_s']:.2f} | {r['gen_tokens_mean']:.0f} | "
                 + " | ".join(f"{s[x]:.2f}" for x in SPLIT_KEYS)
                 + f" | {gb(r['train_peak_rss'])} | {gb(r['process_peak_rss'])} | {r['load_before']} -> "
                   f"{r['load_after']} |")
    L.append("\nGenerated tokens per iteration (all, warm-up first): "
             + "; ".join(f"{k}: {results[k]['gen_tokens']}" for k in ok) + ".")
    notes = [f"{k}: {x}" for k in ok for x in results[k].get("notes", [])]
    for k in ok:
        r = results[k]
        if CONFIGS[base(k)]["side"] == "trl":
            notes.append(f"{k}: gradient_checkpointing={r['gradient_checkpointing']}, beta={r['beta']} (reference "
                         f"model {'loaded' if r['ref_model'] else 'not loaded'}), loss_type={r['loss_type']}, "
                         f"optim={r['optim']}, lr {r['learning_rate']:g}, autocast {r['autocast']}")
        else:
            notes.append(f"{k}: precision {r['precision']}, padding_free={r['padding_free']}, lr "
                         f"{r['learning_rate']:g}, mean reward per iteration "
                         f"{[round(x, 2) for x in r['rewards']]}")
    L.append("\nNotes: " + ("; ".join(notes) + "." if notes else "none."))
    ours_runs = [k for k in ok if CONFIGS[base(k)]["side"] == "ours"]
    trl_runs = [k for k in ok if CONFIGS[base(k)]["side"] == "trl"]
    diff = [(o, t) for o in ours_runs for t in trl_runs if results[o]["prompts"] != results[t]["prompts"]]
    if ours_runs and trl_runs:
        L.append("\nWarning: the episode prompts differ between " + ", ".join(f"{o}/{t}" for o, t in diff) + "."
                 if diff else "\nThe episode prompts of every iteration are identical, in the same order, on both "
                 "sides.")

    if ours_runs and trl_runs:
        best = min(trl_runs, key=lambda k: results[k]["median_s"])
        L.append(f"\n## Ratios ours / TRL (targets of the issue: episodes/s >= {TARGET_SPEEDUP:g}x TRL's at its "
                 f"defaults and at its best; peak RSS <= TRL's)\n\nours = the timed iterations of all runs of that "
                 f"configuration pooled (median); per run in brackets. TRL's best = its fastest configuration here "
                 f"({best}). RSS: the largest of ours' runs over TRL's.\n")
        L.append(f"| ours | TRL | ours s/iteration (pooled) | TRL s/iteration | episodes/s ours/TRL (per ours run) "
                 f"| >= {TARGET_SPEEDUP:g}x | peak RSS train ours/TRL | <= 1 | peak RSS process ours/TRL |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for o in dict.fromkeys(base(k) for k in ours_runs):  # each ours configuration once, in run order
            mine = [k for k in ours_runs if base(k) == o]
            pooled = statistics.median([x for k in mine for x in results[k]["iter_s"][meta["warmup"]:]])
            train = [results[k]["train_peak_rss"] for k in mine]
            proc = max(results[k]["process_peak_rss"] for k in mine)
            for t in trl_runs:
                rt = results[t]
                ratio = rt["median_s"] / pooled
                per_run = ", ".join(f"{rt['median_s'] / results[k]['median_s']:.2f}" for k in mine)
                if all(train) and rt["train_peak_rss"]:
                    rss = max(train) / rt["train_peak_rss"]
                    rss_s, rss_ok = f"{rss:.2f}", "met" if rss <= 1 else "NOT met"
                else:
                    rss_s, rss_ok = "n/a", "n/a"
                who = t + (" (best)" if t == best else "")
                L.append(f"| {o} | {who} | {pooled:.2f} | {rt['median_s']:.2f} | {ratio:.2f}x [{per_run}] | "
                         f"{'met' if ratio >= TARGET_SPEEDUP else 'NOT met'} | {rss_s} | {rss_ok} | "
                         f"{proc / rt['process_peak_rss']:.2f} |")
    return "\n".join(L) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python",
                   help="interpreter of the venv where TRL is installed (benchmarks/requirements-trl.txt)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per iteration")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (G), both sides")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens per episode, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (both sides)")
    p.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per generation (both sides)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed iterations first")
    p.add_argument("--timed-steps", type=int, default=3, help="timed iterations (median reported)")
    p.add_argument("--configs", default=",".join(DEFAULT_ORDER),
                   help=f"comma-separated, run in this order (repeats allowed); known: {', '.join(CONFIGS)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results_grpo.md"), help="markdown results file")
    p.add_argument("--workdir", default=None, help="scratch dir for logs and prompts (default: a new /tmp dir)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        res = (worker_ours if a.worker == "ours" else worker_trl)(spec)
        Path(a.result).write_text(json.dumps(res))
        return

    order = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in order if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    # a configuration may run more than once (ours between the TRL runs): its k-th run is keyed 'name#k'
    runs = [c if order[:i].count(c) == 0 else f"{c}#{order[:i].count(c) + 1}" for i, c in enumerate(order)]
    if a.num_generations < 2 or a.batch_size % a.num_generations:
        raise SystemExit(f"--num-generations {a.num_generations}: must be >= 2 and divide --batch-size {a.batch_size}")
    if a.num_iterations < 1:
        raise SystemExit(f"--num-iterations {a.num_iterations}: must be >= 1")
    if any(CONFIGS[c]["side"] == "trl" for c in order) and not Path(a.trl_python).exists():
        raise SystemExit(f"--trl-python {a.trl_python}: not found. Create the venv: python3 -m venv /tmp/trl-venv && "
                         f"/tmp/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers
    from transformers import AutoTokenizer

    import tasks
    from common import bundled_model_dir, encode_prompt
    model_dir = a.model or str(bundled_model_dir())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    n_steps = a.warmup_steps + a.timed_steps
    per_iter = a.batch_size // a.num_generations  # distinct prompts per iteration
    # ours' built-in training prompts, in order; TRL reads the first per_iter x n_steps of them (cycled if need be)
    task_rows = [row for _, row in tasks.prompt_rows("arithmetic", False)]
    n_prompts = per_iter * n_steps
    rows = [task_rows[k % len(task_rows)] for k in range(n_prompts)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours_steps = [[(s * per_iter + j) % len(task_rows) for j in range(per_iter)] for s in range(n_steps)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted({len(encode_prompt(tok, r["prompt"])) for r in rows})
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    meta = {"model": model_dir, "batch_size": a.batch_size, "num_generations": a.num_generations,
            "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "num_iterations": a.num_iterations,
            "warmup": a.warmup_steps, "timed": a.timed_steps, "num_prompts": n_prompts,
            "prompt_tokens": f"{lengths[0]}" + (f"-{lengths[-1]}" if lengths[-1] != lengths[0] else ""), "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_start": loadavg()}
    print(f"work dir {work}; {n_prompts} prompt rows ({len(task_rows)} distinct training prompts), "
          f"{meta['prompt_tokens']} tokens each; load {meta['load_start']}", flush=True)
    # bench_ppo.worker_trl reads batch_size (episodes), num_generations, num_iterations and the prompt file
    base_spec = {"model": model_dir, "prompts": str(work / "prompts.jsonl"), "num_prompts": n_prompts,
                 "num_task_prompts": len(task_rows), "ours_steps": ours_steps, "batch_size": a.batch_size,
                 "num_generations": a.num_generations, "num_iterations": a.num_iterations,
                 "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
                 "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps}
    raw = {}
    for name in runs:
        cfg = CONFIGS[base(name)]
        if cfg["side"] == "trl":
            cfg = dict(cfg, trl_kwargs=TRL_SHARED | cfg["trl_kwargs"])
        python = a.ours_python if cfg["side"] == "ours" else a.trl_python
        print(f"[{name}] {cfg['label']} ...", flush=True)
        raw[name] = r = run_config(name, cfg, base_spec, work, python, a.timeout, script=Path(__file__))
        if "error" in r:
            print(f"[{name}] FAILED ({r['error']}); log: {r['log']}", flush=True)
        else:
            print(f"[{name}] iterations {' '.join(f'{s:.2f}' for s in r['iter_s'])} s; generated tokens "
                  f"{r['gen_tokens']}; peak RSS train {gb(r['train_peak_rss'])} GB, process "
                  f"{gb(r['process_peak_rss'])} GB; setup {r['setup_s']:.0f} s, wall {r['wall_s']:.0f} s; load "
                  f"{r['load_before']} -> {r['load_after']}", flush=True)
            if "versions" in r:
                meta["trl_version"], meta["trl_transformers"] = r["versions"]["trl"], r["versions"]["transformers"]
                meta["trl_torch"] = r["torch"]
    meta["load_end"] = loadavg()
    results = {name: summarize(raw[name], a.warmup_steps, a.batch_size) for name in runs}
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = render(results, runs, meta)
    print("\n" + text, flush=True)
    Path(a.output).write_text(text)
    print(f"written to {a.output} (raw numbers: {work / 'results.json'})")


if __name__ == "__main__":
    main()
