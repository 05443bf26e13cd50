"""Our GRPO (grpo.py) against TRL's GRPOTrainer: same model, prompts, reward, group size, token cap, sampling, loss,
beta, updates per generation and precision; tools-*: multi-turn episodes with a calculator on both sides. The
workers are harness's; commands and what is held equal: benchmarks/README.md.
"""
from __future__ import annotations

import harness

TARGET_SPEEDUP = 4.0  # episodes/s >= 4x TRL's, at its defaults and at its best; peak RSS <= TRL's
TRL_SHARED = {"loss_type": "dapo", "beta": 0.0}  # GRPOConfig's defaults today, pinned in case they move
EPISODE_TOKENS = 256  # tools-trl: max_completion_length, the whole episode's budget (ours: --max-length 256)
CONFIGS = {  # name -> side, label, and grpo.Args fields (ours) or GRPOConfig kwargs (TRL) on top of the shared ones
    "ours": dict(side="ours", label="ours bf16 (grpo.py defaults: padding-free, group prompt shared)", ours_kwargs={}),
    "trl-defaults": dict(side="trl", label="TRL defaults bf16 (gradient_checkpointing)", trl_kwargs={}),
    "trl-best": dict(side="trl", label="TRL bf16 gradient_checkpointing=False",
                     trl_kwargs={"gradient_checkpointing": False}),
    # not in the default set
    "ours-padded": dict(side="ours", label="ours bf16 --no-padding-free (log-prob forward on the left-padded batch)",
                        ours_kwargs={"padding_free": False}),
    "ours-fp32": dict(side="ours", label="ours fp32", ours_kwargs={"precision": "fp32"}),
    "trl-fp32": dict(side="trl", label="TRL defaults fp32", trl_kwargs={"bf16": False}),
    # the tool task (--dataset multiply): each side's own tool loop and format, the same questions
    "tools-ours": dict(side="ours", label="ours bf16, multiply: CalculatorEnv episodes", ours_kwargs={}, tools=True),
    "tools-trl": dict(side="trl", label="TRL defaults bf16, multiply: tools=[calculator], TRL's Qwen2.5 template",
                      trl_kwargs={}, tools=True),
}
DEFAULT_ORDER = ["ours", "trl-defaults", "ours", "trl-best", "ours"]  # ours around each TRL run: drift shows on both


