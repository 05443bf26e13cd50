"""Our PPO (ppo.py) against TRL's GRPOTrainer (TRL has no PPO): same model, prompts, reward, episodes, token cap and
updates. Ours' worker is here, TRL's is harness's; commands and what is held equal: benchmarks/README.md.
"""
from __future__ import annotations

import harness
from harness import SPLIT_KEYS, repo_on_path

CONFIGS = {  # name -> side, label, and ppo.Args fields (ours) or GRPOConfig kwargs (TRL) on top of the shared ones
    "ours": dict(side="ours", label="ours bf16 (ppo.py defaults: value-head critic, reference model, kl_coef 0.05)",
                 ours_kwargs={}),
    "trl-defaults": dict(side="trl", label="TRL defaults bf16 (beta=0: no reference model; gradient_checkpointing)",
                         trl_kwargs={}),
    "trl-beta": dict(side="trl", label="TRL bf16 beta=0.05 (reference model; gradient_checkpointing)",
                     trl_kwargs={"beta": 0.05}),
    "trl-best": dict(side="trl", label="TRL best: bf16 beta=0 gradient_checkpointing=False",
                     trl_kwargs={"gradient_checkpointing": False}),
    # not in the default set
    "trl-beta-nogc": dict(side="trl", label="TRL bf16 beta=0.05 gradient_checkpointing=False (ours' settings)",
                          trl_kwargs={"beta": 0.05, "gradient_checkpointing": False}),
    "ours-padded": dict(side="ours", label="ours bf16 --no-padding-free (log-prob forwards on the left-padded batch)",
                        ours_kwargs={"padding_free": False}),
    "ours-fp32": dict(side="ours", label="ours fp32", ours_kwargs={"precision": "fp32"}),
    "trl-fp32": dict(side="trl", label="TRL defaults fp32", trl_kwargs={"bf16": False}),
}
DEFAULT_ORDER = ["ours", "trl-defaults", "ours", "trl-beta", "ours", "trl-best"]  # ours before each TRL run


def worker_ours(spec: dict) -> dict:
    repo_on_path()
    import ppo
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    args = ppo.Args(**dict(
        model=spec["model"], dataset=spec["prompts"], eval_dataset=spec["eval_prompts"], reward_fn="tasks:reward",
        output_dir=spec["output_dir"], total_steps=n_steps, batch_size=spec["batch_size"],
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, ppo_epochs=2,
        num_minibatches=1, gradient_accumulation_steps=1, precision="bf16", seed=1, log_every=10 ** 9,
        eval_every=0) | spec["ours_kwargs"])
    # the sampler hands out the parent's episode prompts, one list per iteration
    trainer, outs, report = harness.time_ours(ppo.PPOTrainer, args, spec["num_prompts"],
                                              harness.ListSampler(spec["ours_steps"]), n_steps)
    keys = dict(zip(SPLIT_KEYS, ("time/generation", "time/scoring", "time/logprobs_values", "time/update")))
    report["iter_s"] = report.pop("step_s")
    return report | {  # generated tokens: per-episode mean x episodes (EOS included)
        "gen_tokens": [round(o.metrics["response_length"] * o.num_samples) for o in outs],
        "split": {k: [o.metrics[key] for o in outs] for k, key in keys.items()},
        "prompts": [[trainer.train_data[j]["prompt"][-1]["content"] for j in step] for step in spec["ours_steps"]],
        "optimizer_steps_per_iter": args.ppo_epochs * args.num_minibatches}


