"""Our SFT (sft.py) against TRL's SFTTrainer and our reward model (reward.py) against TRL's RewardTrainer: same
model, rows, batch, max length, truncation and precision.

    python benchmarks/bench_sft_reward.py --trl-python /tmp/trl-venv/bin/python     # ~12 min on the 2-core CPU
    python benchmarks/bench_sft_reward.py --warmup-steps 1 --timed-steps 1 --configs ours-sft,trl-sft   # a quick check

Every configuration runs in its own fresh process (ours with this interpreter, TRL with --trl-python, where TRL is
installed; see benchmarks/requirements-trl.txt), one after the other, ours and TRL alternating. Each process trains
warm-up + timed optimizer steps on the same rows in the same order (no shuffling) and reports the seconds of every
step, its rows and tokens, and its peak RSS; the parent writes the table to benchmarks/results_sft_reward.md.

This file also runs as the worker (`--worker ours|trl --spec FILE`): like bench_dpo.py, whose helpers it imports, it
imports nothing at module level beyond the standard library, so the TRL venv needs neither tyro nor this repo's
requirements.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# standard library only, so both interpreters can import it (this file's directory is sys.path[0] when run)
from bench_dpo import _sync, gb, loadavg, process_peak_bytes, reset_peak_rss, select_rows, vm_hwm_bytes

REPO = Path(__file__).resolve().parent.parent
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


class StepRowsSampler:
    """Given row groups, one per step (the rows of each of TRL's packed steps), in order."""

    def __init__(self, groups: list[list[int]]):
        self.groups, self.step = groups, 0

    def next_indices(self) -> list[int]:
        self.step += 1
        return self.groups[self.step - 1]


class SequentialSampler:
    """The rows in file order, like TRL's train_sampling_strategy="sequential" (swapped into our trainers)."""

    def __init__(self, n: int, bs: int):
        self.n, self.bs, self.consumed = n, bs, 0

    def next_indices(self) -> list[int]:
        idx = [(self.consumed + i) % self.n for i in range(self.bs)]
        self.consumed += self.bs
        return idx


# ----------------------------------------------------------------------------------------------------------------------
# Workers


def worker_ours(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
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
    t0 = time.perf_counter()
    trainer = trainer_cls(args)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_data) != spec["num_rows"]:
        raise RuntimeError(f"ours kept {len(trainer.train_data)} of {spec['num_rows']} rows")
    trainer.sampler = (StepRowsSampler(spec["step_rows"]) if spec.get("step_rows")
                       else SequentialSampler(len(trainer.train_data), spec["batch_size"]))
    positions, loss_tokens = [], []  # positions through the model (padding included), loss tokens (SFT)
    make_batch = trainer.make_batch

    def counting_make_batch(examples):
        b = make_batch(examples)
        positions.append(int(b["input_ids"].numel()))
        loss_tokens.append(b.num_loss_tokens)
        return b
    trainer.make_batch = counting_make_batch
    master = str(next(trainer.model.parameters()).dtype)
    reset_ok = reset_peak_rss()
    times, tokens = [], []
    for _ in range(n_steps):
        t = time.perf_counter()
        out = trainer.training_step()
        _sync(torch)
        times.append(time.perf_counter() - t)
        tokens.append(out.num_tokens)
    return {"step_s": times, "tokens": tokens, "positions": positions,
            "loss_tokens": loss_tokens if spec["task"] == "sft" else None,
            "rows": [len(g) for g in spec["step_rows"]] if spec.get("step_rows") else [spec["batch_size"]] * n_steps,
            "setup_s": setup_s, "master_dtype": master,
            "train_peak_rss": vm_hwm_bytes() if reset_ok else None, "process_peak_rss": process_peak_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "notes": []}


def worker_trl(spec: dict) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    datasets.disable_progress_bars()
    sft = spec["task"] == "sft"
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    with open(spec["rows"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if sft:  # prompt-completion rows (prompt + chosen): TRL's loss covers the completion only by default
        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in rows])
        config_cls, trainer_cls = trl.SFTConfig, trl.SFTTrainer
    else:
        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        config_cls, trainer_cls = trl.RewardConfig, trl.RewardTrainer
    tok = AutoTokenizer.from_pretrained(spec["model"])
    kwargs = dict(output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"], max_steps=n_steps,
                  max_length=spec["max_length"], bf16=spec["precision"] == "bf16",
                  train_sampling_strategy="sequential", report_to="none", save_strategy="no", disable_tqdm=True,
                  seed=1, use_cpu=not torch.cuda.is_available())  # bf16 on CPU needs use_cpu (else an error)
    kwargs.update(spec["trl_kwargs"])
    config = config_cls(**kwargs)
    state = {"times": [], "tokens": [], "positions": [], "loss_tokens": [], "rows": [], "reset_ok": False,
             "t_prev": None, "step_rows": []}
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

    class StepTimer(TrainerCallback):
        # one optimizer step = the time between consecutive on_step_end calls (data, forward, backward, clip, AdamW,
        # scheduler, and the trainer's own bookkeeping); the first interval starts at on_train_begin
        def on_train_begin(self, args, st, control, **kw):
            state["reset_ok"] = reset_peak_rss()
            state["t_prev"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(torch)
            now = time.perf_counter()
            state["times"].append(now - state["t_prev"])
            state["t_prev"] = now

    t0 = time.perf_counter()
    trainer = Timed(model=spec["model"], args=config, train_dataset=ds, processing_class=tok,
                    callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t0
    notes = []
    if spec["pack"]:
        notes.append(f"{len(rows)} rows packed into {len(trainer.train_dataset)} sequences of <= {spec['max_length']}"
                     f" tokens (best-fit decreasing), {spec['batch_size']} packed sequences per step")
    elif len(trainer.train_dataset) != spec["num_rows"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {spec['num_rows']} rows")
    master = str(next(trainer.model.parameters()).dtype)
    trainer.train()
    hwm = vm_hwm_bytes() if state["reset_ok"] else None
    if len(state["times"]) != n_steps:
        raise RuntimeError(f"TRL ran {len(state['times'])} steps, expected {n_steps}")
    return {"step_s": state["times"], "tokens": state["tokens"], "positions": state["positions"],
            "loss_tokens": state["loss_tokens"] if sft else None, "rows": state["rows"], "setup_s": setup_s,
            "step_rows": state["step_rows"],
            "master_dtype": master, "train_peak_rss": hwm, "process_peak_rss": process_peak_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "notes": notes,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "gradient_checkpointing": config.gradient_checkpointing,
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "optim": getattr(config.optim, "value", str(config.optim))}


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


def select_pairs(data: Path, model_dir: str, k: int, max_length: int) -> tuple[list[dict], int]:
    """The first k rows whose prompt + chosen and prompt + rejected (+ EOS) fit in max_length, tokenized both ours'
    way (prompt and completion apart) and TRL's (the joined string): TRL's RewardTrainer drops longer pairs (it never
    truncates), so both sides train on exactly these rows, untruncated."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from common import encode_completion, encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, skipped = [], 0
    with open(data) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = encode_prompt(tok, row["prompt"])
            fits = all(len(prompt) + len(encode_completion(tok, row[c])) <= max_length
                       and len(tok(row["prompt"] + row[c] + tok.eos_token)["input_ids"]) <= max_length
                       for c in ("chosen", "rejected"))
            if not fits:
                skipped += 1
                continue
            rows.append({k_: row[k_] for k_ in ("prompt", "chosen", "rejected")})
            if len(rows) == k:
                break
    if len(rows) < k:
        raise SystemExit(f"{data}: only {len(rows)} pairs fit in {max_length} tokens, need {k}")
    return rows, skipped


def run_config(name: str, cfg: dict, base_spec: dict, work: Path, python: str, timeout: int,
               step_rows: list | None = None) -> dict:
    spec = dict(base_spec[cfg["task"]], name=name, task=cfg["task"], precision="bf16",
                ours_args=cfg.get("ours_args", {}), trl_kwargs=cfg.get("trl_kwargs", {}), pack=cfg.get("pack", False),
                output_dir=str(work / f"out-{name}"), step_rows=step_rows)
    if spec["pack"]:
        spec["rows"], spec["num_rows"] = spec["pack_rows"], spec["num_pack_rows"]
    spec_file, result_file, log_file = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [python, str(Path(__file__).resolve()), "--worker", cfg["side"], "--spec", str(spec_file),
           "--result", str(result_file)]
    load_before = loadavg()
    t = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t
    res = {"name": name, "wall_s": wall, "load_before": load_before, "load_after": loadavg(), "log": str(log_file)}
    if rc == 0 and result_file.exists():
        res |= json.loads(result_file.read_text())
    else:
        lines = log_file.read_text(errors="replace").strip().splitlines()
        res["error"] = f"exit {rc}: {lines[-1] if lines else '(no output)'}"
    return res


def summarize(res: dict, warmup: int) -> dict:
    if "error" in res:
        return res

    def mean(key):
        xs = (res.get(key) or [])[warmup:]
        return sum(xs) / len(xs) if xs else None
    timed = res["step_s"][warmup:]
    med = statistics.median(timed)
    # the steps' rows differ in length: throughput over all timed steps together, not from the median step
    tok_per_s = sum(res["tokens"][warmup:]) / sum(timed)
    return res | {"median_s": med, "min_s": min(timed), "max_s": max(timed), "tokens_mean": mean("tokens"),
                  "positions_mean": mean("positions"), "loss_tokens_mean": mean("loss_tokens"),
                  "rows_mean": mean("rows"), "tokens_per_s": tok_per_s, "s_per_token": 1 / tok_per_s}


def same_tokens(a: dict, b: dict) -> bool:
    return a["tokens"] == b["tokens"] and a.get("loss_tokens") == b.get("loss_tokens")


def render(results: dict, order: list[str], meta: dict) -> str:
    L = [f"# SFT and reward-model benchmark: ours (sft.py, reward.py) vs TRL {meta.get('trl_version', '?')}\n"]
    L.append(f"- machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['threads']}; "
             f"torch {meta['torch']} (ours), {meta.get('trl_torch', '?')} (TRL venv), "
             f"transformers {meta['transformers']} (ours) / {meta.get('trl_transformers', '?')} (TRL)")
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
    L.append(f"- steps: {meta['warmup']} warm-up + {meta['timed']} timed optimizer steps per configuration, each "
             f"configuration in a fresh process, ours and TRL alternating; s/step = median of the timed steps "
             f"[min-max]")
    L.append("- tokens/step = non-pad tokens of the step's sequences (SFT: prompt + completion; reward: prompt + "
             "chosen and prompt + rejected); positions = what went through the model (padding included; ours' "
             "packed row stores a prefix shared by sequences once, and reward.py adds one sentinel per sequence); "
             "loss tokens = tokens in the SFT loss; tokens/s = the timed steps' tokens / their seconds (the rows "
             "of a step, hence its time, vary from step to step)")
    L.append("- peak RSS: 'train' = VmHWM of the worker process reset just before the first step (training "
             "phase only); 'process' = ru_maxrss over the process's life (loading, tokenization, training)")
    L.append(f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}\n")
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
    for o, t in PAIRS:
        if o not in results or t not in results or "error" in results[o] or "error" in results[t]:
            continue
        ro, rt = results[o], results[t]
        tr = (f"{ro['train_peak_rss'] / rt['train_peak_rss']:.2f}"
              if ro["train_peak_rss"] and rt["train_peak_rss"] else "n/a")
        L.append(f"| {o} | {t} | {'yes' if same_tokens(ro, rt) else 'no'} | {ro['median_s'] / rt['median_s']:.3f} | "
                 f"{ro['s_per_token'] / rt['s_per_token']:.3f} | {rt['s_per_token'] / ro['s_per_token']:.2f}x | "
                 f"{tr} | {ro['process_peak_rss'] / rt['process_peak_rss']:.2f} |")
    mism = [(o, t) for o, t in PAIRS if o in results and t in results and "error" not in results[o]
            and "error" not in results[t] and not CONFIGS[t].get("pack") and not same_tokens(results[o], results[t])]
    if mism:
        L.append("\nWarning: per-step token counts differ between " + ", ".join(f"{o}/{t}" for o, t in mism) + ": "
                 + "; ".join(f"{k}: tokens {results[k]['tokens']}, loss tokens {results[k].get('loss_tokens')}"
                             for k in sorted({x for p in mism for x in p})))
    else:
        L.append("\nPer-step token counts (and SFT loss tokens) are identical on both sides for every pair on the "
                 "same rows.")
    L.append("\nTargets of issue 12 (bf16 step time <= 1/3 of TRL's, as time per token; peak RSS train <= TRL's):")
    L.append(targets(results))
    return "\n".join(L) + "\n"


def targets(results: dict) -> str:
    def ok(name: str) -> bool:
        return name in results and "error" not in results[name]

    out = []
    for o, t in PAIRS:
        if not (ok(o) and ok(t)) or CONFIGS[o]["ours_args"]:  # the levers-off rows are not ours' claim
            continue
        ro, rt = results[o], results[t]
        r = ro["s_per_token"] / rt["s_per_token"]
        out.append(f"- step time <= 1/3: {o} / {t} = {r:.3f} -> {'met' if r <= 1 / 3 else 'NOT met'}")
        if ro["train_peak_rss"] and rt["train_peak_rss"]:
            m = ro["train_peak_rss"] / rt["train_peak_rss"]
            out.append(f"- peak RSS (train) <= TRL's: {o} / {t} = {m:.2f} -> {'met' if m <= 1 else 'NOT met'}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python",
                   help="interpreter of the venv where TRL is installed (benchmarks/requirements-trl.txt)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    p.add_argument("--data", default="../shared/data/hh_harmless_test.jsonl",
                   help="preference rows (.jsonl); a relative path is taken from the repo root")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4, help="rows (SFT) / pairs (reward) per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    p.add_argument("--timed-steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--configs", default=",".join(DEFAULT_ORDER),
                   help=f"comma-separated, run in this order; known: {', '.join(CONFIGS)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results_sft_reward.md"), help="markdown results")
    p.add_argument("--workdir", default=None, help="scratch dir for logs and rows (default: a new /tmp dir)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
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

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        res = (worker_ours if a.worker == "ours" else worker_trl)(spec)
        Path(a.result).write_text(json.dumps(res))
        return

    order = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in order if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    if any(CONFIGS[c]["side"] == "trl" for c in order) and not Path(a.trl_python).exists():
        raise SystemExit(f"--trl-python {a.trl_python}: not found. Create the venv: python3 -m venv /tmp/trl-venv && "
                         f"/tmp/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    from common import bundled_model_dir
    model_dir = a.model or str(bundled_model_dir())
    data = Path(a.data) if Path(a.data).is_absolute() else (REPO / a.data).resolve()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_sft_reward_"))
    work.mkdir(parents=True, exist_ok=True)
    k = a.batch_size * (a.warmup_steps + a.timed_steps)
    k_pack = 4 * k  # enough rows for TRL's packing to fill batch x steps sequences of max_length
    sft_rows, sft_skipped = select_rows(data, model_dir, k, a.max_length)
    pack_rows, _ = select_rows(data, model_dir, k_pack, a.max_length)  # the same first k, then more
    rm_rows, rm_skipped = select_pairs(data, model_dir, k, a.max_length)

    def write(name: str, rows: list[dict], sft: bool) -> str:
        path = work / name
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]} if sft else r) + "\n"
                                for r in rows))
        return str(path)
    base = {"model": model_dir, "batch_size": a.batch_size, "max_length": a.max_length,
            "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps, "num_rows": k, "num_pack_rows": k_pack}
    base_spec = {"sft": dict(base, rows=write("sft_rows.jsonl", sft_rows, True),
                             pack_rows=write("sft_pack_rows.jsonl", pack_rows, True)),
                 "rm": dict(base, rows=write("rm_pairs.jsonl", rm_rows, False))}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    meta = {"model": model_dir, "data": a.data, "sft_rows": k, "rm_rows": k, "pack_rows": k_pack,
            "sft_skipped": sft_skipped, "rm_skipped": rm_skipped, "batch_size": a.batch_size,
            "max_length": a.max_length, "warmup": a.warmup_steps, "timed": a.timed_steps, "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_start": loadavg()}
    print(f"work dir {work}; SFT {k} rows (+{k_pack - k} for TRL packing), reward {k} pairs ({rm_skipped} longer "
          f"skipped); load {meta['load_start']}", flush=True)
    raw = {}
    for name in order:
        cfg = CONFIGS[name]
        python = a.ours_python if cfg["side"] == "ours" else a.trl_python
        print(f"[{name}] {cfg['label']} ...", flush=True)
        source = raw.get(cfg.get("rows_from"), {})
        if "rows_from" in cfg and not source.get("step_rows"):
            raw[name] = {"name": name, "error": f"needs the rows of {cfg['rows_from']}: run it first"}
            print(f"[{name}] skipped: {raw[name]['error']}", flush=True)
            continue
        raw[name] = r = run_config(name, cfg, base_spec, work, python, a.timeout, source.get("step_rows"))
        if "error" in r:
            print(f"[{name}] FAILED ({r['error']}); log: {r['log']}", flush=True)
        else:
            print(f"[{name}] steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s; rows {r['rows']}; tokens "
                  f"{r['tokens']}; loss tokens {r['loss_tokens']}; peak RSS train {gb(r['train_peak_rss'])} GB, "
                  f"process {gb(r['process_peak_rss'])} GB; wall {r['wall_s']:.0f} s; load {r['load_before']} -> "
                  f"{r['load_after']}", flush=True)
            if "versions" in r:
                meta["trl_version"], meta["trl_transformers"] = r["versions"]["trl"], r["versions"]["transformers"]
                meta["trl_torch"] = r["torch"]
    meta["load_end"] = loadavg()
    results = {name: summarize(raw[name], a.warmup_steps) for name in order}
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = render(results, order, meta)
    print("\n" + text, flush=True)
    Path(a.output).write_text(text)
    print(f"written to {a.output} (raw numbers: {work / 'results.json'})")


if __name__ == "__main__":
    main()
