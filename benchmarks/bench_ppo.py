"""Our PPO (ppo.py's PPOTrainer) against TRL's GRPOTrainer: same model, prompts, reward, episodes, token cap, updates.

    python benchmarks/bench_ppo.py --trl-python /tmp/trl-venv/bin/python       # ~13 min on the 2-core CPU
    python benchmarks/bench_ppo.py --warmup-steps 1 --timed-steps 1 --configs ours,trl-defaults   # a quick check

Every configuration runs in its own fresh process (ours with this interpreter, TRL with --trl-python, where TRL is
installed; see benchmarks/requirements-trl.txt), one after the other, ours and TRL alternating. Each process runs
warm-up + timed iterations; one iteration = one generation batch of --batch-size episodes (completions) of the
built-in arithmetic prompts, scored by the same first-integer reward, then 2 optimizer steps over all of them
(ours: --ppo-epochs 2 x --num-minibatches 1; TRL: num_iterations=2 with one optimizer step per pass). Both sides read
the same prompt file and see the same prompts in the same order. The worker reports the seconds of every iteration,
where they went (generation / scoring / log-probs / update), the generated tokens, and the peak RSS; the parent writes
the table to benchmarks/results_ppo.md.

This file also runs as the worker (`--worker ours|trl --spec FILE`; TRL's is harness.worker_trl_grpo, which
bench_grpo.py runs too): it imports nothing at module level beyond the standard library and harness.py, so the TRL venv
needs neither tyro nor this repo's requirements.
"""
from __future__ import annotations

import harness
from harness import SPLIT_KEYS, config_name, memory_report, repo_on_path