def render(results: dict, runs: list[str], meta: dict) -> str:
    bs, g = meta["batch_size"], meta["num_generations"]
    L = [f"# GRPO benchmark: ours (grpo.py) vs TRL {meta.get('trl_version', '?')} GRPOTrainer, same prompts, reward, "
         f"group size, token cap, loss and updates\n",
         f"- model {meta['model']}, fp32 master weights, bf16 autocast unless the label says fp32; the built-in "
         f"arithmetic prompts ({meta['prompt_tokens']} tokens) in order, {bs} episodes per iteration = {bs // g} "
         f"prompts x {g}; `tasks.reward`; loss dapo, beta 0, num_iterations {meta['num_iterations']} (what is held "
         f"equal: benchmarks/README.md)", harness.sampling_line(meta), *harness.header_lines(meta, "iterations")]
    L += harness.iteration_table(results, runs, CONFIGS)
    L.append(harness.notes_line(
        results, runs, CONFIGS, lambda k, r: f"{harness.trl_grpo_note(k, r)}, autocast {r['autocast']}",
        lambda k, r: f"{k}: precision {r['precision']}, padding_free={r['padding_free']}, lr {r['learning_rate']:g}, "
                     f"mean reward per iteration {[round(x, 2) for x in r['rewards']]}"))
    tools = lambda k: CONFIGS[harness.config_name(k)].get("tools", False)  # noqa: E731
    if tool_runs := [k for k in runs if tools(k) and "error" not in results[k]]:
        w = meta["warmup_steps"]
        L.append(f"\nTool task (multiply questions; ours' prompt {meta['tool_prompt_tokens']} tokens; at most "
                 f"{meta['tool_max_new_tokens']} new tokens per turn, {meta['max_turns']} turns per episode), means "
                 f"per episode over the timed iterations: " + "; ".join(
                     f"{k}: generated tokens {results[k]['gen_tokens_mean'] / bs:.1f}, turns "
                     f"{harness.mean(results[k]['turns'][w:]):.2f}, tool calls "
                     f"{harness.mean(results[k]['tool_calls'][w:]):.2f}" for k in tool_runs) + ".")
    for t in (False, True):  # the arithmetic runs against each other, the tool runs against each other
        ours_runs, trl_runs = ([k for k in x if tools(k) == t] for x in harness.split_runs(results, runs, CONFIGS))
        if not (ours_runs and trl_runs):
            continue
        L.append(harness.same_prompts_line(results, ours_runs, trl_runs))
        best = min(trl_runs, key=lambda k: results[k]["median_s"])
        L.append(f"\n## Ratios ours / TRL GRPOTrainer{', tool task' if t else ''} (targets: episodes/s >= "
                 f"{TARGET_SPEEDUP:g}x TRL's at its defaults and at its best; peak RSS <= TRL's)\n\nours = the timed "
                 f"iterations of all runs of that configuration pooled (median); per run in brackets. TRL's best = its "
                 f"fastest configuration here ({best}). RSS: the largest of ours' runs over TRL's.\n")
        L += harness.table(
            ["ours", "TRL", "ours s/iteration (pooled)", "TRL s/iteration", "episodes/s ours/TRL (per ours run)",
             f">= {TARGET_SPEEDUP:g}x", "peak RSS train ours/TRL", "<= 1", "peak RSS process ours/TRL"],
            [[x["ours"], x["trl"] + (" (best)" if x["trl"] == best else ""), f"{x['pooled']:.2f}", f"{x['trl_s']:.2f}",
              f"{x['speedup']:.2f}x [{x['per_run']}]", "met" if x["speedup"] >= TARGET_SPEEDUP else "NOT met",
              x["rss"], x["rss_ok"], x["proc"]]
             for x in harness.online_ratios(results, ours_runs, trl_runs, meta["warmup_steps"])])
    return "\n".join(L) + "\n"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_grpo.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=3, timeout=900, unit="iterations")
    p.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per iteration")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (G), both sides")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens per episode, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (both sides)")
    p.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per generation (both sides)")
    p.add_argument("--tool-max-new-tokens", type=int, default=16, help="tools-*: generated tokens per turn, at most")
    p.add_argument("--max-turns", type=int, default=3, help="tools-*: assistant turns per episode, at most (TRL: "
                   "max_tool_calling_iterations = this - 1)")
    a = p.parse_args()
    if harness.run_as_worker(a, harness.worker_ours_grpo, harness.worker_trl_grpo):
        return
    if a.num_generations < 2 or a.batch_size % a.num_generations or a.num_iterations < 1:
        raise SystemExit("--num-generations must be >= 2 and divide --batch-size; --num-iterations must be >= 1")
    runs = harness.parse_runs(a, CONFIGS)
    model_dir, work, meta = harness.start(a, "bench_grpo_")
    prompts, rows = harness.grpo_prompts(work, a.warmup_steps + a.timed_steps, a.batch_size, a.num_generations)
    tool, tool_rows = harness.grpo_prompts(work, a.warmup_steps + a.timed_steps, a.batch_size, a.num_generations,
                                           "multiply", "tool_prompts")
    meta |= {"prompt_tokens": harness.prompt_tokens(model_dir, rows),
             "tool_prompt_tokens": harness.prompt_tokens(model_dir, tool_rows)}
    print(f"work dir {work}; {len(rows)} prompt rows, {meta['prompt_tokens']} tokens each; load {meta['load_start']}",
          flush=True)
    base = prompts | {k: meta[k] for k in ("model", "num_iterations", "max_new_tokens", "temperature", "warmup_steps",
                                           "timed_steps")}
    tool |= {"max_new_tokens": a.tool_max_new_tokens, "max_turns": a.max_turns, "episode_tokens": EPISODE_TOKENS}
    raw = harness.run_all(a, __file__, runs, CONFIGS, work, meta, lambda name, cfg: base | (
        tool if cfg.get("tools") else {}) | {
        "ours_kwargs": cfg.get("ours_kwargs", {}) | ({"max_turns": a.max_turns} if cfg.get("tools") else {}),
        "trl_kwargs": TRL_SHARED | cfg["trl_kwargs"] if cfg["side"] == "trl" else {}}, harness.describe_iterations)
    results = {name: harness.summarize_iterations(raw[name], a.warmup_steps, a.batch_size) for name in runs}
    harness.finish(a, work, meta, results, render(results, runs, meta))


if __name__ == "__main__":
    main()
