"""Our SFT (sft.py) and reward model (reward.py) against TRL's SFTTrainer and RewardTrainer: same model, rows, batch,
max length, truncation and precision. Each configuration trains in a fresh process: this file, run again with
--worker. Commands, and what is held equal: benchmarks/README.md.
"""
from __future__ import annotations

import harness
from harness import gb, repo_on_path

LR = {"sft": 2e-5, "rm": 1e-4}  # TRL's default learning rates (SFTConfig, RewardConfig); ours the same, no warm-up
NO_GC = {"gradient_checkpointing": False}


def C(task: str, side: str, label: str, args: dict | None = None, **kw) -> dict:
    """A configuration: task (sft / rm), side, label, and sft/reward.Args fields (ours) or config kwargs (TRL)."""
    return dict(task=task, side=side, label=label, **{"ours_args" if side == "ours" else "trl_kwargs": args or {}},
                **kw)


CONFIGS = {
    "ours-sft": C("sft", "ours", "ours sft.py (defaults: packed, padding-free)"),
    "trl-sft": C("sft", "trl", "TRL SFTTrainer defaults (gradient checkpointing, padded)"),
    "trl-sft-nogc": C("sft", "trl", "TRL SFTTrainer gradient_checkpointing=False (padded)", NO_GC),
    "ours-sft-padded": C("sft", "ours", "lever off: ours sft.py --no-padding-free", {"padding_free": False}),
    "trl-sft-packed": C("sft", "trl", "TRL SFTTrainer best: packing=True (bfd, padding-free) "
                        "gradient_checkpointing=False", {"packing": True, **NO_GC}, pack=True),
    "ours-sft-trl-rows": C("sft", "ours", "ours sft.py (defaults) on the rows of each of TRL's packed steps", pack=True,
                           rows_from="trl-sft-packed"),
    "ours-sft-gc": C("sft", "ours", "ours sft.py --gradient-checkpointing", {"gradient_checkpointing": True}),
    "ours-rm": C("rm", "ours", "ours reward.py (defaults: prefix-shared packing)"),
    "ours-rm-gc": C("rm", "ours", "ours reward.py --gradient-checkpointing", {"gradient_checkpointing": True}),
    "trl-rm": C("rm", "trl", "TRL RewardTrainer defaults (gradient checkpointing, padded)"),
    "ours-rm-padded": C("rm", "ours", "lever off: ours reward.py --no-padding-free", {"padding_free": False}),
    "trl-rm-nogc": C("rm", "trl", "TRL RewardTrainer best: gradient_checkpointing=False (it has no packing / "
                     "padding-free)", NO_GC),
}
DEFAULT_ORDER = ["ours-sft", "trl-sft", "ours-sft-padded", "trl-sft-nogc", "trl-sft-packed", "ours-sft-trl-rows",
                 "ours-sft-gc", "ours-rm", "trl-rm", "ours-rm-padded", "trl-rm-nogc", "ours-rm-gc"]
# (ours, TRL) pairs for the ratio table
PAIRS = [("ours-sft", "trl-sft"), ("ours-sft", "trl-sft-nogc"), ("ours-sft", "trl-sft-packed"),
         ("ours-sft-trl-rows", "trl-sft-packed"), ("ours-sft-gc", "trl-sft"),
         ("ours-sft-padded", "trl-sft-nogc"), ("ours-rm", "trl-rm"), ("ours-rm", "trl-rm-nogc"),
         ("ours-rm-padded", "trl-rm-nogc"), ("ours-rm-gc", "trl-rm")]
TASK_TITLE = {"sft": "SFT: sft.py vs SFTTrainer", "rm": "Reward model: reward.py vs RewardTrainer"}


# ----------------------------------------------------------------------------------------------------------------------
# Workers


