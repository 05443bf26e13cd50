"""Our DPO (dpo.py) against TRL's DPOTrainer: same model, rows, batch, truncation and precision; with --baseline-repo,
also against another checkout's dpo.py (baseline-bf16). Each configuration trains in a fresh process: this file, run
again with --worker. Commands, and what is held equal: benchmarks/README.md.
"""
from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import harness
from harness import config_name, gb, repo_on_path


def C(side: str, precision: str, label: str, args: dict | None = None, **kw) -> dict:
    """A configuration: side, precision, table label, and dpo.Args fields (ours) or DPOConfig kwargs (TRL)."""
    return dict(side=side, precision=precision, label=label, **{"ours_args" if side == "ours" else "trl_kwargs":
                                                                 args or {}}, **kw)


PRE, GC, LORA_R = {"precompute_ref_logps": True}, {"gradient_checkpointing": True}, {"lora_r": 16}
TRL_BEST = {"precompute_ref_log_probs": True, "padding_free": True, "gradient_checkpointing": False}
CONFIGS = {
    "ours-fp32": C("ours", "fp32", "ours fp32"),
    "trl-fp32": C("trl", "fp32", "TRL defaults fp32"),
    "ours-fp32-pre": C("ours", "fp32", "ours fp32 --precompute-ref-logps", PRE),
    "trl-fp32-best": C("trl", "fp32", "TRL best fp32: precompute_ref_log_probs padding_free "
                       "gradient_checkpointing=False", TRL_BEST),
    "ours-bf16": C("ours", "bf16", "ours bf16"),
    "trl-bf16": C("trl", "bf16", "TRL defaults bf16"),
    "ours-bf16-pre": C("ours", "bf16", "ours bf16 --precompute-ref-logps", PRE),
    "trl-best": C("trl", "bf16", "TRL best: bf16 precompute_ref_log_probs padding_free gradient_checkpointing=False",
                  TRL_BEST),
    # levers, taken away one group at a time from ours-bf16-pre
    "ours-bf16-pre-padded": C("ours", "bf16", "lever off: --no-padding-free (padded batch)",
                              PRE | {"padding_free": False}),
    "ours-bf16-pre-stock": C("ours", "bf16", "levers off: padded + foreach AdamW + glibc malloc defaults",
                             PRE | {"padding_free": False}, stock=True),
    # not in the default set
    "ours-fp32-gc": C("ours", "fp32", "ours fp32 --gradient-checkpointing (TRL's default)", GC),
    "ours-bf16-gc": C("ours", "bf16", "ours bf16 --gradient-checkpointing (TRL's default)", GC),
    "trl-bf16-nogc": C("trl", "bf16", "TRL bf16 gradient_checkpointing=False", {"gradient_checkpointing": False}),
    # LoRA r=16 (alpha 32, dropout 0, every linear layer of the decoder) on both sides: `--configs lora`
    "ours-bf16-lora": C("ours", "bf16", "ours bf16 --lora-r 16", LORA_R, lora=True),
    "ours-bf16-lora-gc": C("ours", "bf16", "ours bf16 --lora-r 16 --gradient-checkpointing (TRL's default)",
                           LORA_R | GC, lora=True),
    "trl-bf16-lora": C("trl", "bf16", "TRL defaults bf16 + the same peft LoraConfig", lora=True),
    "trl-bf16-lora-best": C("trl", "bf16", "TRL best bf16 + the same peft LoraConfig", TRL_BEST, lora=True),
    # ours-bf16 run by --baseline-repo's bench_dpo.py worker, with its own modules (the layout before a change)
    "baseline-bf16": C("ours", "bf16", "baseline bf16 (--baseline-repo)"),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
GROUPS = {"lora": ["ours-bf16", "ours-bf16-lora", "trl-bf16-lora", "ours-bf16-lora-gc", "trl-bf16-lora-best"]}
DEFAULT_ORDER = ["ours-fp32", "trl-fp32", "ours-fp32-pre", "trl-fp32-best", "ours-bf16", "trl-bf16", "ours-bf16-pre",
                 "trl-best", "ours-bf16-pre-padded", "ours-bf16-pre-stock"]
# (ours, TRL) pairs for the ratio table
PAIRS = [("ours-fp32", "trl-fp32"), ("ours-fp32-pre", "trl-fp32"), ("ours-fp32-pre", "trl-fp32-best"),
         ("ours-bf16", "trl-bf16"), ("ours-bf16-pre", "trl-bf16"), ("ours-bf16-pre", "trl-best"),
         ("ours-fp32-gc", "trl-fp32"), ("ours-bf16-gc", "trl-bf16"), ("ours-bf16-lora", "trl-bf16-lora"),
         ("ours-bf16-lora", "trl-bf16-lora-best"), ("ours-bf16-lora-gc", "trl-bf16-lora"),
         ("ours-bf16-lora", "ours-bf16")]


def ref_in_step(cfg: dict) -> bool:
    return not (cfg.get("ours_args", {}).get("precompute_ref_logps")
                or cfg.get("trl_kwargs", {}).get("precompute_ref_log_probs"))


# ----------------------------------------------------------------------------------------------------------------------
# Workers (the spec's keys are the protocol a --baseline-repo checkout's worker reads too: keep them)


def worker_ours(spec: dict) -> dict:
    repo_on_path()
    import torch

    import common
    import dpo

    class TimedDPOTrainer(dpo.DPOTrainer):
        precompute_s = None

        def precompute_reference(self, *a, **k):
            t = time.perf_counter()
            super().precompute_reference(*a, **k)
            self.precompute_s = time.perf_counter() - t

    if spec["stock"]:  # the levers that have no flag, off: glibc's default allocator, PyTorch's default AdamW
        from plumbing import speed
        speed.choose_heap = lambda device, fsdp: None
        build = common.BaseTrainer.build_optimizer

        def foreach_adamw(self):
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in build(self).param_groups]
            return torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=tuple(self.args.adam_betas))
        common.BaseTrainer.build_optimizer = foreach_adamw
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    args = dpo.Args(model=spec["model"], dataset=spec["rows"], eval_dataset=spec["eval_rows"],
                    output_dir=spec["output_dir"], total_steps=n_steps, batch_size=spec["batch_size"],
                    max_length=spec["max_length"], max_prompt_length=spec["max_length"],
                    precision=spec["precision"], learning_rate=1e-6, warmup_steps=0, seed=1, **spec["ours_args"])
    computed = []  # tokens through the model: the packed row (each prompt once) or the non-pad tokens of the batch
    trainer, outs, report = harness.time_ours(
        TimedDPOTrainer, args, spec["num_rows"], harness.sequential(spec["num_rows"], spec["batch_size"], n_steps),
        n_steps, record=lambda b: computed.append(harness.computed_tokens(b)))
    return report | {"tokens": [o.num_tokens for o in outs], "computed_tokens": computed,
                     "precompute_s": trainer.precompute_s}


