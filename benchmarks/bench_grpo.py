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

The TRL worker is harness.worker_trl_grpo, the one bench_ppo.py runs (here with num_iterations=1); ours is
harness.worker_ours_grpo (bench_family.py runs both for GSPO); this file adds the table. It imports nothing at
module level beyond the standard library and harness.py, so the TRL venv needs neither tyro nor this repo's
requirements.
"""
from __future__ import annotations

import harness
from harness import config_name

TARGET_SPEEDUP = 4.0  # the target: episodes/s >= 4x TRL's, at its defaults and at its best; peak RSS <= TRL's

# TRL's side on top of harness.worker_trl_grpo's settings: GRPOConfig's defaults today, pinned in case they move
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
# Parent


def render(results: dict, runs: list[str], meta: dict) -> str:
    bs, g = meta["batch_size"], meta["num_generations"]
    L = [f"# GRPO benchmark: ours (grpo.py) vs TRL {meta.get('trl_version', '?')} GRPOTrainer, same prompts, reward, "
         f"group size, token cap, loss and updates\n", harness.machine_line(meta)]
    L.append(f"- model: {meta['model']} (the same directory for both sides), fp32 master weights, bf16 autocast on "
             f"both sides (ours `--precision bf16`, TRL `bf16=True`) unless the label says fp32")
    L.append(f"- prompts: the built-in arithmetic task's training prompts (`tasks.prompt_rows(\"arithmetic\", "
             f"held_out=False)`, chat messages, {meta['prompt_tokens']} tokens after the chat template), in their "
             f"fixed order: ours trains on them (`--dataset arithmetic`) with its sampler swapped for one that hands "
             f"out prompts 4s..4s+3 at iteration s; TRL reads the same rows from a file with `shuffle_dataset=False`")
    L.append(f"- episodes per iteration: {bs} = {bs // g} prompts x {g} completions (ours `--batch-size {bs // g} "
             f"--num-generations {g}`; TRL `per_device_train_batch_size={bs}, num_generations={g}`, so "
             f"`generation_batch_size={bs}, steps_per_generation=1`)")
    L.append(harness.sampling_line(meta))
    L.append("- reward: `tasks.reward` (1.0 if the first integer of the reply is the sum) on both sides (ours: the "
             "built-in task's default; TRL: a wrapper that takes the text out of its chat-message completions)")
    L.append(f"- loss and updates: loss type dapo, beta 0 (no reference model on either side), "
             f"num_iterations {meta['num_iterations']} (one optimizer step over all {bs} episodes per generation, so "
             f"neither side computes old-policy log-probs), gradient accumulation 1, clip epsilon 0.2")
    L.append("- otherwise each side's defaults, which do not change the work per iteration (ours: lr 2e-5, fused "
             "AdamW; TRL: lr 1e-6, adamw_torch_fused, a log record every 10 optimizer steps)")
    L.append(f"- timing: {meta['warmup']} warm-up + {meta['timed']} timed iterations per configuration, each in a "
             f"fresh process; s/iteration = median [min-max]. Ours: `trainer.training_step()`. TRL: from the "
             f"on_step_end callback of the previous optimizer step (on_train_begin for the first) to this one's. "
             f"episodes/s = {bs} / s/iteration")
    L.append("- split (medians): ours from the step's own `time/generation`, `time/scoring`, `time/logprobs` "
             "(advantages and the rollout tensors; no forward at beta 0 and one update per generation), "
             "`time/update`; TRL: `_generate` (chat template, generate, decode), `_calculate_rewards`, the rest of "
             "`_generate_and_score_completions` (advantages, metrics), update = iteration - "
             "`_generate_and_score_completions`")
    L += harness.rss_and_load_lines(meta)
    L += harness.iteration_table(results, runs, CONFIGS)
    ok, ours_runs, trl_runs = harness.split_runs(results, runs, CONFIGS)
    notes = [f"{k}: {x}" for k in ok for x in results[k].get("notes", [])]
    for k in ok:
        r = results[k]
        if k in trl_runs:
            notes.append(f"{harness.trl_note(k, r)}, autocast {r['autocast']}")
        else:
            notes.append(f"{k}: precision {r['precision']}, padding_free={r['padding_free']}, lr "
                         f"{r['learning_rate']:g}, mean reward per iteration {[round(x, 2) for x in r['rewards']]}")
    L.append("\nNotes: " + ("; ".join(notes) + "." if notes else "none."))
    if ours_runs and trl_runs:
        L.append(harness.same_prompts_line(results, ours_runs, trl_runs))
        best = min(trl_runs, key=lambda k: results[k]["median_s"])
        L.append(f"\n## Ratios ours / TRL GRPOTrainer (targets: episodes/s >= {TARGET_SPEEDUP:g}x TRL's at its "
                 f"defaults and at its best; peak RSS <= TRL's)\n\nours = the timed iterations of all runs of that "
                 f"configuration pooled (median); per run in brackets. TRL's best = its fastest configuration here "
                 f"({best}). RSS: the largest of ours' runs over TRL's.\n")
        L.append(f"| ours | TRL | ours s/iteration (pooled) | TRL s/iteration | episodes/s ours/TRL (per ours run) "
                 f"| >= {TARGET_SPEEDUP:g}x | peak RSS train ours/TRL | <= 1 | peak RSS process ours/TRL |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for o in dict.fromkeys(config_name(k) for k in ours_runs):  # each ours configuration once, in run order
            mine = [k for k in ours_runs if config_name(k) == o]
            pooled, train, proc = harness.pooled_ours(results, mine, meta["warmup"])
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
    p = harness.bench_parser(__doc__, output="results_grpo.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=3, timeout=900, repeats=True, unit="iterations")
    p.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per iteration")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (G), both sides")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens per episode, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (both sides)")
    p.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per generation (both sides)")
    a = p.parse_args()
    if harness.run_as_worker(a, harness.worker_ours_grpo, harness.worker_trl_grpo):
        return
    if a.num_generations < 2 or a.batch_size % a.num_generations:
        raise SystemExit(f"--num-generations {a.num_generations}: must be >= 2 and divide --batch-size {a.batch_size}")
    if a.num_iterations < 1:
        raise SystemExit(f"--num-iterations {a.num_iterations}: must be >= 1")
    runs = harness.parse_runs(a, CONFIGS, repeats=True)
    model_dir = harness.default_model(a.model)
    import tasks
    work = harness.workdir(a.workdir, "bench_grpo_")
    n_steps = a.warmup_steps + a.timed_steps
    per_iter = a.batch_size // a.num_generations  # distinct prompts per iteration
    # ours' built-in training prompts, in order; TRL reads the first per_iter x n_steps of them (cycled if need be)
    task_rows = [row for _, row in tasks.prompt_rows("arithmetic", False)]
    n_prompts = per_iter * n_steps
    rows = [task_rows[k % len(task_rows)] for k in range(n_prompts)]
    ours_steps = [[(s * per_iter + j) % len(task_rows) for j in range(per_iter)] for s in range(n_steps)]
    meta = harness.machine_meta() | {
        "model": model_dir, "batch_size": a.batch_size, "num_generations": a.num_generations,
        "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "num_iterations": a.num_iterations,
        "warmup": a.warmup_steps, "timed": a.timed_steps, "num_prompts": n_prompts,
        "prompt_tokens": harness.prompt_tokens(model_dir, rows)}
    print(f"work dir {work}; {n_prompts} prompt rows ({len(task_rows)} distinct training prompts), "
          f"{meta['prompt_tokens']} tokens each; load {meta['load_start']}", flush=True)
    # harness.worker_trl_grpo reads batch_size (episodes), num_generations, num_iterations and the prompt file
    base_spec = {"model": model_dir, "prompts": harness.write_jsonl(work / "prompts.jsonl", rows),
                 "num_prompts": n_prompts, "num_task_prompts": len(task_rows), "ours_steps": ours_steps,
                 "batch_size": a.batch_size, "num_generations": a.num_generations,
                 "num_iterations": a.num_iterations, "max_new_tokens": a.max_new_tokens,
                 "temperature": a.temperature, "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps}

    def spec_of(name: str, cfg: dict) -> dict:
        trl = TRL_SHARED | cfg["trl_kwargs"] if cfg["side"] == "trl" else {}
        return base_spec | {"ours_kwargs": cfg.get("ours_kwargs", {}), "trl_kwargs": trl}
    raw = harness.run_all(a, __file__, runs, CONFIGS, work, meta, spec_of, harness.describe_iterations)
    results = {name: harness.summarize_iterations(raw[name], a.warmup_steps, a.batch_size) for name in runs}
    harness.finish(a, work, meta, results, render(results, runs, meta))


if __name__ == "__main__":
    main()
