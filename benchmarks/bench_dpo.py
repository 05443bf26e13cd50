"""Our DPO (dpo.py's DPOTrainer) against TRL's DPOTrainer: same model, rows, batch, truncation and precision.

    python benchmarks/bench_dpo.py --trl-python /tmp/trl-venv/bin/python       # ~15 min on the 2-core CPU
    python benchmarks/bench_dpo.py --warmup-steps 1 --timed-steps 1 --configs ours-bf16,trl-bf16   # a quick check

Every configuration runs in its own fresh process (ours with this interpreter, TRL with --trl-python, where TRL is
installed; see benchmarks/requirements-trl.txt), one after the other, ours and TRL alternating. Each process trains
warm-up + timed optimizer steps on the same rows in the same order (no shuffling) and reports the seconds of every
step, the non-pad tokens of every step, its peak RSS and the one-off reference precompute. The parent measures the
matmul peak of this machine (bf16 and fp32, a torch.mm loop) before and after the runs and writes the table to
benchmarks/results_dpo.md.

This file also runs as the worker (`--worker ours|trl --spec FILE`): it imports nothing at module level beyond the
standard library and harness.py, so the TRL venv needs neither tyro nor this repo's requirements.
"""
from __future__ import annotations

import time

import harness
from harness import gb, memory_report, repo_on_path