def worker_ours(spec: dict) -> dict:
    repo_on_path()
    import reward
    import sft
    mod, cls = (sft, sft.SFTTrainer) if spec["task"] == "sft" else (reward, reward.RewardTrainer)
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    args = mod.Args(model=spec["model"], dataset=spec["rows"], eval_size=0, output_dir=spec["output_dir"],
                    total_steps=n_steps, batch_size=spec["batch_size"], max_length=spec["max_length"],
                    max_prompt_length=spec["max_length"], precision=spec["precision"],
                    learning_rate=LR[spec["task"]], warmup_steps=0, seed=1, **spec["ours_args"])
    positions, loss_tokens = [], []  # positions through the model (padding included), loss tokens (SFT)
    # the rows of each of TRL's packed steps, or the rows in file order
    sampler = (harness.ListSampler(spec["step_rows"]) if spec.get("step_rows")
               else harness.sequential(spec["num_rows"], spec["batch_size"], n_steps))
    trainer, outs, report = harness.time_ours(cls, args, spec["num_rows"], sampler, n_steps, record=lambda b: (
        positions.append(int(b["input_ids"].numel())), loss_tokens.append(len(b.tensors.get("labels", ())))))
    return report | {
        "tokens": [o.num_tokens for o in outs], "positions": positions, "master_dtype": str(next(
            trainer.model.parameters()).dtype), "loss_tokens": loss_tokens if spec["task"] == "sft" else None,
        "rows": [len(g) for g in spec["step_rows"]] if spec.get("step_rows") else [spec["batch_size"]] * n_steps}


