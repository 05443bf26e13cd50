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
standard library, so the TRL venv needs neither tyro nor this repo's requirements.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

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
# Memory helpers (Linux): VmHWM can be reset by writing 5 to /proc/self/clear_refs, so the training phase's own peak
# is measured apart from model loading and the reference precompute.


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------------
# Workers


def worker_ours(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    import dpo

    class TimedDPOTrainer(dpo.DPOTrainer):
        precompute_s = None

        def _precompute_reference(self):
            t = time.perf_counter()
            super()._precompute_reference()
            self.precompute_s = time.perf_counter() - t

    class SequentialSampler:  # the rows in file order, like TRL's train_sampling_strategy="sequential"
        def __init__(self, n: int, bs: int):
            self.n, self.bs, self.consumed = n, bs, 0

        def next_indices(self) -> list[int]:
            idx = [(self.consumed + i) % self.n for i in range(self.bs)]
            self.consumed += self.bs
            return idx

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
    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(args)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_data) != spec["num_rows"]:
        raise RuntimeError(f"ours kept {len(trainer.train_data)} of {spec['num_rows']} rows")
    trainer.sampler = SequentialSampler(len(trainer.train_data), spec["batch_size"])
    computed = []  # tokens through the model: the packed row (each prompt once) or the non-pad tokens of the batch
    make_batch = trainer.make_batch

    def counting_make_batch(examples):
        b = make_batch(examples)
        mask = b.tensors.get("attention_mask")
        computed.append(int(b["input_ids"].numel() if mask is None else mask.sum()))
        return b
    trainer.make_batch = counting_make_batch
    reset_ok = reset_peak_rss()
    times, tokens = [], []
    for _ in range(n_steps):
        t = time.perf_counter()
        out = trainer.training_step()
        _sync(torch)
        times.append(time.perf_counter() - t)
        tokens.append(out.num_tokens)
    return {"step_s": times, "tokens": tokens, "computed_tokens": computed, "precompute_s": trainer.precompute_s,
            "setup_s": setup_s,
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
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    with open(spec["rows"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    kwargs = dict(output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"], max_steps=n_steps,
                  max_length=spec["max_length"], bf16=spec["precision"] == "bf16",
                  train_sampling_strategy="sequential", report_to="none", save_strategy="no", disable_tqdm=True,
                  seed=1, use_cpu=not torch.cuda.is_available())  # bf16 on CPU needs use_cpu (else an error)
    kwargs.update(spec["trl_kwargs"])
    config = DPOConfig(**kwargs)
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig
        peft_config = LoraConfig(**LORA)
    state = {"times": [], "tokens": [], "precompute_s": None, "reset_ok": False, "t_prev": None}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            state["precompute_s"] = (state["precompute_s"] or 0.0) + time.perf_counter() - t
            return out

        def training_step(self, model, inputs, *a, **k):
            state["tokens"].append(int(inputs["attention_mask"].sum()))
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
    trainer = TimedDPOTrainer(model=spec["model"], args=config, train_dataset=ds, processing_class=tok,
                              callbacks=[StepTimer()], peft_config=peft_config)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_dataset) != spec["num_rows"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {spec['num_rows']} rows")
    notes = []
    if config.padding_free and not trainer.padding_free:
        notes.append("padding_free=True fell back to padding (TRL 1.16: 'temporarily unavailable')")
    trainer.train()
    hwm = vm_hwm_bytes() if state["reset_ok"] else None
    if len(state["times"]) != n_steps:
        raise RuntimeError(f"TRL ran {len(state['times'])} steps, expected {n_steps}")
    return {"step_s": state["times"], "tokens": state["tokens"], "precompute_s": state["precompute_s"],
            "setup_s": setup_s, "train_peak_rss": hwm, "process_peak_rss": process_peak_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "notes": notes,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "gradient_checkpointing": config.gradient_checkpointing,
            "optim": getattr(config.optim, "value", str(config.optim))}


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def matmul_peak(seconds: float = 2.0) -> dict[str, float]:
    """Best GFLOP/s of a square torch.mm loop, per dtype, over a few sizes (the machine's practical matmul peak)."""
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best = 0.0
        for n in ((4096, 8192) if dev == "cuda" else (1024, 2048)):  # a GPU needs big products to reach its peak
            a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
            c = torch.empty(n, n, dtype=dtype, device=dev)
            torch.mm(a, b, out=c)  # warm-up
            _sync(torch)
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                for _ in range(3):
                    torch.mm(a, b, out=c)
                _sync(torch)
                best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


def non_embedding_params(model_dir: str) -> tuple[int, int]:
    """(N, all parameters): N = parameters without the input embedding, the (tied) LM head counted as its own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once here
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - emb.numel() + (head.numel() if head is emb else 0), total


def select_rows(data: Path, model_dir: str, k: int, max_length: int) -> tuple[list[dict], int]:
    """The first k rows of the file whose prompt fits in max_length (TRL drops longer ones; so does ours with
    --max-prompt-length = --max-length), so both sides train on exactly these rows."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from common import encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, skipped = [], 0
    with open(data) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if len(encode_prompt(tok, row["prompt"])) >= max_length:
                skipped += 1
                continue
            rows.append({k_: row[k_] for k_ in ("prompt", "chosen", "rejected")})
            if len(rows) == k:
                break
    if len(rows) < k:
        raise SystemExit(f"{data}: only {len(rows)} usable rows, need {k}")
    return rows, skipped


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_config(name: str, cfg: dict, base_spec: dict, work: Path, python: str, timeout: int) -> dict:
    spec = dict(base_spec, name=name, precision=cfg["precision"], ours_args=cfg.get("ours_args", {}),
                stock=cfg.get("stock", False),
                trl_kwargs=cfg.get("trl_kwargs", {}), lora=cfg.get("lora", False), output_dir=str(work / f"out-{name}"))
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


def summarize(res: dict, cfg: dict, warmup: int, n_params: int, peaks: dict) -> dict:
    if "error" in res:
        return res
    timed, toks = res["step_s"][warmup:], res["tokens"][warmup:]
    med = statistics.median(timed)
    t_mean = sum(toks) / len(toks)
    # LoRA: the frozen weights need no weight gradients, so the backward costs 2NT instead of 4NT
    coef = (4 if cfg.get("lora") else 6) + 2 * ref_in_step(cfg)
    flops = coef * n_params * t_mean
    computed = res.get("computed_tokens", res["tokens"])[warmup:]  # TRL: every non-pad token goes through
    c_mean = sum(computed) / len(computed)
    return res | {"median_s": med, "min_s": min(timed), "max_s": max(timed), "tokens_mean": t_mean,
                  "computed_mean": c_mean, "tokens_per_s": t_mean / med, "coef": coef, "flops": flops,
                  "mfu": flops / med / (peaks[cfg["precision"]] * 1e9),
                  "hfu": coef * n_params * c_mean / med / (peaks[cfg["precision"]] * 1e9)}


def gb(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def render(results: dict, order: list[str], meta: dict) -> str:
    n, peaks = meta["n_params"], meta["peaks"]
    L = []
    L.append(f"# DPO benchmark: ours (dpo.py) vs TRL {meta.get('trl_version', '?')}\n")
    L.append(f"- machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['threads']}; "
             f"torch {meta['torch']} (ours), {meta.get('trl_torch', '?')} (TRL venv), "
             f"transformers {meta['transformers']} (ours) / {meta.get('trl_transformers', '?')} (TRL)")
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
    L.append(f"- steps: {meta['warmup']} warm-up + {meta['timed']} timed optimizer steps per configuration, each "
             f"configuration in a fresh process, ours and TRL alternating; s/step = median of the timed steps "
             f"[min-max]")
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
    L.append(f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}. Other "
             f"processes (another engineer's tests) may have been running on the same 2 cores.\n")

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
    for o, t in PAIRS:
        if o not in results or t not in results or "error" in results[o] or "error" in results[t]:
            continue
        ro, rt = results[o], results[t]
        tr = (f"{ro['train_peak_rss'] / rt['train_peak_rss']:.2f}"
              if ro["train_peak_rss"] and rt["train_peak_rss"] else "n/a")
        L.append(f"| {CONFIGS[o]['label']} | {CONFIGS[t]['label']} | {ro['median_s'] / rt['median_s']:.3f} | "
                 f"{rt['median_s'] / ro['median_s']:.2f}x | {ro['tokens_per_s'] / rt['tokens_per_s']:.2f} | {tr} | "
                 f"{ro['process_peak_rss'] / rt['process_peak_rss']:.2f} |")
    mism = [(o, t) for o, t in PAIRS if o in results and t in results and "error" not in results[o]
            and "error" not in results[t] and results[o]["tokens"] != results[t]["tokens"]]
    if mism:
        L.append("\nWarning: per-step token counts differ between " + ", ".join(f"{o}/{t}" for o, t in mism) + ": "
                 + "; ".join(f"{k}: {results[k]['tokens']}" for k in sorted({x for p in mism for x in p})))
    else:
        L.append("\nPer-step non-pad token counts are identical on both sides for every pair above.")
    L.append("\nTargets of issue 5 (ours/TRL step time; MFU; peak RSS train at equal settings):")
    L.append(targets(results))
    return "\n".join(L) + "\n"


def targets(results: dict) -> str:
    def ok(name: str) -> bool:
        return name in results and "error" not in results[name]

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
        if ok(o) and ok(t) and results[o]["train_peak_rss"] and results[t]["train_peak_rss"]:
            r = results[o]["train_peak_rss"] / results[t]["train_peak_rss"]
            out.append(f"- peak RSS (train) <= 0.6x: {o} / {t} = {r:.2f} -> {'met' if r <= 0.6 else 'NOT met'}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python",
                   help="interpreter of the venv where TRL is installed (benchmarks/requirements-trl.txt)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    p.add_argument("--data", default="../shared/data/hh_harmless_test.jsonl",
                   help="preference rows (.jsonl); a relative path is taken from the repo root")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--timed-steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--configs", default=",".join(DEFAULT_ORDER),
                   help=f"comma-separated, run in this order; known: {', '.join(CONFIGS)}")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="per dtype, per measurement")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per configuration")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results_dpo.md"), help="markdown results file")
    p.add_argument("--workdir", default=None, help="scratch dir for logs and rows (default: a new /tmp dir)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        res = (worker_ours if a.worker == "ours" else worker_trl)(spec)
        Path(a.result).write_text(json.dumps(res))
        return

    order = [n for c in a.configs.split(",") if c.strip() for n in GROUPS.get(c.strip(), [c.strip()])]
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
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_dpo_"))
    work.mkdir(parents=True, exist_ok=True)
    k = a.batch_size * (a.warmup_steps + a.timed_steps)
    rows, skipped = select_rows(data, model_dir, k, a.max_length)
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "eval_rows.jsonl").write_text(json.dumps(rows[0]) + "\n")  # ours needs an eval set; one row
    n_params, n_total = non_embedding_params(model_dir)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    meta = {"model": model_dir, "data": a.data, "num_rows": k, "skipped": skipped, "batch_size": a.batch_size,
            "max_length": a.max_length, "warmup": a.warmup_steps, "timed": a.timed_steps, "n_params": n_params,
            "n_total": n_total, "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "load_start": loadavg()}
    print(f"work dir {work}; {k} rows ({skipped} skipped: prompt >= {a.max_length} tokens); N = {n_params:,}; "
          f"load {meta['load_start']}", flush=True)
    meta["peak_before"] = matmul_peak(a.matmul_seconds)
    print(f"matmul peak: bf16 {meta['peak_before']['bf16']:.0f} GFLOP/s, fp32 {meta['peak_before']['fp32']:.0f} "
          f"GFLOP/s", flush=True)
    base = {"model": model_dir, "rows": str(work / "rows.jsonl"), "eval_rows": str(work / "eval_rows.jsonl"),
            "num_rows": k, "batch_size": a.batch_size, "max_length": a.max_length, "warmup_steps": a.warmup_steps,
            "timed_steps": a.timed_steps}
    raw = {}
    for name in order:
        cfg = CONFIGS[name]
        python = a.ours_python if cfg["side"] == "ours" else a.trl_python
        print(f"[{name}] {cfg['label']} ...", flush=True)
        raw[name] = r = run_config(name, cfg, base, work, python, a.timeout)
        if "error" in r:
            print(f"[{name}] FAILED ({r['error']}); log: {r['log']}", flush=True)
        else:
            pre = "" if r.get("precompute_s") is None else f", precompute {r['precompute_s']:.1f} s"
            print(f"[{name}] steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s; tokens {r['tokens']}{pre}; "
                  f"peak RSS train {gb(r['train_peak_rss'])} GB, process {gb(r['process_peak_rss'])} GB; "
                  f"wall {r['wall_s']:.0f} s; load {r['load_before']} -> {r['load_after']}", flush=True)
            if "versions" in r:
                meta["trl_version"], meta["trl_transformers"] = r["versions"]["trl"], r["versions"]["transformers"]
                meta["trl_torch"] = r["torch"]
    meta["peak_after"] = matmul_peak(a.matmul_seconds)
    meta["peaks"] = {d: max(meta["peak_before"][d], meta["peak_after"][d]) for d in ("bf16", "fp32")}
    meta["load_end"] = loadavg()
    results = {name: summarize(raw[name], CONFIGS[name], a.warmup_steps, n_params, meta["peaks"]) for name in order}
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = render(results, order, meta)
    print("\n" + text, flush=True)
    Path(a.output).write_text(text)
    print(f"written to {a.output} (raw numbers: {work / 'results.json'})")


if __name__ == "__main__":
    main()