# name -> side, table label, and ppo.Args fields (ours) or GRPOConfig kwargs (TRL) on top of the shared settings
CONFIGS = {
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
# ours runs again before each TRL configuration, so a drift of the machine shows up on both sides
DEFAULT_ORDER = ["ours", "trl-defaults", "ours", "trl-beta", "ours", "trl-best"]


# ----------------------------------------------------------------------------------------------------------------------
# Our worker (TRL's is harness.worker_trl_grpo)


def worker_ours(spec: dict) -> dict:
    repo_on_path()
    import torch

    import ppo

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    kwargs = dict(model=spec["model"], dataset=spec["prompts"], eval_dataset=spec["eval_prompts"],
                  reward_fn="tasks:reward", output_dir=spec["output_dir"], total_steps=n_steps,
                  batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"],
                  temperature=spec["temperature"], top_p=1.0, ppo_epochs=2, num_minibatches=1,
                  gradient_accumulation_steps=1, precision="bf16", seed=1, log_every=10 ** 9, eval_every=0)
    args = ppo.Args(**kwargs | spec["ours_kwargs"])
    trainer, setup_s = harness.build_ours(ppo.PPOTrainer, args, spec["num_prompts"])
    trainer.sampler = harness.ListSampler(spec["ours_steps"])  # the parent's episode prompts, one list per iteration
    prompts = [[trainer.train_data[j]["prompt"][-1]["content"] for j in step] for step in spec["ours_steps"]]
    times, outs, reset_ok = harness.timed_steps(trainer, n_steps, torch)
    keys = dict(zip(SPLIT_KEYS, ("time/generation", "time/scoring", "time/logprobs_values", "time/update")))
    # per-episode mean x episodes (EOS included)
    return memory_report(torch, reset_ok) | {
        "iter_s": times, "gen_tokens": [round(o.metrics["response_length"] * o.num_samples) for o in outs],
        "split": {k: [o.metrics[key] for o in outs] for k, key in keys.items()}, "prompts": prompts,
        "setup_s": setup_s, "optimizer_steps_per_iter": args.ppo_epochs * args.num_minibatches, "notes": []}


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def render(results: dict, runs: list[str], meta: dict) -> str:
    bs, g = meta["batch_size"], meta["num_generations"]
    L = [f"# PPO benchmark: ours (ppo.py) vs TRL {meta.get('trl_version', '?')} GRPOTrainer, same prompts, reward, "
         f"episodes, token cap and updates\n", harness.machine_line(meta)]
    L.append(f"- model: {meta['model']} (the same directory for both sides), fp32 master weights, bf16 autocast on "
             f"both sides (TRL: `bf16=True`) unless the label says fp32")
    L.append(f"- prompts: the built-in arithmetic task's training prompts (`tasks.questions(\"arithmetic\", held_out="
             f"False)`, chat messages from `tasks.prompt`, all {meta['prompt_tokens']} tokens after the "
             f"chat template), written to one file in order; TRL reads it with `shuffle_dataset=False`")
    if meta["ours_prompts"] == "grouped":
        who = (f"both sides: {bs // g} prompts x {g} completions each (TRL: `num_generations={g}`; ours: the same "
               f"{bs} prompt rows fed by a sampler in the same order, as {bs} independent episodes). Ours' default "
               f"padding-free forwards store a prompt shared by episodes once, which this grouping helps; "
               f"`--ours-prompts distinct` gives ours {bs} different prompts per iteration instead")
    else:
        who = (f"ours samples {bs} distinct prompts (file order); TRL samples {bs // g} prompts x `num_generations="
               f"{g}` (the first rows of the same file): same episode and token budget, different prompts")
    L.append(f"- episodes per iteration: {bs}; {who}")
    L.append(harness.sampling_line(meta))
    L.append("- reward: `tasks.reward` (1.0 if the first integer of the reply is the sum) on both sides; "
             "TRL gets a wrapper that takes the text out of its chat-message completions")
    L.append("- updates per iteration: 2 optimizer steps over all episodes on both sides (ours: `--ppo-epochs 2 "
             f"--num-minibatches 1`; TRL: `per_device_train_batch_size={bs}, gradient_accumulation_steps=1, "
             f"num_iterations=2`, so `generation_batch_size={bs}, steps_per_generation=1`)")
    L.append("- KL: ours always runs its reference model (kl_coef 0.05, k1, in the reward); TRL's default beta=0 "
             "loads no reference model, `beta=0.05` loads one and runs it every generation round. Ours also trains a "
             "value head (one extra scalar head on the shared backbone); GRPO has no critic")
    L.append("- otherwise each side's defaults, none of which change the work per iteration (ours: lr 1e-5, clip "
             "0.2; TRL: lr 1e-6, loss_type dapo, epsilon 0.2, a log record every 10 optimizer steps)")
    L.append(f"- timing: {meta['warmup']} warm-up + {meta['timed']} timed iterations per configuration, each in a "
             f"fresh process; s/iteration = median [min-max]. Ours: `trainer.training_step()`. TRL: the two "
             f"optimizer steps fed by one generation round, from the on_step_end callback of the previous "
             f"iteration's last optimizer step (on_train_begin for the first) to that of this iteration's second "
             f"one. episodes/s = {bs} / s/iteration")
    L.append("- split (medians): ours from the step's own `time/generation`, `time/scoring`, `time/logprobs_values` "
             "(policy+value and reference forwards, rewards, GAE), `time/update`; TRL: `_generate` (chat template, "
             "generate, decode), `_calculate_rewards`, the rest of `_generate_and_score_completions` (old-policy and "
             "reference log-probs, advantages, metrics), update = iteration - `_generate_and_score_completions`")
    L += harness.rss_and_load_lines(meta)
    L += harness.iteration_table(results, runs, CONFIGS)
    ok, ours_runs, trl_runs = harness.split_runs(results, runs, CONFIGS)
    notes = [f"{k}: {x}" for k in ok for x in results[k].get("notes", [])]
    notes += [harness.trl_note(k, results[k]) for k in trl_runs]
    L.append("\nNotes: " + ("; ".join(notes) + "." if notes else "none."))
    if meta["ours_prompts"] == "grouped" and ours_runs and trl_runs:
        L.append(harness.same_prompts_line(results, ours_runs, trl_runs))

    L.append("\n## Ratios ours / TRL GRPOTrainer (target: ours >= 2x TRL's episodes/s)\n\nours = the timed "
             "iterations of all runs of that configuration pooled (median); per run in brackets.\n")
    L.append("| ours | TRL | ours s/iteration (pooled) | episodes/s ours/TRL (per ours run) | ours >= 2x TRL "
             "| peak RSS train ours/TRL | peak RSS process ours/TRL |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for o in dict.fromkeys(config_name(k) for k in ours_runs):  # each ours configuration once, in run order
        mine = [k for k in ours_runs if config_name(k) == o]
        pooled, train, proc = harness.pooled_ours(results, mine, meta["warmup"])
        for t in trl_runs:
            rt = results[t]
            ratio = rt["median_s"] / pooled
            per_run = ", ".join(f"{rt['median_s'] / results[k]['median_s']:.2f}" for k in mine)
            tr = harness.ratio(max(train) if all(train) else None, rt["train_peak_rss"])
            L.append(f"| {o} | {t} | {pooled:.2f} | {ratio:.2f}x [{per_run}] | {'met' if ratio >= 2 else 'NOT met'} "
                     f"| {tr} | {proc / rt['process_peak_rss']:.2f} |")
    return "\n".join(L) + "\n"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_ppo.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=4, timeout=900, repeats=True, unit="iterations")
    p.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per iteration")
    p.add_argument("--num-generations", type=int, default=8,
                   help="TRL's completions per prompt (GRPOConfig's default; --batch-size must be a multiple)")
    p.add_argument("--ours-prompts", choices=["grouped", "distinct"], default="grouped",
                   help="grouped: ours gets TRL's exact episode prompts (each prompt --num-generations times);\n"
                        "distinct: ours samples --batch-size distinct prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens per episode, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (both sides)")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, harness.worker_trl_grpo):
        return
    if a.num_generations < 2 or a.batch_size % a.num_generations:
        raise SystemExit(f"--num-generations {a.num_generations}: must be >= 2 (GRPO) and divide --batch-size "
                         f"{a.batch_size}")
    runs = harness.parse_runs(a, CONFIGS, repeats=True)
    model_dir = harness.default_model(a.model)
    import tasks
    work = harness.workdir(a.workdir, "bench_ppo_")
    n_steps = a.warmup_steps + a.timed_steps
    per_iter = a.batch_size // a.num_generations  # distinct prompts per TRL iteration
    # ours' trainer refuses a file with fewer rows than one batch (its own sampler, replaced here, needs them)
    n_prompts = max((a.batch_size if a.ours_prompts == "distinct" else per_iter) * n_steps, a.batch_size)
    # the training questions in their fixed order, cycled as often as needed; TRL reads the first per_iter x n_steps
    questions = tasks.questions("arithmetic", held_out=False)
    rows = [{"prompt": tasks.prompt(q), "answer": sum(q)}
            for q in (questions[i % len(questions)] for i in range(n_prompts))]
    if a.ours_prompts == "grouped":  # TRL's RepeatSampler order: each prompt num_generations times in a row
        ours_steps = [[s * per_iter + j for j in range(per_iter) for _ in range(a.num_generations)]
                      for s in range(n_steps)]
    else:
        ours_steps = [list(range(s * a.batch_size, (s + 1) * a.batch_size)) for s in range(n_steps)]
    meta = harness.machine_meta() | {
        "model": model_dir, "batch_size": a.batch_size, "num_generations": a.num_generations,
        "ours_prompts": a.ours_prompts, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
        "warmup": a.warmup_steps, "timed": a.timed_steps, "num_prompts": n_prompts,
        "prompt_tokens": harness.prompt_tokens(model_dir, rows)}
    print(f"work dir {work}; {n_prompts} prompt rows ({len(questions)} distinct questions), {meta['prompt_tokens']} "
          f"tokens each; load {meta['load_start']}", flush=True)
    base_spec = {"model": model_dir, "prompts": harness.write_jsonl(work / "prompts.jsonl", rows),
                 "eval_prompts": harness.write_jsonl(work / "eval_prompts.jsonl", rows[:1]),  # ours needs one; unused
                 "num_prompts": n_prompts, "ours_steps": ours_steps, "batch_size": a.batch_size,
                 "num_generations": a.num_generations, "max_new_tokens": a.max_new_tokens,
                 "temperature": a.temperature, "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps}
    raw = harness.run_all(a, __file__, runs, CONFIGS, work, meta,
                          lambda name, cfg: base_spec | {"ours_kwargs": cfg.get("ours_kwargs", {}),
                                                         "trl_kwargs": cfg.get("trl_kwargs", {})},
                          harness.describe_iterations)
    results = {name: harness.summarize_iterations(raw[name], a.warmup_steps, a.batch_size) for name in runs}
    harness.finish(a, work, meta, results, render(results, runs, meta))


if __name__ == "__main__":
    main()