def render(results: dict, runs: list[str], meta: dict) -> str:
    bs, g = meta["batch_size"], meta["num_generations"]
    who = (f"both sides: {bs // g} prompts x {g} completions (ours: the same {bs} episode prompts, in the same order, "
           f"as {bs} independent episodes)" if meta["ours_prompts"] == "grouped" else
           f"ours samples {bs} distinct prompts (file order), TRL {bs // g} prompts x `num_generations={g}`")
    L = [f"# PPO benchmark: ours (ppo.py) vs TRL {meta.get('trl_version', '?')} GRPOTrainer, same prompts, reward, "
         f"episodes, token cap and updates\n",
         f"- model {meta['model']}, fp32 master weights, bf16 autocast unless the label says fp32; the built-in "
         f"arithmetic prompts ({meta['prompt_tokens']} tokens) in order, {bs} episodes per iteration, {who}; "
         f"`tasks.reward`; 2 optimizer steps over all episodes per iteration (held equal: benchmarks/README.md)",
         harness.sampling_line(meta), *harness.header_lines(meta, "iterations")]
    L += harness.iteration_table(results, runs, CONFIGS)
    ours_runs, trl_runs = harness.split_runs(results, runs, CONFIGS)
    L.append(harness.notes_line(results, runs, CONFIGS, harness.trl_grpo_note))
    if meta["ours_prompts"] == "grouped" and ours_runs and trl_runs:
        L.append(harness.same_prompts_line(results, ours_runs, trl_runs))
    L.append("\n## Ratios ours / TRL GRPOTrainer (target: ours >= 2x TRL's episodes/s)\n\nours = the timed "
             "iterations of all runs of that configuration pooled (median); per run in brackets.\n")
    L += harness.table(["ours", "TRL", "ours s/iteration (pooled)", "episodes/s ours/TRL (per ours run)",
                        "ours >= 2x TRL", "peak RSS train ours/TRL", "peak RSS process ours/TRL"],
                       [[x["ours"], x["trl"], f"{x['pooled']:.2f}", f"{x['speedup']:.2f}x [{x['per_run']}]",
                         "met" if x["speedup"] >= 2 else "NOT met", x["rss"], x["proc"]]
                        for x in harness.online_ratios(results, ours_runs, trl_runs, meta["warmup_steps"])])
    return "\n".join(L) + "\n"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_ppo.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=4, timeout=900, unit="iterations")
    p.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per iteration")
    p.add_argument("--num-generations", type=int, default=8, help="TRL's completions per prompt (divides --batch-size)")
    p.add_argument("--ours-prompts", choices=["grouped", "distinct"], default="grouped",
                   help="grouped: ours gets TRL's exact episode prompts (each prompt --num-generations times);\n"
                        "distinct: ours samples --batch-size distinct prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens per episode, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (both sides)")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, harness.worker_trl_grpo):
        return
    if a.num_generations < 2 or a.batch_size % a.num_generations:
        raise SystemExit(f"--num-generations {a.num_generations}: must be >= 2 and divide --batch-size")
    runs = harness.parse_runs(a, CONFIGS)
    model_dir, work, meta = harness.start(a, "bench_ppo_")
    import tasks
    n_steps, per_iter = a.warmup_steps + a.timed_steps, a.batch_size // a.num_generations
    # ours' trainer refuses a file with fewer rows than one batch (its own sampler, replaced here, needs them)
    n_prompts = max((a.batch_size if a.ours_prompts == "distinct" else per_iter) * n_steps, a.batch_size)
    questions = tasks.questions("arithmetic", held_out=False)  # in their fixed order, cycled; TRL reads the first
    rows = [{"prompt": tasks.prompt(q), "answer": sum(q)}
            for q in (questions[i % len(questions)] for i in range(n_prompts))]
    if a.ours_prompts == "grouped":  # TRL's RepeatSampler order: each prompt num_generations times in a row
        ours_steps = [[s * per_iter + j for j in range(per_iter) for _ in range(a.num_generations)]
                      for s in range(n_steps)]
    else:
        ours_steps = [list(range(s * a.batch_size, (s + 1) * a.batch_size)) for s in range(n_steps)]
    meta["prompt_tokens"] = harness.prompt_tokens(model_dir, rows)
    print(f"work dir {work}; {n_prompts} prompt rows ({len(questions)} distinct questions), {meta['prompt_tokens']} "
          f"tokens each; load {meta['load_start']}", flush=True)
    base = {k: meta[k] for k in ("model", "batch_size", "num_generations", "max_new_tokens", "temperature",
                                 "warmup_steps", "timed_steps")} | {
        "prompts": harness.write_jsonl(work / "prompts.jsonl", rows), "num_prompts": n_prompts,
        "ours_steps": ours_steps, "eval_prompts": harness.write_jsonl(work / "eval_prompts.jsonl", rows[:1])}
    raw = harness.run_all(a, __file__, runs, CONFIGS, work, meta, lambda name, cfg: base | {
        "ours_kwargs": cfg.get("ours_kwargs", {}), "trl_kwargs": cfg.get("trl_kwargs", {})},
        harness.describe_iterations)
    results = {name: harness.summarize_iterations(raw[name], a.warmup_steps, a.batch_size) for name in runs}
    harness.finish(a, work, meta, results, render(results, runs, meta))


if __name__ == "__main__":
    main()