# name -> what runs: side, precision, table label, and the flags of ours (dpo.Args fields) or TRL (DPOConfig kwargs)
TRL_BEST = {"precompute_ref_log_probs": True, "padding_free": True, "gradient_checkpointing": False}
CONFIGS = {
    "ours-fp32": dict(side="ours", precision="fp32", label="ours fp32", ours_args={}),
    "trl-fp32": dict(side="trl", precision="fp32", label="TRL defaults fp32", trl_kwargs={}),
    "ours-fp32-pre": dict(side="ours", precision="fp32", label="ours fp32 --precompute-ref-logps",
                          ours_args={"precompute_ref_logps": True}),
    "trl-fp32-best": dict(side="trl", precision="fp32", label="TRL best fp32: precompute_ref_log_probs padding_free "
                          "gradient_checkpointing=False", trl_kwargs=TRL_BEST),
    "ours-bf16": dict(side="ours", precision="bf16", label="ours bf16", ours_args={}),
    "trl-bf16": dict(side="trl", precision="bf16", label="TRL defaults bf16", trl_kwargs={}),
    "ours-bf16-pre": dict(side="ours", precision="bf16", label="ours bf16 --precompute-ref-logps",
                          ours_args={"precompute_ref_logps": True}),
    "trl-best": dict(side="trl", precision="bf16",
                     label="TRL best: bf16 precompute_ref_log_probs padding_free gradient_checkpointing=False",
                     trl_kwargs=TRL_BEST),
    # levers, taken away one group at a time from ours-bf16-pre
    "ours-bf16-pre-padded": dict(side="ours", precision="bf16", label="lever off: --no-padding-free (padded batch)",
                                 ours_args={"precompute_ref_logps": True, "padding_free": False}),
    "ours-bf16-pre-stock": dict(side="ours", precision="bf16", label="levers off: padded + foreach AdamW + glibc "
                                "malloc defaults", ours_args={"precompute_ref_logps": True, "padding_free": False},
                                stock=True),
    # not in the default set
    "ours-fp32-gc": dict(side="ours", precision="fp32", label="ours fp32 --gradient-checkpointing (TRL's default)",
                         ours_args={"gradient_checkpointing": True}),
    "ours-bf16-gc": dict(side="ours", precision="bf16", label="ours bf16 --gradient-checkpointing (TRL's default)",
                         ours_args={"gradient_checkpointing": True}),
    "trl-bf16-nogc": dict(side="trl", precision="bf16", label="TRL bf16 gradient_checkpointing=False",
                          trl_kwargs={"gradient_checkpointing": False}),
    # LoRA r=16 (alpha 32, dropout 0, every linear layer of the decoder) on both sides: `--configs lora`
    "ours-bf16-lora": dict(side="ours", precision="bf16", label="ours bf16 --lora-r 16", ours_args={"lora_r": 16},
                           lora=True),
    "ours-bf16-lora-gc": dict(side="ours", precision="bf16", label="ours bf16 --lora-r 16 --gradient-checkpointing "
                              "(TRL's default)", ours_args={"lora_r": 16, "gradient_checkpointing": True}, lora=True),
    "trl-bf16-lora": dict(side="trl", precision="bf16", label="TRL defaults bf16 + the same peft LoraConfig",
                          trl_kwargs={}, lora=True),
    "trl-bf16-lora-best": dict(side="trl", precision="bf16", label="TRL best bf16 + the same peft LoraConfig",
                               trl_kwargs=TRL_BEST, lora=True),
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
    if cfg["side"] == "ours":
        return not cfg["ours_args"].get("precompute_ref_logps", False)
    return not cfg["trl_kwargs"].get("precompute_ref_log_probs", False)


# ----------------------------------------------------------------------------------------------------------------------
# Workers


def worker_ours(spec: dict) -> dict:
    repo_on_path()
    import torch

    import dpo

    class TimedDPOTrainer(dpo.DPOTrainer):
        precompute_s = None

        def precompute_reference(self, *a, **k):
            t = time.perf_counter()
            super().precompute_reference(*a, **k)
            self.precompute_s = time.perf_counter() - t

    if spec["stock"]:  # the levers that have no flag, off: PyTorch's default AdamW, glibc's default allocator
        import common
        common.keep_freed_memory = lambda: None
        build = common.BaseTrainer.build_optimizer

        def foreach_adamw(self, model):
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                      for g in build(self, model).param_groups]
            return torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=tuple(self.args.adam_betas))
        common.BaseTrainer.build_optimizer = foreach_adamw
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    args = dpo.Args(model=spec["model"], dataset=spec["rows"], eval_dataset=spec["eval_rows"],
                    output_dir=spec["output_dir"], total_steps=n_steps, batch_size=spec["batch_size"],
                    max_length=spec["max_length"], max_prompt_length=spec["max_length"],
                    precision=spec["precision"], learning_rate=1e-6, warmup_steps=0, seed=1, **spec["ours_args"])
    trainer, setup_s = harness.build_ours(TimedDPOTrainer, args, spec["num_rows"])
    trainer.sampler = harness.SequentialSampler(len(trainer.train_data), spec["batch_size"])
    computed = []  # tokens through the model: the packed row (each prompt once) or the non-pad tokens of the batch
    harness.on_batch(trainer, lambda b: computed.append(int(
        b["input_ids"].numel() if "attention_mask" not in b.tensors else b["attention_mask"].sum())))
    times, outs, reset_ok = harness.timed_steps(trainer, n_steps, torch)
    return memory_report(torch, reset_ok) | {
        "step_s": times, "tokens": [o.num_tokens for o in outs], "computed_tokens": computed,
        "precompute_s": trainer.precompute_s, "setup_s": setup_s, "notes": []}


