"""Our SFT (sft.py) against TRL's SFTTrainer and our reward model (reward.py) against TRL's RewardTrainer: same
model, rows, batch, max length, truncation and precision.

    python benchmarks/bench_sft_reward.py --trl-python /tmp/trl-venv/bin/python     # ~12 min on the 2-core CPU
    python benchmarks/bench_sft_reward.py --warmup-steps 1 --timed-steps 1 --configs ours-sft,trl-sft   # a quick check

Every configuration runs in its own fresh process (ours with this interpreter, TRL with --trl-python, where TRL is
installed; see benchmarks/requirements-trl.txt), one after the other, ours and TRL alternating. Each process trains
warm-up + timed optimizer steps on the same rows in the same order (no shuffling) and reports the seconds of every
step, its rows and tokens, and its peak RSS; the parent writes the table to benchmarks/results_sft_reward.md.

This file also runs as the worker (`--worker ours|trl --spec FILE`): it imports nothing at module level beyond the
standard library and harness.py, so the TRL venv needs neither tyro nor this repo's requirements.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import harness
from harness import gb, memory_report, repo_on_path

# TRL's default learning rates (SFTConfig 2e-5, RewardConfig 1e-4); ours runs at the same, without warm-up
LR = {"sft": 2e-5, "rm": 1e-4}
NO_GC = {"gradient_checkpointing": False}

# name -> task (sft / rm), side, table label, and ours' flags (sft.Args / reward.Args fields) or TRL's config kwargs
CONFIGS = {
    "ours-sft": dict(task="sft", side="ours", label="ours sft.py (defaults: packed, padding-free)", ours_args={}),
    "trl-sft": dict(task="sft", side="trl", label="TRL SFTTrainer defaults (gradient checkpointing, padded)",
                    trl_kwargs={}),
    "trl-sft-nogc": dict(task="sft", side="trl", label="TRL SFTTrainer gradient_checkpointing=False (padded)",
                         trl_kwargs=NO_GC),
    "ours-sft-padded": dict(task="sft", side="ours", label="lever off: ours sft.py --no-padding-free",
                            ours_args={"padding_free": False}),
    "trl-sft-packed": dict(task="sft", side="trl", label="TRL SFTTrainer best: packing=True (bfd, padding-free) "
                           "gradient_checkpointing=False", trl_kwargs={"packing": True, **NO_GC}, pack=True),
    "ours-sft-trl-rows": dict(task="sft", side="ours", label="ours sft.py (defaults) on the rows of each of TRL's "
                              "packed steps", ours_args={}, pack=True, rows_from="trl-sft-packed"),
    "ours-sft-gc": dict(task="sft", side="ours", label="ours sft.py --gradient-checkpointing",
                        ours_args={"gradient_checkpointing": True}),
    "ours-rm": dict(task="rm", side="ours", label="ours reward.py (defaults: prefix-shared packing)", ours_args={}),
    "ours-rm-gc": dict(task="rm", side="ours", label="ours reward.py --gradient-checkpointing",
                       ours_args={"gradient_checkpointing": True}),
    "trl-rm": dict(task="rm", side="trl", label="TRL RewardTrainer defaults (gradient checkpointing, padded)",
                   trl_kwargs={}),
    "ours-rm-padded": dict(task="rm", side="ours", label="lever off: ours reward.py --no-padding-free",
                           ours_args={"padding_free": False}),
    "trl-rm-nogc": dict(task="rm", side="trl", label="TRL RewardTrainer best: gradient_checkpointing=False (it has "
                        "no packing / padding-free)", trl_kwargs=NO_GC),
}
DEFAULT_ORDER = ["ours-sft", "trl-sft", "ours-sft-padded", "trl-sft-nogc", "trl-sft-packed", "ours-sft-trl-rows",
                 "ours-sft-gc", "ours-rm", "trl-rm", "ours-rm-padded", "trl-rm-nogc", "ours-rm-gc"]
# (ours, TRL) pairs for the ratio table; the first ones of each task are the targets' pairs
PAIRS = [("ours-sft", "trl-sft"), ("ours-sft", "trl-sft-nogc"), ("ours-sft", "trl-sft-packed"),
         ("ours-sft-trl-rows", "trl-sft-packed"), ("ours-sft-gc", "trl-sft"),
         ("ours-sft-padded", "trl-sft-nogc"), ("ours-rm", "trl-rm"), ("ours-rm", "trl-rm-nogc"),
         ("ours-rm-padded", "trl-rm-nogc"), ("ours-rm-gc", "trl-rm")]
TASK_TITLE = {"sft": "SFT: sft.py vs SFTTrainer", "rm": "Reward model: reward.py vs RewardTrainer"}


# ----------------------------------------------------------------------------------------------------------------------
# Workers


def worker_ours(spec: dict) -> dict:
    repo_on_path()
    import torch

    if spec["task"] == "sft":
        import sft as mod
        trainer_cls = mod.SFTTrainer
    else:
        import reward as mod
        trainer_cls = mod.RewardTrainer
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    args = mod.Args(model=spec["model"], dataset=spec["rows"], eval_size=0, output_dir=spec["output_dir"],
                    total_steps=n_steps, batch_size=spec["batch_size"], max_length=spec["max_length"],
                    max_prompt_length=spec["max_length"], precision=spec["precision"],
                    learning_rate=LR[spec["task"]], warmup_steps=0, seed=1, **spec["ours_args"])
    trainer, setup_s = harness.build_ours(trainer_cls, args, spec["num_rows"])
    # the rows of each of TRL's packed steps, or the rows in file order
    trainer.sampler = (harness.ListSampler(spec["step_rows"]) if spec.get("step_rows")
                       else harness.SequentialSampler(len(trainer.train_data), spec["batch_size"]))
    positions, loss_tokens = [], []  # positions through the model (padding included), loss tokens (SFT)

    def count(b):
        positions.append(int(b["input_ids"].numel()))
        loss_tokens.append(b.num_loss_tokens)
    harness.on_batch(trainer, count)
    master = str(next(trainer.model.parameters()).dtype)
    times, outs, reset_ok = harness.timed_steps(trainer, n_steps, torch)
    return memory_report(torch, reset_ok) | {
        "step_s": times, "tokens": [o.num_tokens for o in outs], "positions": positions,
        "loss_tokens": loss_tokens if spec["task"] == "sft" else None,
        "rows": [len(g) for g in spec["step_rows"]] if spec.get("step_rows") else [spec["batch_size"]] * n_steps,
        "setup_s": setup_s, "master_dtype": master, "notes": []}


def worker_trl(spec: dict) -> dict:
    torch = harness.trl_setup()
    import datasets
    import trl
    from transformers import AutoTokenizer

    sft = spec["task"] == "sft"
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    rows = harness.read_jsonl(spec["rows"])
    if sft:  # prompt-completion rows (prompt + chosen): TRL's loss covers the completion only by default
        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in rows])
        config_cls, trainer_cls = trl.SFTConfig, trl.SFTTrainer
    else:
        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        config_cls, trainer_cls = trl.RewardConfig, trl.RewardTrainer
    tok = AutoTokenizer.from_pretrained(spec["model"])
    config = config_cls(**harness.trl_kwargs(
        spec, torch, per_device_train_batch_size=spec["batch_size"], max_steps=n_steps, max_length=spec["max_length"],
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

    t0 = time.perf_counter()
    trainer = Timed(model=spec["model"], args=config, train_dataset=ds, processing_class=tok,
                    callbacks=[harness.trl_step_timer(state, torch)])
    setup_s = time.perf_counter() - t0
    notes = []
    if spec["pack"]:
        notes.append(f"{len(rows)} rows packed into {len(trainer.train_dataset)} sequences of <= {spec['max_length']}"
                     f" tokens (best-fit decreasing), {spec['batch_size']} packed sequences per step")
    elif len(trainer.train_dataset) != spec["num_rows"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {spec['num_rows']} rows")
    master = str(next(trainer.model.parameters()).dtype)
    trainer.train()
    if len(state["times"]) != n_steps:
        raise RuntimeError(f"TRL ran {len(state['times'])} steps, expected {n_steps}")
    return harness.trl_report(config, torch, state["reset_ok"], notes, step_s=state["times"], tokens=state["tokens"],
                              positions=state["positions"], loss_tokens=state["loss_tokens"] if sft else None,
                              rows=state["rows"], setup_s=setup_s, step_rows=state["step_rows"], master_dtype=master,
                              padding_free=bool(getattr(trainer, "padding_free", False)))


def packed_rows(ids: list[int], positions: list[int], starts: list[tuple]) -> list[int]:
    """The row index of each sequence in a padding-free packed row (sequences start at position 0)."""
    cuts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        seq = tuple(ids[a:b][:64])
        match = [i for i, s in enumerate(starts) if s[:len(seq)] == seq[:len(s)]]
        if len(match) != 1:
            raise RuntimeError(f"a packed sequence matches {len(match)} rows, not one")
        out.append(match[0])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def summarize(res: dict, warmup: int) -> dict:
    if "error" in res:
        return res

    def mean(key):
        xs = (res.get(key) or [])[warmup:]
        return sum(xs) / len(xs) if xs else None
    timed = res["step_s"][warmup:]
    # the steps' rows differ in length: throughput over all timed steps together, not from the median step
    tok_per_s = sum(res["tokens"][warmup:]) / sum(timed)
    return res | harness.timed_stats(timed) | {"tokens_mean": mean("tokens"),
                  "positions_mean": mean("positions"), "loss_tokens_mean": mean("loss_tokens"),
                  "rows_mean": mean("rows"), "tokens_per_s": tok_per_s, "s_per_token": 1 / tok_per_s}


def same_tokens(a: dict, b: dict) -> bool:
    return a["tokens"] == b["tokens"] and a.get("loss_tokens") == b.get("loss_tokens")


def render(results: dict, order: list[str], meta: dict) -> str:
    L = [f"# SFT and reward-model benchmark: ours (sft.py, reward.py) vs TRL {meta.get('trl_version', '?')} "
         f"SFTTrainer and RewardTrainer, same rows, batch, truncation and precision\n", harness.machine_line(meta)]
    L.append(f"- model: {meta['model']} (the same directory for both sides), fp32 master weights (checked: "
             f"{', '.join(sorted({r['master_dtype'] for r in results.values() if 'error' not in r}))}); bf16 = "
             f"autocast on both sides (TRL: `bf16=True`)")
    L.append(f"- SFT rows: the first {meta['sft_rows']} rows of `{meta['data']}` whose prompt is shorter than "
             f"{meta['max_length']} tokens ({meta['sft_skipped']} skipped), as prompt-completion rows (prompt, "
             f"completion = chosen; strings, no chat template; loss on the completion + EOS only, TRL's default for "
             f"prompt-completion rows). Truncation to {meta['max_length']}: TRL keeps the start of prompt+completion "
             f"(its only mode); ours runs with `--max-length {meta['max_length']} --max-prompt-length "
             f"{meta['max_length']}`, which keeps the prompt whole and cuts the completion to max_length - prompt: "
             f"the same tokens. TRL's packed configuration reads the first {meta['pack_rows']} such rows (it needs "
             f"more rows to fill {meta['batch_size']} packed sequences per step)")
    L.append(f"- reward-model rows: the first {meta['rm_rows']} rows of `{meta['data']}` whose prompt + chosen and "
             f"prompt + rejected (+ EOS) both fit in {meta['max_length']} tokens ({meta['rm_skipped']} skipped): "
             f"TRL's RewardTrainer drops longer pairs (it never truncates), so no truncation happens on either side")
    L.append(f"- batch {meta['batch_size']} rows (SFT) / pairs (reward), 1 micro-batch per step, in file order on "
             f"both sides (ours: a sequential sampler; TRL: `train_sampling_strategy='sequential'`); learning rate "
             f"TRL's default on both sides (SFT {LR['sft']:g}, reward {LR['rm']:g}), no warm-up")
    L.append(harness.steps_line(meta))
    L.append("- tokens/step = non-pad tokens of the step's sequences (SFT: prompt + completion; reward: prompt + "
             "chosen and prompt + rejected); positions = what went through the model (padding included; ours' "
             "packed row stores a prefix shared by sequences once, and reward.py adds one sentinel per sequence); "
             "loss tokens = tokens in the SFT loss; tokens/s = the timed steps' tokens / their seconds (the rows "
             "of a step, hence its time, vary from step to step)")
    L.append("- peak RSS: 'train' = VmHWM of the worker process reset just before the first step (training "
             "phase only); 'process' = ru_maxrss over the process's life (loading, tokenization, training)")
    L.append(harness.load_line(meta))
    for task in ("sft", "rm"):
        names = [k for k in order if CONFIGS[k]["task"] == task]
        if not names:
            continue
        L.append(f"## {TASK_TITLE[task]}\n")
        L.append("| configuration | s/step (median [min-max]) | rows/step | tokens/step | positions | loss tokens "
                 "| tokens/s | peak RSS train GB | peak RSS process GB | setup s | load before -> after |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in names:
            r, cfg = results[name], CONFIGS[name]
            if "error" in r:
                L.append(f"| {cfg['label']} | failed: {r['error']} | | | | | | | | | |")
                continue
            lt = "-" if r["loss_tokens_mean"] is None else f"{r['loss_tokens_mean']:.0f}"
            L.append(f"| {cfg['label']} | {r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | "
                     f"{r['rows_mean']:.1f} | {r['tokens_mean']:.0f} | {r['positions_mean']:.0f} | {lt} | "
                     f"{r['tokens_per_s']:.0f} | {gb(r['train_peak_rss'])} | {gb(r['process_peak_rss'])} | "
                     f"{r['setup_s']:.1f} | {r['load_before']} -> {r['load_after']} |")
        L.append("")
    notes = [f"{CONFIGS[k]['label']}: {x}" for k in order if "error" not in results[k]
             for x in results[k].get("notes", [])]
    for k in order:
        r = results[k]
        if "error" not in r and CONFIGS[k]["side"] == "trl":
            notes.append(f"{k}: gradient_checkpointing={r['gradient_checkpointing']}, padding_free="
                         f"{r['padding_free']}, optim={r['optim']}")
    if notes:
        L.append("Notes: " + "; ".join(notes) + ".\n")

    L.append("## Ratios ours / TRL\n")
    L.append("time/token = TRL's tokens/s over ours (all timed steps): where both sides train the same rows (same "
             "tokens) it is the ratio of their total timed seconds. TRL's packing puts more rows in a step than ours' "
             "batch of 4: ours-sft-trl-rows trains exactly the rows of each of its steps. s/step ours/TRL compares the "
             "medians.\n")
    L.append("| ours | TRL | same tokens/step | s/step ours/TRL | time/token ours/TRL | speed-up (tokens/s TRL->ours) "
             "| peak RSS train ours/TRL | peak RSS process ours/TRL |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    pairs = [(o, t) for o, t in PAIRS if harness.finished(results, o, t)]
    for o, t in pairs:
        ro, rt = results[o], results[t]
        L.append(f"| {o} | {t} | {'yes' if same_tokens(ro, rt) else 'no'} | {ro['median_s'] / rt['median_s']:.3f} | "
                 f"{ro['s_per_token'] / rt['s_per_token']:.3f} | {rt['s_per_token'] / ro['s_per_token']:.2f}x | "
                 f"{harness.ratio(ro['train_peak_rss'], rt['train_peak_rss'])} | "
                 f"{ro['process_peak_rss'] / rt['process_peak_rss']:.2f} |")
    mism = [(o, t) for o, t in pairs if not CONFIGS[t].get("pack") and not same_tokens(results[o], results[t])]
    if mism:
        L.append("\nWarning: per-step token counts differ between " + ", ".join(f"{o}/{t}" for o, t in mism) + ": "
                 + "; ".join(f"{k}: tokens {results[k]['tokens']}, loss tokens {results[k].get('loss_tokens')}"
                             for k in sorted({x for p in mism for x in p})))
    else:
        L.append("\nPer-step token counts (and SFT loss tokens) are identical on both sides for every pair on the "
                 "same rows.")
    L.append("\nTargets, ours vs TRL SFTTrainer / RewardTrainer on the same rows (bf16 step time <= 1/3 of TRL's, as "
             "time per token; peak RSS train <= TRL's):")
    L.append(targets(results))
    return "\n".join(L) + "\n"


def targets(results: dict) -> str:
    out = []
    for o, t in PAIRS:
        if not harness.finished(results, o, t) or CONFIGS[o]["ours_args"]:  # the levers-off rows are not ours' claim
            continue
        ro, rt = results[o], results[t]
        r = ro["s_per_token"] / rt["s_per_token"]
        out.append(f"- step time <= 1/3: {o} / {t} = {r:.3f} -> {'met' if r <= 1 / 3 else 'NOT met'}")
        if ro["train_peak_rss"] and rt["train_peak_rss"]:
            m = ro["train_peak_rss"] / rt["train_peak_rss"]
            out.append(f"- peak RSS (train) <= TRL's: {o} / {t} = {m:.2f} -> {'met' if m <= 1 else 'NOT met'}")
    return "\n".join(out)


def main() -> None:
    p = harness.bench_parser(__doc__, output="results_sft_reward.md", configs=CONFIGS, default_order=DEFAULT_ORDER,
                             warmup=1, timed=8, timeout=900, data=True)
    p.add_argument("--batch-size", type=int, default=4, help="rows (SFT) / pairs (reward) per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--rerender", metavar="RESULTS_JSON",
                   help="only rewrite --output from a run's results.json (its raw per-step numbers)")
    a = p.parse_args()
    if a.rerender:
        saved = json.loads(Path(a.rerender).read_text())
        meta, order = saved["meta"], list(saved["results"])
        results = {name: summarize(r, meta["warmup"]) for name, r in saved["results"].items()}
        Path(a.output).write_text(render(results, order, meta))
        print(f"written to {a.output}")
        return
    if harness.run_as_worker(a, worker_ours, worker_trl):
        return
    order = harness.parse_runs(a, CONFIGS)
    model_dir = harness.default_model(a.model)
    data = harness.data_path(a.data)
    work = harness.workdir(a.workdir, "bench_sft_reward_")
    k = a.batch_size * (a.warmup_steps + a.timed_steps)
    k_pack = 4 * k  # enough rows for TRL's packing to fill batch x steps sequences of max_length
    sft_rows, sft_skipped = harness.select_rows(data, model_dir, k, a.max_length)
    pack_rows, _ = harness.select_rows(data, model_dir, k_pack, a.max_length)  # the same first k, then more
    rm_rows, rm_skipped = harness.select_rows(data, model_dir, k, a.max_length, pairs_fit=True)

    def write(name: str, rows: list[dict], sft: bool) -> str:
        return harness.write_jsonl(work / name, [{"prompt": r["prompt"], "completion": r["chosen"]} if sft else r
                                                 for r in rows])
    base = {"model": model_dir, "batch_size": a.batch_size, "max_length": a.max_length,
            "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps, "num_rows": k, "num_pack_rows": k_pack}
    base_spec = {"sft": dict(base, rows=write("sft_rows.jsonl", sft_rows, True),
                             pack_rows=write("sft_pack_rows.jsonl", pack_rows, True)),
                 "rm": dict(base, rows=write("rm_pairs.jsonl", rm_rows, False))}
    meta = harness.machine_meta() | {
        "model": model_dir, "data": a.data, "sft_rows": k, "rm_rows": k, "pack_rows": k_pack,
        "sft_skipped": sft_skipped, "rm_skipped": rm_skipped, "batch_size": a.batch_size, "max_length": a.max_length,
        "warmup": a.warmup_steps, "timed": a.timed_steps}
    print(f"work dir {work}; SFT {k} rows (+{k_pack - k} for TRL packing), reward {k} pairs ({rm_skipped} longer "
          f"skipped); load {meta['load_start']}", flush=True)
    raw = {}

    def spec_of(name: str, cfg: dict) -> dict | str:
        step_rows = raw.get(cfg.get("rows_from"), {}).get("step_rows")
        if "rows_from" in cfg and not step_rows:
            return f"needs the rows of {cfg['rows_from']}: run it first"
        spec = base_spec[cfg["task"]] | {"task": cfg["task"], "precision": "bf16", "step_rows": step_rows,
                                         "ours_args": cfg.get("ours_args", {}), "trl_kwargs": cfg.get("trl_kwargs", {}),
                                         "pack": cfg.get("pack", False)}
        if spec["pack"]:
            spec["rows"], spec["num_rows"] = spec["pack_rows"], spec["num_pack_rows"]
        return spec

    def describe(r: dict) -> str:
        return (f"steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s; rows {r['rows']}; tokens {r['tokens']}; loss "
                f"tokens {r['loss_tokens']}")
    harness.run_all(a, __file__, order, CONFIGS, work, meta, spec_of, describe, raw)
    results = {name: summarize(raw[name], a.warmup_steps) for name in order}
    harness.finish(a, work, meta, results, render(results, order, meta))


if __name__ == "__main__":
    main()