def worker_trl(spec: dict) -> dict:
    import trl
    from transformers import AutoTokenizer

    sft, n_steps = spec["task"] == "sft", spec["warmup_steps"] + spec["timed_steps"]
    rows = harness.read_jsonl(spec["rows"])  # SFT: prompt-completion rows; TRL's loss covers the completion only
    keys, config_cls, trainer_cls = ((("prompt", "completion"), trl.SFTConfig, trl.SFTTrainer) if sft else
                                     (("prompt", "chosen", "rejected"), trl.RewardConfig, trl.RewardTrainer))
    tok = AutoTokenizer.from_pretrained(spec["model"])
    config = config_cls(**harness.trl_kwargs(
        spec, per_device_train_batch_size=spec["batch_size"], max_steps=n_steps, max_length=spec["max_length"],
        bf16=spec["precision"] == "bf16", train_sampling_strategy="sequential"))
    state = {"tokens": [], "positions": [], "loss_tokens": [], "rows": [], "step_rows": []}
    # a packed sequence -> its row: the start of each row's prompt + completion, as TRL tokenizes it
    starts = [tuple(tok(r["prompt"] + r["completion"])["input_ids"][:64]) for r in rows] if sft else []

    class Timed(trainer_cls):
        def training_step(self, model, inputs, *a, **k):
            ids = inputs["input_ids"]
            state["positions"].append(int(ids.numel()))
            if "attention_mask" in inputs:  # padded: one row per sequence (reward: chosen rows, then rejected)
                state["tokens"].append(int(inputs["attention_mask"].sum()))
                state["rows"].append(ids.shape[0] if sft else ids.shape[0] // 2)
            else:  # padding-free: one row of sequences, each starting at position 0
                state["tokens"].append(int(ids.numel()))
                state["rows"].append(int((inputs["position_ids"] == 0).sum()))
                state["step_rows"].append(packed_rows(ids[0].tolist(), inputs["position_ids"][0].tolist(), starts))
            if "labels" in inputs:
                state["loss_tokens"].append(int((inputs["labels"] != -100).sum()))
            return super().training_step(model, inputs, *a, **k)

    trainer, report = harness.time_trl(Timed, spec, config, state, [{k: r[k] for k in keys} for r in rows],
                                       check_rows=not spec["pack"], processing_class=tok)
    if spec["pack"]:
        report["notes"].append(f"{len(rows)} rows packed into {len(trainer.train_dataset)} sequences of <= "
                               f"{spec['max_length']} tokens (best-fit decreasing), {spec['batch_size']} per step")
    return report | {k: state[k] for k in ("tokens", "positions", "rows", "step_rows")} | {
        "loss_tokens": state["loss_tokens"] if sft else None, "padding_free": getattr(trainer, "padding_free", False),
        "master_dtype": str(next(trainer.model.parameters()).dtype)}


def packed_rows(ids: list[int], positions: list[int], starts: list[tuple]) -> list[int]:
    """The row index of each sequence in a padding-free packed row (sequences start at position 0)."""
    cuts, out = [i for i, p in enumerate(positions) if p == 0] + [len(ids)], []
    for a, b in zip(cuts, cuts[1:]):
        seq = tuple(ids[a:b][:64])
        if len(match := [i for i, s in enumerate(starts) if s[:len(seq)] == seq[:len(s)]]) != 1:
            raise RuntimeError(f"a packed sequence matches {len(match)} rows, not one")
        out.append(match[0])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def summarize(res: dict, warmup: int) -> dict:
    if "error" in res:
        return res
    timed = res["step_s"][warmup:]
    # the steps' rows differ in length: throughput over all timed steps together, not from the median step
    tok_per_s = sum(res["tokens"][warmup:]) / sum(timed)
    return res | harness.timed_stats(timed) | {f"{k}_mean": harness.mean((res.get(k) or [])[warmup:])
                                               for k in ("tokens", "positions", "loss_tokens", "rows")} | {
        "tokens_per_s": tok_per_s, "s_per_token": 1 / tok_per_s}


def same_tokens(a: dict, b: dict) -> bool:
    return a["tokens"] == b["tokens"] and a.get("loss_tokens") == b.get("loss_tokens")


def render(results: dict, order: list[str], meta: dict) -> str:
    ml = meta["max_length"]
    L = [f"# SFT and reward-model benchmark: ours (sft.py, reward.py) vs TRL {meta.get('trl_version', '?')} "
         f"SFTTrainer and RewardTrainer, same rows, batch, truncation and precision\n",
         f"- model {meta['model']}, master weights "
         f"{', '.join(sorted({r['master_dtype'] for r in results.values() if 'error' not in r}))}, bf16 autocast; "
         f"batch {meta['batch_size']}, max length {ml}, file order; lr TRL's defaults (SFT {LR['sft']:g}, reward "
         f"{LR['rm']:g}), no warm-up (what is held equal: benchmarks/README.md)",
         f"- SFT rows: the first {meta['sft_rows']} rows of `{meta['data']}` whose prompt is under {ml} tokens "
         f"({meta['sft_skipped']} skipped; TRL's packing reads {meta['pack_rows']}); reward pairs: the first "
         f"{meta['rm_rows']} that fit whole in {ml} tokens ({meta['rm_skipped']} skipped)",
         "- positions = what went through the model (padding included; a packed row stores a shared prefix once); "
         "tokens/s = the timed steps' non-pad tokens / their seconds", *harness.header_lines(meta)]
    for task in ("sft", "rm"):
        if names := [k for k in order if CONFIGS[k]["task"] == task]:
            L += [f"## {TASK_TITLE[task]}\n"] + harness.table(
                ["configuration", "s/step (median [min-max])", "rows/step", "tokens/step", "positions", "loss tokens",
                 "tokens/s", "peak RSS train GB", "peak RSS process GB", "setup s", "load before -> after"],
                [harness.failed(r, CONFIGS[k]["label"]) if "error" in r else
                 [CONFIGS[k]["label"], harness.med_range(r), f"{r['rows_mean']:.1f}", f"{r['tokens_mean']:.0f}",
                  f"{r['positions_mean']:.0f}", f"{r['loss_tokens_mean']:.0f}" if r["loss_tokens_mean"] else "-",
                  f"{r['tokens_per_s']:.0f}", gb(r["train_peak_rss"]), gb(r["process_peak_rss"]),
                  f"{r['setup_s']:.1f}", f"{r['load_before']} -> {r['load_after']}"]
                 for k, r in ((k, results[k]) for k in names)]) + [""]
    L.append(harness.notes_line(results, order, CONFIGS, lambda k, r: f"{k}: gradient_checkpointing="
                                f"{r['gradient_checkpointing']}, padding_free={r['padding_free']}, optim={r['optim']}"))
    L.append("\n## Ratios ours / TRL\n\ntime/token = TRL's tokens/s over ours (all timed steps); TRL's packing puts "
             "more rows in a step than ours' batch: ours-sft-trl-rows trains exactly the rows of each of its steps. "
             "s/step ours/TRL compares the medians.\n")
    pairs = [(o, t) for o, t in PAIRS if harness.finished(results, o, t)]
    L += harness.table(["ours", "TRL", "same tokens/step", "s/step ours/TRL", "time/token ours/TRL",
                        "speed-up (tokens/s TRL->ours)", "peak RSS train ours/TRL", "peak RSS process ours/TRL"],
                       [[o, t, "yes" if same_tokens(ro, rt) else "no", f"{ro['median_s'] / rt['median_s']:.3f}",
                         f"{ro['s_per_token'] / rt['s_per_token']:.3f}",
                         f"{rt['s_per_token'] / ro['s_per_token']:.2f}x",
                         harness.ratio(ro["train_peak_rss"], rt["train_peak_rss"]),
                         f"{ro['process_peak_rss'] / rt['process_peak_rss']:.2f}"]
                        for o, t, ro, rt in ((o, t, results[o], results[t]) for o, t in pairs)])
    if mism := [(o, t) for o, t in pairs if not CONFIGS[t].get("pack") and not same_tokens(results[o], results[t])]:
        L.append("\nWarning: per-step token counts differ between " + ", ".join(f"{o}/{t}" for o, t in mism) + ": "
                 + "; ".join(f"{k}: tokens {results[k]['tokens']}, loss tokens {results[k].get('loss_tokens')}"
                             for k in sorted({x for p in mism for x in p})))
    else:
        L.append("\nPer-step token counts (and SFT loss tokens) are identical on both sides for every pair on the "
                 "same rows.")
    L.append("\nTargets, ours vs TRL SFTTrainer / RewardTrainer on the same rows (bf16 step time <= 1/3 of TRL's, as "
             "time per token; peak RSS train <= TRL's):")
    for o, t, ro, rt in ((o, t, results[o], results[t]) for o, t in pairs if not CONFIGS[o]["ours_args"]):
        r = ro["s_per_token"] / rt["s_per_token"]  # the levers-off rows are not ours' claim
        L.append(f"- step time <= 1/3: {o} / {t} = {r:.3f} -> {'met' if r <= 1 / 3 else 'NOT met'}")
        if ro["train_peak_rss"] and rt["train_peak_rss"]:
            m = ro["train_peak_rss"] / rt["train_peak_rss"]
            L.append(f"- peak RSS (train) <= TRL's: {o} / {t} = {m:.2f} -> {'met' if m <= 1 else 'NOT met'}")
    return "\n".join(L) + "\n"


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_sft_reward.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=8, timeout=900, data=True)
    p.add_argument("--batch-size", type=int, default=4, help="rows (SFT) / pairs (reward) per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    a = p.parse_args()
    if harness.run_as_worker(a, worker_ours, worker_trl):
        return
    order = harness.parse_runs(a, CONFIGS)
    (model_dir, work, meta), data = harness.start(a, "bench_sft_reward_"), harness.data_path(a.data)
    k = a.batch_size * (a.warmup_steps + a.timed_steps)
    k_pack = 4 * k  # enough rows for TRL's packing to fill batch x steps sequences of max_length
    sft_rows, sft_skipped = harness.select_rows(data, model_dir, k, a.max_length)
    pack_rows, _ = harness.select_rows(data, model_dir, k_pack, a.max_length)  # the same first k, then more
    rm_rows, rm_skipped = harness.select_rows(data, model_dir, k, a.max_length, pairs_fit=True)
    as_sft = lambda rows: [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    base = {key: meta[key] for key in ("model", "batch_size", "max_length", "warmup_steps", "timed_steps")} | {
        "precision": "bf16", "num_rows": k}
    base_spec = {"sft": base | {"rows": harness.write_jsonl(work / "sft_rows.jsonl", as_sft(sft_rows))},
                 "rm": base | {"rows": harness.write_jsonl(work / "rm_pairs.jsonl", rm_rows)},
                 "pack": {"rows": harness.write_jsonl(work / "sft_pack_rows.jsonl", as_sft(pack_rows)),
                          "num_rows": k_pack}}
    meta |= {"sft_rows": k, "rm_rows": k, "pack_rows": k_pack, "sft_skipped": sft_skipped, "rm_skipped": rm_skipped}
    print(f"work dir {work}; SFT {k} rows (+{k_pack - k} for TRL packing), reward {k} pairs ({rm_skipped} longer "
          f"skipped); load {meta['load_start']}", flush=True)
    raw = {}

    def spec_of(name: str, cfg: dict) -> dict | str:
        step_rows = raw.get(cfg.get("rows_from"), {}).get("step_rows")
        if "rows_from" in cfg and not step_rows:
            return f"needs the rows of {cfg['rows_from']}: run it first"
        return base_spec[cfg["task"]] | (base_spec["pack"] if cfg.get("pack") else {}) | {
            "task": cfg["task"], "step_rows": step_rows, "ours_args": cfg.get("ours_args", {}),
            "trl_kwargs": cfg.get("trl_kwargs", {}), "pack": cfg.get("pack", False)}

    harness.run_all(a, __file__, order, CONFIGS, work, meta, spec_of, lambda r: (
        f"steps {harness.seconds(r['step_s'])} s; rows {r['rows']}; tokens {r['tokens']}; loss tokens "
        f"{r['loss_tokens']}"), raw)
    results = {name: summarize(raw[name], a.warmup_steps) for name in order}
    harness.finish(a, work, meta, results, render(results, order, meta))


if __name__ == "__main__":
    main()