def worker_trl(spec: dict) -> dict:
    torch = harness.trl_setup()
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    rows = harness.read_jsonl(spec["rows"])
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = DPOConfig(**harness.trl_kwargs(
        spec, torch, per_device_train_batch_size=spec["batch_size"], max_steps=n_steps, max_length=spec["max_length"],
        bf16=spec["precision"] == "bf16", train_sampling_strategy="sequential"))
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig
        peft_config = LoraConfig(**LORA)
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

    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(model=spec["model"], args=config, train_dataset=ds,
                              processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                              callbacks=[harness.trl_step_timer(state, torch)], peft_config=peft_config)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_dataset) != spec["num_rows"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {spec['num_rows']} rows")
    notes = []
    if config.padding_free and not trainer.padding_free:
        notes.append("padding_free=True fell back to padding (TRL 1.16: 'temporarily unavailable')")
    trainer.train()
    if len(state["times"]) != n_steps:
        raise RuntimeError(f"TRL ran {len(state['times'])} steps, expected {n_steps}")
    return harness.trl_report(config, torch, state["reset_ok"], notes, step_s=state["times"], tokens=state["tokens"],
                              precompute_s=state["precompute_s"], setup_s=setup_s)


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def summarize(res: dict, cfg: dict, warmup: int, n_params: int, peaks: dict) -> dict:
    if "error" in res:
        return res
    timed, toks = res["step_s"][warmup:], res["tokens"][warmup:]
    stats = harness.timed_stats(timed)
    med = stats["median_s"]
    t_mean = sum(toks) / len(toks)
    # LoRA: the frozen weights need no weight gradients, so the backward costs 2NT instead of 4NT
    coef = (4 if cfg.get("lora") else 6) + 2 * ref_in_step(cfg)
    flops = coef * n_params * t_mean
    computed = res.get("computed_tokens", res["tokens"])[warmup:]  # TRL: every non-pad token goes through
    c_mean = sum(computed) / len(computed)
    return res | stats | {"tokens_mean": t_mean, "computed_mean": c_mean, "tokens_per_s": t_mean / med, "coef": coef,
                          "flops": flops, "mfu": flops / med / (peaks[cfg["precision"]] * 1e9),
                          "hfu": coef * n_params * c_mean / med / (peaks[cfg["precision"]] * 1e9)}



def render(results: dict, order: list[str], meta: dict) -> str:
    n, peaks = meta["n_params"], meta["peaks"]
    L = [f"# DPO benchmark: ours (dpo.py) vs TRL {meta.get('trl_version', '?')} DPOTrainer, same rows, batch, "
         f"truncation and precision\n", harness.machine_line(meta)]
    L.append(f"- model: {meta['model']} (the same directory for both sides), fp32 master weights; "
             f"bf16 = autocast on both sides (TRL: `bf16=True`)")
    L.append(f"- rows: the first {meta['num_rows']} rows of `{meta['data']}` whose prompt is shorter than "
             f"{meta['max_length']} tokens ({meta['skipped']} longer ones skipped), in file order on both sides "
             f"(ours: a sequential sampler; TRL: `train_sampling_strategy='sequential'`)")
    L.append(f"- batch {meta['batch_size']} pairs, 1 micro-batch per step, max_length {meta['max_length']}: TRL "
             f"truncates prompt+completion to {meta['max_length']} keeping the start (its only mode) and drops rows "
             f"whose prompt fills max_length; ours runs with `--max-length {meta['max_length']} --max-prompt-length "
             f"{meta['max_length']}`, which keeps such a prompt whole and cuts the completion from the right to "
             f"max_length - prompt: the same tokens (the tokens/step columns agree)")
    L.append(harness.steps_line(meta))
    L.append(f"- matmul peak (torch.mm loop, best of 1024^2 and 2048^2): bf16 {peaks['bf16']:.0f} GFLOP/s, "
             f"fp32 {peaks['fp32']:.0f} GFLOP/s (before the runs: bf16 {meta['peak_before']['bf16']:.0f} / fp32 "
             f"{meta['peak_before']['fp32']:.0f}; after: bf16 {meta['peak_after']['bf16']:.0f} / fp32 "
             f"{meta['peak_after']['fp32']:.0f}; the higher one is used)")
    L.append(f"- MFU = FLOPs per step / median s per step / matmul peak of the run's dtype; FLOPs per step = "
             f"6 x N x T for the policy + 2 x N x T when a reference forward runs in the step, N = {n:,} parameters "
             f"without the input embedding (the tied LM head counted; {meta['n_total']:,} in all), T = mean non-pad "
             f"tokens (prompt + completion, chosen and rejected) per timed step. Recomputation under gradient "
             f"checkpointing is not counted. 'computed' = tokens that actually went through the model (ours "
             f"packs each prompt once for both completions); HFU = the same formula on computed tokens, i.e. the "
             f"share of the matmul peak the step really used.")
    L.append("- peak RSS: 'train' = VmHWM of the worker process reset just before the first step (training "
             "phase only); 'process' = ru_maxrss over the process's life (loading, reference, precompute, training)")
    L.append(harness.load_line(meta))

    L.append("| configuration | s/step (median [min-max]) | tokens/step | computed | tokens/s | FLOPs/step | MFU | HFU "
             "| peak RSS train GB | peak RSS process GB | one-off ref precompute s | load before -> after |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in order:
        r, cfg = results[name], CONFIGS[name]
        if "error" in r:
            L.append(f"| {cfg['label']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        pre = "-" if r.get("precompute_s") is None else f"{r['precompute_s']:.1f}"
        L.append(f"| {cfg['label']} | {r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | "
                 f"{r['tokens_mean']:.0f} | {r['computed_mean']:.0f} | {r['tokens_per_s']:.0f} | "
                 f"{r['coef']}NT = {r['flops'] / 1e12:.3f} T | {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | "
                 f"{gb(r['train_peak_rss'])} | {gb(r['process_peak_rss'])} | {pre} | "
                 f"{r['load_before']} -> {r['load_after']} |")
    L.append("")
    L.append("FLOPs per step, with the numbers: " + "; ".join(
        f"{CONFIGS[k]['label']}: {results[k]['coef']} x {n:,} x {results[k]['tokens_mean']:.0f} = "
        f"{results[k]['flops'] / 1e12:.3f} TFLOP, / {results[k]['median_s']:.2f} s / "
        f"{peaks[CONFIGS[k]['precision']]:.0f} GFLOP/s = {100 * results[k]['mfu']:.1f}% MFU"
        for k in order if "error" not in results[k]))
    pre_lines = [f"{CONFIGS[k]['label']}: {results[k]['precompute_s']:.1f} s for {meta['num_rows']} train rows"
                 + (" + 1 eval row" if CONFIGS[k]["side"] == "ours" else "")
                 for k in order if "error" not in results[k] and results[k].get("precompute_s") is not None]
    if pre_lines:
        L.append("\nOne-off reference precompute (before training, not in s/step): " + "; ".join(pre_lines) + ".")
    notes = [f"{CONFIGS[k]['label']}: {x}" for k in order if "error" not in results[k]
             for x in results[k].get("notes", [])]
    for k in order:
        r = results[k]
        if "error" not in r and CONFIGS[k]["side"] == "trl":
            notes.append(f"{CONFIGS[k]['label']}: gradient_checkpointing={r['gradient_checkpointing']}, "
                         f"optim={r['optim']}")
    if notes:
        L.append("\nNotes: " + "; ".join(notes) + ".")

    L.append("\n## Ratios ours / TRL\n")
    L.append("| ours | TRL | s/step ours/TRL | speed-up TRL/ours | tokens/s ours/TRL | peak RSS train ours/TRL "
             "| peak RSS process ours/TRL |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    pairs = [(o, t) for o, t in PAIRS if harness.finished(results, o, t)]
    for o, t in pairs:
        ro, rt = results[o], results[t]
        L.append(f"| {CONFIGS[o]['label']} | {CONFIGS[t]['label']} | {ro['median_s'] / rt['median_s']:.3f} | "
                 f"{rt['median_s'] / ro['median_s']:.2f}x | {ro['tokens_per_s'] / rt['tokens_per_s']:.2f} | "
                 f"{harness.ratio(ro['train_peak_rss'], rt['train_peak_rss'])} | "
                 f"{ro['process_peak_rss'] / rt['process_peak_rss']:.2f} |")
    mism = [(o, t) for o, t in pairs if results[o]["tokens"] != results[t]["tokens"]]
    if mism:
        L.append("\nWarning: per-step token counts differ between " + ", ".join(f"{o}/{t}" for o, t in mism) + ": "
                 + "; ".join(f"{k}: {results[k]['tokens']}" for k in sorted({x for p in mism for x in p})))
    else:
        L.append("\nPer-step non-pad token counts are identical on both sides for every pair above.")
    L.append("\nTargets, ours vs TRL DPOTrainer on the same rows (step time ours/TRL; MFU; peak RSS train at equal "
             "settings):")
    L.append(targets(results))
    return "\n".join(L) + "\n"


def targets(results: dict) -> str:
    ok = lambda *names: harness.finished(results, *names)
    out = []
    for prec, bound, ours, trls in (("bf16", 4, ("ours-bf16", "ours-bf16-pre"), ("trl-bf16", "trl-best")),
                                    ("fp32", 2, ("ours-fp32", "ours-fp32-pre"), ("trl-fp32", "trl-fp32-best"))):
        mine = [k for k in ours if ok(k)]
        if not mine:
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
    for o, t in (("ours-fp32", "trl-fp32"), ("ours-fp32-pre", "trl-fp32-best"), ("ours-bf16", "trl-bf16"),
                 ("ours-bf16-pre", "trl-best"), ("ours-fp32-gc", "trl-fp32"), ("ours-bf16-gc", "trl-bf16")):
        if ok(o, t) and results[o]["train_peak_rss"] and results[t]["train_peak_rss"]:
            r = results[o]["train_peak_rss"] / results[t]["train_peak_rss"]
            out.append(f"- peak RSS (train) <= 0.6x: {o} / {t} = {r:.2f} -> {'met' if r <= 0.6 else 'NOT met'}")
    return "\n".join(out)



def main() -> None:
    p = harness.bench_parser(__doc__, output="results_dpo.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=2, timed=4, timeout=1200, data=True)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="per dtype, per measurement")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, worker_trl):
        return
    order = harness.parse_runs(a, CONFIGS, GROUPS)
    model_dir = harness.default_model(a.model)
    work = harness.workdir(a.workdir, "bench_dpo_")
    k = a.batch_size * (a.warmup_steps + a.timed_steps)
    rows, skipped = harness.select_rows(harness.data_path(a.data), model_dir, k, a.max_length)
    n_params, n_total = harness.non_embedding_params(model_dir)
    meta = harness.machine_meta() | {
        "model": model_dir, "data": a.data, "num_rows": k, "skipped": skipped, "batch_size": a.batch_size,
        "max_length": a.max_length, "warmup": a.warmup_steps, "timed": a.timed_steps, "n_params": n_params,
        "n_total": n_total}
    print(f"work dir {work}; {k} rows ({skipped} skipped: prompt >= {a.max_length} tokens); N = {n_params:,}; "
          f"load {meta['load_start']}", flush=True)
    meta["peak_before"] = harness.matmul_peak(a.matmul_seconds)
    print(f"matmul peak: bf16 {meta['peak_before']['bf16']:.0f} GFLOP/s, fp32 {meta['peak_before']['fp32']:.0f} "
          f"GFLOP/s", flush=True)
    base = {"model": model_dir, "rows": harness.write_jsonl(work / "rows.jsonl", rows),
            "eval_rows": harness.write_jsonl(work / "eval_rows.jsonl", rows[:1]),  # ours needs an eval set; one row
            "num_rows": k, "batch_size": a.batch_size, "max_length": a.max_length, "warmup_steps": a.warmup_steps,
            "timed_steps": a.timed_steps}

    def spec_of(name: str, cfg: dict) -> dict:
        return base | {"precision": cfg["precision"], "ours_args": cfg.get("ours_args", {}),
                       "stock": cfg.get("stock", False), "trl_kwargs": cfg.get("trl_kwargs", {}),
                       "lora": cfg.get("lora", False)}

    def describe(r: dict) -> str:
        pre = "" if r.get("precompute_s") is None else f", precompute {r['precompute_s']:.1f} s"
        return f"steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s; tokens {r['tokens']}{pre}"
    raw = harness.run_all(a, __file__, order, CONFIGS, work, meta, spec_of, describe)
    meta["peak_after"] = harness.matmul_peak(a.matmul_seconds)
    meta["peaks"] = {d: max(meta["peak_before"][d], meta["peak_after"][d]) for d in ("bf16", "fp32")}
    results = {name: summarize(raw[name], CONFIGS[name], a.warmup_steps, n_params, meta["peaks"]) for name in order}
    harness.finish(a, work, meta, results, render(results, order, meta))


if __name__ == "__main__":
    main()