def worker_trl(spec: dict) -> dict:
    from trl import DPOConfig, DPOTrainer

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    config = DPOConfig(**harness.trl_kwargs(
        spec, per_device_train_batch_size=spec["batch_size"], max_steps=n_steps, max_length=spec["max_length"],
        bf16=spec["precision"] == "bf16", train_sampling_strategy="sequential"))
    state = {"tokens": [], "precompute_s": None}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            state["precompute_s"] = (state["precompute_s"] or 0.0) + time.perf_counter() - t
            return out

        def training_step(self, model, inputs, *a, **k):
            state["tokens"].append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig
        peft_config = LoraConfig(**LORA)
    trainer, report = harness.time_trl(TimedDPOTrainer, spec, config, state, [
        {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in harness.read_jsonl(spec["rows"])],
        peft_config=peft_config)
    if config.padding_free and not trainer.padding_free:
        report["notes"].append("padding_free=True fell back to padding (TRL 1.16: 'temporarily unavailable')")
    return report | {"tokens": state["tokens"], "precompute_s": state["precompute_s"]}


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def summarize(res: dict, cfg: dict, warmup: int, n_params: int, peaks: dict) -> dict:
    if "error" in res:
        return res
    stats, t_mean = harness.timed_stats(res["step_s"][warmup:]), harness.mean(res["tokens"][warmup:])
    c_mean = harness.mean(res.get("computed_tokens", res["tokens"])[warmup:])  # TRL: every non-pad token goes through
    # LoRA: the frozen weights need no weight gradients, so the backward costs 2NT instead of 4NT
    coef = (4 if cfg.get("lora") else 6) + 2 * ref_in_step(cfg)
    peak = peaks[cfg["precision"]] * 1e9 * stats["median_s"]
    return res | stats | {"tokens_mean": t_mean, "computed_mean": c_mean, "tokens_per_s": t_mean / stats["median_s"],
                          "coef": coef, "flops": coef * n_params * t_mean, "mfu": coef * n_params * t_mean / peak,
                          "hfu": coef * n_params * c_mean / peak}


def render(results: dict, runs: list[str], meta: dict) -> str:
    n, peaks, ml = meta["n_params"], meta["peaks"], meta["max_length"]
    label = lambda k: CONFIGS[config_name(k)]["label"] + (f" (run {k.split('#')[1]})" if "#" in k else "")
    ok = [k for k in runs if "error" not in results[k]]
    pb, pa = meta["peak_before"], meta["peak_after"]
    L = [f"# DPO benchmark: ours (dpo.py) vs TRL {meta.get('trl_version', '?')} DPOTrainer, same rows, batch, "
         f"truncation and precision\n",
         f"- model {meta['model']}, fp32 master weights, bf16 = autocast; rows: the first {meta['num_rows']} of "
         f"`{meta['data']}` whose prompt is under {ml} tokens ({meta['skipped']} skipped), in file order, "
         f"{meta['batch_size']} pairs per step, max length {ml} (what is held equal: benchmarks/README.md)",
         f"- matmul peak (torch.mm loop): bf16 {peaks['bf16']:.0f}, fp32 {peaks['fp32']:.0f} GFLOP/s, the higher of "
         f"before ({pb['bf16']:.0f} / {pb['fp32']:.0f}) and after ({pa['bf16']:.0f} / {pa['fp32']:.0f}) the runs",
         f"- MFU = (6 N T, 4 N T under LoRA, + 2 N T with a reference forward in the step) / median s / the dtype's "
         f"peak; N = {n:,} (without the input embedding; {meta['n_total']:,} in all), T = non-pad tokens per step; "
         f"HFU: the same on the tokens computed (ours packs each prompt once)", *harness.header_lines(meta)]
    L += harness.table(
        ["configuration", "s/step (median [min-max])", "tokens/step", "computed", "tokens/s", "FLOPs/step", "MFU",
         "HFU", "peak RSS train GB", "peak RSS process GB", "one-off ref precompute s", "load before -> after"],
        [harness.failed(r, label(k)) if "error" in r else
         [label(k), harness.med_range(r), f"{r['tokens_mean']:.0f}", f"{r['computed_mean']:.0f}",
          f"{r['tokens_per_s']:.0f}", f"{r['coef']}NT = {r['flops'] / 1e12:.3f} T", f"{100 * r['mfu']:.1f}%",
          f"{100 * r['hfu']:.1f}%", gb(r["train_peak_rss"]), gb(r["process_peak_rss"]),
          "-" if r.get("precompute_s") is None else f"{r['precompute_s']:.1f}", f"{r['load_before']} -> "
          f"{r['load_after']}"] for k, r in ((k, results[k]) for k in runs)])
    pre = [f"{label(k)}: {results[k]['precompute_s']:.1f} s for {meta['num_rows']} train rows"
           + (" + 1 eval row" if CONFIGS[config_name(k)]["side"] == "ours" else "")
           for k in ok if results[k].get("precompute_s") is not None]
    if pre:
        L.append("\nOne-off reference precompute (before training, not in s/step): " + "; ".join(pre) + ".")
    L.append(harness.notes_line(results, runs, CONFIGS, lambda k, r: f"{k}: gradient_checkpointing="
                                f"{r['gradient_checkpointing']}, optim={r['optim']}"))
    L += ["\n## Ratios ours / TRL\n"]
    pairs = [(o, t) for o, t in PAIRS if harness.finished(results, o, t)]
    L += harness.table(["ours", "TRL", "s/step ours/TRL", "speed-up TRL/ours", "tokens/s ours/TRL",
                        "peak RSS train ours/TRL", "peak RSS process ours/TRL"],
                       [[CONFIGS[o]["label"], CONFIGS[t]["label"], f"{ro['median_s'] / rt['median_s']:.3f}",
                         f"{rt['median_s'] / ro['median_s']:.2f}x", f"{ro['tokens_per_s'] / rt['tokens_per_s']:.2f}",
                         harness.ratio(ro["train_peak_rss"], rt["train_peak_rss"]),
                         f"{ro['process_peak_rss'] / rt['process_peak_rss']:.2f}"]
                        for o, t, ro, rt in ((o, t, results[o], results[t]) for o, t in pairs)])
    L.append(same_tokens_line(results, [x for p in pairs for x in p]))
    L += ["\nTargets, ours vs TRL DPOTrainer on the same rows (step time ours/TRL; MFU; peak RSS train at equal "
          "settings):", *targets(results), *baseline_lines(results, ok, meta)]
    return "\n".join(L) + "\n"


def same_tokens_line(results: dict, keys: list[str]) -> str:
    if len({tuple(results[k]["tokens"]) for k in keys}) > 1:
        return "\nWarning: per-step token counts differ: " + "; ".join(f"{k}: {results[k]['tokens']}" for k in keys)
    return "\nPer-step non-pad token counts are identical on every side compared here."


def targets(results: dict) -> list[str]:
    ok, out = lambda *names: harness.finished(results, *names), []
    for prec, bound, ours, trls in (("bf16", 4, ("ours-bf16", "ours-bf16-pre"), ("trl-bf16", "trl-best")),
                                    ("fp32", 2, ("ours-fp32", "ours-fp32-pre"), ("trl-fp32", "trl-fp32-best"))):
        if not (mine := [k for k in ours if ok(k)]):
            continue
        best = min(mine, key=lambda k: results[k]["median_s"])
        for t in filter(ok, trls):
            r = results[best]["median_s"] / results[t]["median_s"]
            out.append(f"- {prec} step time <= 1/{bound} of {t}: best ours ({best}) {r:.3f} -> "
                       f"{'met' if r <= 1 / bound else 'NOT met'}")
        if prec == "bf16":
            m = results[best]["mfu"]
            out.append(f"- bf16 MFU >= 40%: {best} {100 * m:.1f}% (HFU {100 * results[best]['hfu']:.1f}%) -> "
                       f"{'met' if m >= 0.4 else 'NOT met'}")
    for o, t in (PAIRS[i] for i in (0, 2, 3, 5, 6, 7)):  # at equal settings
        if ok(o, t) and results[o]["train_peak_rss"] and results[t]["train_peak_rss"]:
            r = results[o]["train_peak_rss"] / results[t]["train_peak_rss"]
            out.append(f"- peak RSS (train) <= 0.6x: {o} / {t} = {r:.2f} -> {'met' if r <= 0.6 else 'NOT met'}")
    return out


def baseline_lines(results: dict, ok: list[str], meta: dict) -> list[str]:
    """ours-bf16 against baseline-bf16: the timed steps of all runs of each pooled, and ours / baseline."""
    runs = {c: [k for k in ok if config_name(k) == c] for c in ("ours-bf16", "baseline-bf16")}
    if not all(runs.values()):
        return []
    pooled = {c: statistics.median([x for k in ks for x in results[k]["step_s"][meta["warmup_steps"]:]])
              for c, ks in runs.items()}
    L = [f"\n## Layout: this checkout vs --baseline-repo {meta['baseline']}\n",
         "Both run ours-bf16's spec, each with its own checkout's worker and modules; pooled = the median of the timed "
         "steps of all runs of a configuration, per run in brackets.\n"]
    L += harness.table(["configuration", "runs", "s/step pooled", "per run", "peak RSS train GB (max)"],
                       [[c, len(ks), f"{pooled[c]:.3f}", ", ".join(f"{results[k]['median_s']:.2f}" for k in ks),
                         gb(max(results[k]["train_peak_rss"] or 0 for k in ks) or None)]
                        for c, ks in runs.items()])
    return L + [f"\nours / baseline: **{pooled['ours-bf16'] / pooled['baseline-bf16']:.3f}** (pooled s/step).",
                same_tokens_line(results, runs["ours-bf16"] + runs["baseline-bf16"]).strip()]


def use_baseline(path: str | None) -> str:
    """Point baseline-bf16 at PATH's worker (run from PATH, so it imports PATH's modules). -> PATH and its commit."""
    root = Path(path or ".").resolve()
    if not path or not (root / "benchmarks" / "bench_dpo.py").exists():
        raise SystemExit(f"baseline-bf16 needs --baseline-repo PATH, a checkout with benchmarks/bench_dpo.py ({path})")
    commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h of %cs"], capture_output=True, text=True)
    CONFIGS["baseline-bf16"] |= {"script": str(root / "benchmarks" / "bench_dpo.py"), "cwd": root,
                                 "label": f"baseline bf16 ({root.name})"}
    return f"`{root}` ({commit.stdout.strip() or 'not a git checkout'})"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_dpo.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=2, timed=4, timeout=1200, data=True)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="per dtype, per measurement")
    p.add_argument("--baseline-repo", help="another checkout of this repo: baseline-bf16 runs its "
                   "benchmarks/bench_dpo.py worker, from its directory, with --ours-python")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, worker_trl):
        return
    runs = harness.parse_runs(a, CONFIGS, GROUPS)
    baseline = use_baseline(a.baseline_repo) if "baseline-bf16" in runs else None
    model_dir, work, meta = harness.start(a, "bench_dpo_")
    k = a.batch_size * (a.warmup_steps + a.timed_steps)
    rows, skipped = harness.select_rows(harness.data_path(a.data), model_dir, k, a.max_length)
    n_params, n_total = harness.non_embedding_params(model_dir)
    meta |= {"num_rows": k, "skipped": skipped, "n_params": n_params, "n_total": n_total, "baseline": baseline,
             "peak_before": harness.matmul_peak(a.matmul_seconds)}
    print(f"work dir {work}; {k} rows ({skipped} skipped: prompt >= {a.max_length} tokens); N = {n_params:,}; "
          f"matmul peak {meta['peak_before']}; load {meta['load_start']}", flush=True)
    base = {key: meta[key] for key in ("model", "batch_size", "max_length", "warmup_steps", "timed_steps")} | {
        "rows": harness.write_jsonl(work / "rows.jsonl", rows), "num_rows": k,
        "eval_rows": harness.write_jsonl(work / "eval_rows.jsonl", rows[:1])}  # ours needs an eval set; one row
    raw = harness.run_all(a, __file__, runs, CONFIGS, work, meta, lambda name, cfg: base | {
        "precision": cfg["precision"], "ours_args": cfg.get("ours_args", {}), "stock": cfg.get("stock", False),
        "trl_kwargs": cfg.get("trl_kwargs", {}), "lora": cfg.get("lora", False)},
        lambda r: f"steps {harness.seconds(r['step_s'])} s; tokens {r['tokens']}"
                  + ("" if r.get("precompute_s") is None else f", precompute {r['precompute_s']:.1f} s"))
    meta["peak_after"] = harness.matmul_peak(a.matmul_seconds)
    meta["peaks"] = {d: max(meta["peak_before"][d], meta["peak_after"][d]) for d in ("bf16", "fp32")}
    results = {k: summarize(raw[k], CONFIGS[config_name(k)], a.warmup_steps, n_params, meta["peaks"]) for k in runs}
    harness.finish(a, work, meta, results, render(results, runs, meta))


if __name__ == "__main__":
    main()
