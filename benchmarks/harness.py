"""What the benchmarks share: the worker protocol (one fresh process per configuration), probes, rows, samplers, flags,
tables, TRL's side and the GRPO workers. Standard library only at module level: the TRL venv imports this file too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HH_DATA = "../shared/data/hh_harmless_test.jsonl"
SPLIT_KEYS = ("generation", "scoring", "logprobs", "update")  # where an online iteration's time goes


def repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------------------------------
# Probes (Linux): writing 5 to /proc/self/clear_refs resets VmHWM, so the training phase's peak is measured apart from
# loading and any reference precompute.


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_report(torch, reset_ok: bool) -> dict:
    """The train peak RSS (VmHWM since reset_peak_rss), the process's ru_maxrss, the CUDA peak, threads, version."""
    hwm = (next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) if reset_ok
           else None)  # reset_ok: Linux, where /proc/self/status has it
    return {"train_peak_rss": hwm,
            "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def time_ours(cls, args, num_rows: int, sampler, n_steps: int, record=None, patch=None):
    """Build our trainer (it must hold exactly the rows the parent wrote), swap in the sampler, call record(batch) on
    every micro-batch it makes (offline trainers), patch(trainer), then reset the peak RSS and time n_steps of
    trainer.training_step(). -> (trainer, StepOutputs, report: memory, setup_s, step_s)."""
    import torch
    t0 = time.perf_counter()
    trainer = cls(args)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_data) != num_rows:
        raise RuntimeError(f"ours has {len(trainer.train_data)} training rows, the parent wrote {num_rows}")
    trainer.sampler = sampler
    if record:
        make_batch = trainer.make_batch

        def recording(examples):
            record(b := make_batch(examples))
            return b
        trainer.make_batch = recording
    if patch:
        patch(trainer)
    reset_ok, times, outs = reset_peak_rss(), [], []
    for _ in range(n_steps):
        t = time.perf_counter()
        outs.append(trainer.training_step())
        sync(torch)
        times.append(time.perf_counter() - t)
    return trainer, outs, memory_report(torch, reset_ok) | {"setup_s": setup_s, "step_s": times, "notes": []}


def computed_tokens(b) -> int:
    """Tokens a batch puts through the model: a packed row's length (shared prompts once) or the non-pad tokens."""
    return int(b["attention_mask"].sum() if "attention_mask" in b.tensors else b["input_ids"].numel())


def matmul_peak(seconds: float = 2.0, dtypes: tuple[str, ...] = ("bf16", "fp32"), reps: int = 3) -> dict[str, float]:
    """Best GFLOP/s of a square torch.mm loop per dtype over a few sizes: the machine's practical matmul peak."""
    import torch
    dev, out = "cuda" if torch.cuda.is_available() else "cpu", {}
    for name in dtypes:
        dtype, best = {"bf16": torch.bfloat16, "fp32": torch.float32}[name], 0.0
        for n in ((4096, 8192) if dev == "cuda" else (1024, 2048)):  # a GPU needs big products to reach its peak
            a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
            c = torch.mm(a, b)  # warm-up
            sync(torch)
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b, out=c)
                sync(torch)
                best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


def non_embedding_params(model_dir: str) -> tuple[int, int]:
    """(N, all parameters): N = parameters without the input embedding, the (tied) LM head counted as its own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once here
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - emb.numel() + (head.numel() if head is emb else 0), total


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------------------------------
# Numbers and tables


def gb(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def ratio(a, b, fmt: str = ".2f") -> str:
    """a / b, or 'n/a' where either is missing (a peak RSS this machine cannot reset)."""
    return f"{a / b:{fmt}}" if a and b else "n/a"


def seconds(xs: list[float]) -> str:
    return " ".join(f"{s:.2f}" for s in xs)


def med_range(r: dict) -> str:
    return f"{r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}]"


def mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


def finished(results: dict, *names: str) -> bool:
    return all(n in results and "error" not in results[n] for n in names)


def timed_stats(timed: list[float]) -> dict:
    return {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed)}


def table(header: list[str], rows: list) -> list[str]:
    """A markdown table; a row given as a string (a failed run: tab-separated cells) is padded with empty cells."""
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = r.split("\t") if isinstance(r, str) else list(r)
        out.append("| " + " | ".join(map(str, cells + [""] * (len(header) - len(cells)))) + " |")
    return out


def failed(r: dict, *cells: str) -> str:
    """A failed run's row: its leading cells, then the error."""
    return "\t".join([*cells, f"failed: {r['error']}"])


def notes_line(results: dict, runs: list[str], configs: dict, trl_note, ours_note=None) -> str:
    """The runs' own notes, then trl_note(run, result) for each TRL run (and ours_note for each of ours)."""
    ok = [k for k in runs if "error" not in results[k]]
    notes = [f"{k}: {x}" for k in ok for x in results[k].get("notes", [])]
    notes += [(trl_note if configs[config_name(k)]["side"] == "trl" else ours_note)(k, results[k]) for k in ok
              if ours_note or configs[config_name(k)]["side"] == "trl"]
    return "\nNotes: " + ("; ".join(notes) + "." if notes else "none.")


# ----------------------------------------------------------------------------------------------------------------------
# Rows and samplers


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def select_rows(data: Path, model_dir: str, k: int, max_length: int, pairs_fit: bool = False) -> tuple[list[dict], int]:
    """The first k rows whose prompt is shorter than max_length (TRL drops longer ones; so does ours with
    --max-prompt-length = --max-length). pairs_fit: instead the rows whose prompt + chosen and prompt + rejected (+ EOS)
    fit, counted ours' way and TRL's (TRL's RewardTrainer drops longer pairs). -> (rows, rows skipped before them)."""
    repo_on_path()
    from transformers import AutoTokenizer

    from plumbing.data import encode_completion, encode_prompt
    tok, rows, skipped = AutoTokenizer.from_pretrained(model_dir), [], 0
    for row in read_jsonl(data):
        prompt = encode_prompt(tok, row["prompt"])
        fits = len(prompt) < max_length if not pairs_fit else all(
            len(prompt) + len(encode_completion(tok, row[c])) <= max_length
            and len(tok(row["prompt"] + row[c] + tok.eos_token)["input_ids"]) <= max_length
            for c in ("chosen", "rejected"))
        if not fits:
            skipped += 1
            continue
        rows.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
        if len(rows) == k:
            return rows, skipped
    raise SystemExit(f"{data}: only {len(rows)} {'pairs fit' if pairs_fit else 'usable rows'} in {max_length} tokens, "
                     f"need {k}")


def prompt_tokens(model_dir: str, rows: list[dict]) -> str:
    """The prompts' lengths in tokens after the chat template: '44', or '40-48'."""
    repo_on_path()
    from transformers import AutoTokenizer

    from plumbing.data import encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted({len(encode_prompt(tok, r["prompt"])) for r in rows})
    return f"{lengths[0]}" + (f"-{lengths[-1]}" if lengths[-1] != lengths[0] else "")


def grpo_prompts(work: Path, n_steps: int, batch_size: int, g: int, task: str = "arithmetic",
                 name: str = "grpo_prompts") -> tuple[dict, list[dict]]:
    """A built-in task's training prompts in their fixed order, batch_size / g per iteration (cycled): the spec both
    online workers read (TRL the file work/name.jsonl, ours the indices per iteration), and the rows."""
    repo_on_path()
    import tasks
    task_rows = [row for _, row in tasks.prompt_rows(task, False)]
    per_iter = batch_size // g
    rows = [task_rows[k % len(task_rows)] for k in range(per_iter * n_steps)]
    steps = [[(s * per_iter + j) % len(task_rows) for j in range(per_iter)] for s in range(n_steps)]
    return {"prompts": write_jsonl(work / f"{name}.jsonl", rows), "num_prompts": len(rows), "dataset": task,
            "num_task_prompts": len(task_rows), "ours_steps": steps, "batch_size": batch_size,
            "num_generations": g}, rows


class ListSampler:
    """Swapped into our trainers: given row indices, one list per step (see `sequential`)."""

    def __init__(self, steps: list[list[int]]):
        self.steps, self.consumed, self.i = steps, 0, 0

    def next_indices(self, all_ranks: bool = False) -> list[int]:
        idx = self.steps[self.i]
        self.i, self.consumed = self.i + 1, self.consumed + len(idx)
        return idx


def sequential(n: int, bs: int, steps: int) -> ListSampler:
    """The rows in file order, bs per step, like TRL's train_sampling_strategy="sequential"."""
    return ListSampler([[(s * bs + i) % n for i in range(bs)] for s in range(steps)])


# ----------------------------------------------------------------------------------------------------------------------
# The driver: flags, configurations, one worker process each, machine metadata, the results file


def bench_parser(doc: str, *, output: str, configs: dict, default_order: list[str], warmup: int, timed: int,
                 timeout: int, data: bool = False, unit: str = "steps") -> argparse.ArgumentParser:
    """The flags every ours-vs-TRL benchmark takes; the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python",
                   help="interpreter of the venv where TRL is installed (benchmarks/requirements-trl.txt)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    if data:
        p.add_argument("--data", default=HH_DATA, help="preference rows (.jsonl); relative to the repo root")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--warmup-steps", type=int, default=warmup, help=f"untimed {unit} first")
    p.add_argument("--timed-steps", type=int, default=timed, help=f"timed {unit} (median reported)")
    p.add_argument("--configs", default=",".join(default_order),
                   help=f"comma-separated, run in this order (repeats allowed); known: {', '.join(configs)}")
    p.add_argument("--timeout", type=int, default=timeout, help="seconds per configuration")
    p.add_argument("--output", default=str(REPO / "benchmarks" / output), help="markdown results file")
    p.add_argument("--workdir", default=None, help="scratch dir for logs, rows and raw numbers (default: new in /tmp)")
    for hidden in ("--worker", "--spec", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p


def run_as_worker(a, worker_ours, worker_trl) -> bool:
    """In a worker process (--worker ours|trl): run that side's worker on --spec, write its result to --result."""
    if not a.worker:
        return False
    res = (worker_ours if a.worker == "ours" else worker_trl)(json.loads(Path(a.spec).read_text()))
    Path(a.result).write_text(json.dumps(res))
    return True


def config_name(run: str) -> str:
    """The configuration of a run key: 'ours#2' (the second run of 'ours') -> 'ours'."""
    return run.split("#")[0]


def parse_runs(a, configs: dict, groups: dict | None = None) -> list[str]:
    """--configs -> run keys in order: a group name expands to its configurations; the k-th run of a configuration
    (k > 1) is keyed 'name#k'. Unknown names and a missing TRL interpreter are errors."""
    order = [n for c in a.configs.split(",") if c.strip() for n in (groups or {}).get(c.strip(), [c.strip()])]
    if unknown := [c for c in order if c not in configs]:
        raise SystemExit(f"--configs: unknown {unknown}; known: {list(configs)}")
    if any(configs[c]["side"] == "trl" for c in order) and not Path(a.trl_python).exists():
        raise SystemExit(f"--trl-python {a.trl_python}: not found. Create the venv: python3 -m venv /tmp/trl-venv && "
                         f"/tmp/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt")
    return [c if c not in order[:i] else f"{c}#{order[:i].count(c) + 1}" for i, c in enumerate(order)]


def data_path(data: str) -> Path:
    return Path(data) if Path(data).is_absolute() else (REPO / data).resolve()


def start(a, prefix: str) -> tuple[str, Path, dict]:
    """-> (--model, default the bundled model's directory; --workdir, default a new /tmp dir; meta: the machine, the
    model and the flags)."""
    repo_on_path()
    import torch
    import transformers

    from plumbing.models import bundled_model_dir
    work = Path(a.workdir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    meta = {k: v for k, v in vars(a).items() if k not in ("worker", "spec", "result")} | {
        "model": a.model or str(bundled_model_dir()), "cpu": cpu, "cores": os.cpu_count(), "load_start": loadavg(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__}
    return meta["model"], work, meta


def header_lines(meta: dict, unit: str = "optimizer steps") -> list[str]:
    """The machine, the steps per configuration and what the peak RSS and the load average mean."""
    return [f"- machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['threads']}; torch "
            f"{meta['torch']} / {meta.get('trl_torch', '?')}, transformers {meta['transformers']} / "
            f"{meta.get('trl_transformers', '?')} (ours / TRL venv)",
            f"- {unit}: {meta['warmup_steps']} warm-up + {meta['timed_steps']} timed per configuration, each in a "
            f"fresh process; s = median [min-max]. Peak RSS: 'train' = VmHWM reset before the first timed one, "
            f"'process' = ru_maxrss",
            f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}; compare numbers "
            f"from one run only\n"]


def run_logged(cmd: list[str], log: Path, timeout: float | None, env: dict | None = None,
               cwd: Path = REPO) -> tuple[int, float]:
    """Run cmd, its output in log, in its own process group so that a timeout ends its children too (torchrun's
    ranks). -> (exit code, 124 on a timeout; wall seconds)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env or os.environ.copy(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    return rc, time.perf_counter() - t


def run_all(a, script: str, runs: list[str], configs: dict, work: Path, meta: dict, spec_of, describe,
            raw: dict | None = None) -> dict:
    """Each run in turn, in a fresh process: `python script --worker side --spec F --result F` (a configuration may name
    its own "script" and "cwd": another checkout), its output in work/name.log; spec_of(name, cfg) -> the worker's spec
    (or a reason to skip it), describe(result) -> its progress line. -> run key -> the worker's result plus wall time,
    load average before and after, the log, or an 'error'."""
    raw = {} if raw is None else raw
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name in runs:
        cfg = configs[config_name(name)]
        print(f"[{name}] {cfg['label']} ...", flush=True)
        spec = spec_of(name, cfg)
        if isinstance(spec, str):
            raw[name] = {"name": name, "error": spec}
            print(f"[{name}] skipped: {spec}", flush=True)
            continue
        spec_file, result_file, log = (work / f"{name}.{x}" for x in ("spec.json", "result.json", "log"))
        spec_file.write_text(json.dumps(spec | {"name": name, "output_dir": str(work / f"out-{name}")}))
        load_before = loadavg()
        rc, wall = run_logged([a.ours_python if cfg["side"] == "ours" else a.trl_python, str(Path(cfg.get(
            "script", script)).resolve()), "--worker", cfg["side"], "--spec", str(spec_file), "--result",
            str(result_file)], log, a.timeout, env, cfg.get("cwd", REPO))
        r = {"name": name, "wall_s": wall, "load_before": load_before, "load_after": loadavg(), "log": str(log)}
        if rc == 0 and result_file.exists():
            raw[name] = r = r | json.loads(result_file.read_text())
        else:
            lines = log.read_text(errors="replace").strip().splitlines()[1:]  # after the command line
            raw[name] = r = r | {"error": f"{'timeout' if rc == 124 else f'exit {rc}'}: "
                                          f"{lines[-1] if lines else '(no output)'}"}
        if "error" in r:
            print(f"[{name}] FAILED ({r['error']}); log: {r['log']}", flush=True)
            continue
        print(f"[{name}] {describe(r)}; peak RSS train {gb(r['train_peak_rss'])} GB, process "
              f"{gb(r['process_peak_rss'])} GB; setup {r['setup_s']:.0f} s, wall {r['wall_s']:.0f} s; load "
              f"{r['load_before']} -> {r['load_after']}", flush=True)
        if "versions" in r:
            meta["trl_version"], meta["trl_transformers"] = r["versions"]["trl"], r["versions"]["transformers"]
            meta["trl_torch"] = r["torch"]
    meta["load_end"] = loadavg()
    return raw


def finish(a, work: Path, meta: dict, results: dict, text: str) -> None:
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n" + text, flush=True)
    Path(a.output).write_text(text)
    print(f"written to {a.output} (raw numbers: {work / 'results.json'})")


# ----------------------------------------------------------------------------------------------------------------------
# TRL's side (runs in the TRL venv)


def trl_kwargs(spec: dict, **kw) -> dict:
    """TrainingArguments every TRL worker sets (no reports, checkpoints or bars, seed 1; bf16 on CPU needs use_cpu),
    then the configuration's own."""
    import torch
    return dict(output_dir=spec["output_dir"], report_to="none", save_strategy="no", disable_tqdm=True, seed=1,
                use_cpu=not torch.cuda.is_available(), **kw) | spec["trl_kwargs"]


def time_trl(cls, spec: dict, config, state: dict, rows: list[dict], check_rows: bool = True, patch=None, **kw):
    """TRL's side of time_ours: build cls with a step timer (one optimizer step = the time between consecutive
    on_step_end calls: data, forward, backward, clip, AdamW, scheduler and the trainer's bookkeeping; the first from
    on_train_begin, where the peak RSS is reset), check it kept the rows the parent wrote, patch(trainer), train.
    -> (trainer, report: memory, versions, settings, setup_s, step_s)."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["reset_ok"], state["t_prev"] = reset_peak_rss(), time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            sync(torch)
            state["times"].append(time.perf_counter() - state["t_prev"])
            state["t_prev"] += state["times"][-1]
    datasets.disable_progress_bars()
    state["times"], t0 = [], time.perf_counter()
    trainer = cls(model=spec["model"], args=config, train_dataset=datasets.Dataset.from_list(rows),
                  callbacks=[StepTimer()], **{"processing_class": AutoTokenizer.from_pretrained(spec["model"])} | kw)
    setup_s = time.perf_counter() - t0
    if check_rows and len(trainer.train_dataset) != spec["num_rows"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {spec['num_rows']} rows")
    if patch:
        patch(trainer)
    trainer.train()
    if len(state["times"]) != config.max_steps:
        raise RuntimeError(f"TRL ran {len(state['times'])} steps, expected {config.max_steps}")
    return trainer, memory_report(torch, state["reset_ok"]) | {
        "notes": [], "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "gradient_checkpointing": config.gradient_checkpointing, "setup_s": setup_s, "step_s": state["times"],
        "optim": getattr(config.optim, "value", str(config.optim))}


# ----------------------------------------------------------------------------------------------------------------------
# GRPO workers (bench_grpo.py, bench_family.py's GSPO; TRL's also bench_ppo.py's)


def worker_ours_grpo(spec: dict) -> dict:
    """Our grpo.py on a built-in task's prompts (the tool task: its CalculatorEnv episodes), iteration s on prompts
    spec["ours_steps"][s]: per iteration the seconds, the split (the step's own time/* metrics), the generated tokens
    (sampled ones only), the episode prompts (the question) and on the tool task turns and tool calls per episode."""
    repo_on_path()
    import torch

    import grpo
    n_steps, g = spec["warmup_steps"] + spec["timed_steps"], spec["num_generations"]
    args = grpo.Args(**dict(
        model=spec["model"], dataset=spec.get("dataset", "arithmetic"), output_dir=spec["output_dir"],
        total_steps=n_steps, batch_size=spec["batch_size"] // g, num_generations=g,
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0,
        loss_type=grpo.LossType.dapo, beta=0.0, num_iterations=spec["num_iterations"], gradient_accumulation_steps=1,
        precision="bf16", seed=1, log_every=10 ** 9, eval_every=0) | spec["ours_kwargs"])
    # the sampler hands out indices into the built-in prompts, per iteration
    trainer, outs, report = time_ours(grpo.GRPOTrainer, args, spec["num_task_prompts"],
                                      ListSampler(spec["ours_steps"]), n_steps)
    if any(o.num_samples != spec["batch_size"] for o in outs):
        raise RuntimeError(f"ours ran {[o.num_samples for o in outs]} episodes, expected {spec['batch_size']}")
    if (dtype := next(trainer.model.parameters()).dtype) != torch.float32:
        report["notes"].append(f"policy weights are {dtype}")
    report["iter_s"] = report.pop("step_s")
    return report | {  # grpo.py repeats each prompt G times, groups contiguous (as TRL)
        "prompts": [[trainer.train_data[j]["prompt"][-1]["content"] for j in step
                                                      for _ in range(g)] for step in spec["ours_steps"]],
        "gen_tokens": [round(float(o.metrics["completions/mean_length"]) * o.num_samples) for o in outs],
        "split": {k: [float(o.metrics[f"time/{k}"]) for o in outs] for k in SPLIT_KEYS},
        "optimizer_steps_per_iter": args.num_iterations, "rewards": [float(o.metrics["reward"]) for o in outs],
        **{k: [float(o.metrics[f"{k}/mean"]) for o in outs] for k in ("turns", "tool_calls") if trainer.env},
        "learning_rate": args.learning_rate, "padding_free": args.padding_free, "precision": args.precision}


def worker_trl_grpo(spec: dict) -> dict:
    """TRL's GRPOTrainer on the prompt file: per iteration (one generation round and the num_iterations optimizer
    steps it feeds) the seconds, the split, the generated tokens and the episode prompts. spec["max_turns"]: the tool
    task with TRL's tool loop (tools=[calculator]), its turns and tool calls per episode too."""
    repo_on_path()
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from tasks import calculate, reward  # the very functions ours uses

    def arithmetic(prompts, completions, answer, **_):  # chat completions: messages; the final reply's text is scored
        return reward(prompts, [next((m.get("content") or "" for m in reversed(c) if m.get("role") == "assistant"), "")
                                if isinstance(c, list) else c for c in completions], answer)

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: the expression, e.g. 12*34
        """
        return calculate(expression)
    n_steps, mu = spec["warmup_steps"] + spec["timed_steps"], spec.get("num_iterations", 2)
    bs, g, turns, rows = spec["batch_size"], spec["num_generations"], spec.get("max_turns"), read_jsonl(spec["prompts"])
    extra, tool_kw = {"reward_funcs": arithmetic}, {}
    if turns:  # TRL parses tool calls only in chat templates it ships: its Qwen2.5 one renders the tool's schema
        from transformers import AutoTokenizer
        from trl.chat_template_utils import qwen2_5_chat_template
        extra |= {"tools": [calculator], "processing_class": AutoTokenizer.from_pretrained(spec["model"])}
        extra["processing_class"].chat_template = qwen2_5_chat_template
        rows = [r | {"prompt": r["prompt"][-1:]} for r in rows]  # the question alone (ours' system message: its format)
        tool_kw = {"max_tool_calling_iterations": turns - 1, "max_completion_length": spec["episode_tokens"],
                   "generation_kwargs": {"max_new_tokens": spec["max_new_tokens"]}}  # per turn; the episode's: above
    # the whole generation batch per device and no accumulation: steps_per_generation = 1, generation_batch_size = bs,
    # each optimizer step sees all bs episodes; num_iterations=mu reuses them for mu steps (ours PPO: 2 epochs x 1)
    config = GRPOConfig(**trl_kwargs(spec, per_device_train_batch_size=bs, gradient_accumulation_steps=1,
                                     num_generations=g, num_iterations=mu, max_steps=mu * n_steps,
                                     max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"],
                                     top_p=1.0, shuffle_dataset=False, bf16=True) | tool_kw)
    if config.generation_batch_size != bs or config.steps_per_generation != 1:
        raise RuntimeError(f"generation_batch_size {config.generation_batch_size}, steps_per_generation "
                           f"{config.steps_per_generation}: expected {bs} and 1")
    state, rounds, autocast = {"in_gen": False}, [], {}

    class TimedGRPOTrainer(GRPOTrainer):  # a round: _generate, _calculate_rewards, the rest (log-probs, advantages)
        def _generate_and_score_completions(self, inputs):
            rounds.append({"at_step": len(state["times"]), "prompts": [x["prompt"][-1]["content"] for x in inputs]})
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync(torch)
            rounds[-1]["total_s"] = time.perf_counter() - t
            return out

        def _generate(self, prompts):
            t, state["in_gen"] = time.perf_counter(), True
            try:
                out = super()._generate(prompts)
            finally:
                state["in_gen"] = False
            sync(torch)  # out[1]: the completion ids, EOS included (and tool results: out[2] marks them 0)
            rounds[-1] |= {"gen_s": time.perf_counter() - t, "episodes": len(out[1]),
                           "gen_tokens": sum(map(len, out[1])) if out[2] is None else sum(map(sum, out[2])),
                           **{k: mean([sum(m.get("role") == role for m in c) for c in out[3]])
                              for k, role in (("turns", "assistant"), ("tool_calls", "tool"))}}
            return out

        def _calculate_rewards(self, *a, **k):
            t = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            rounds[-1]["score_s"] = time.perf_counter() - t
            return out

    def autocast_probes(trainer):  # which forwards run under autocast (the input embedding runs in every forward)
        def probe(name):
            def hook(module, args):
                phase = "generation" if state["in_gen"] else name if not torch.is_grad_enabled() else "training"
                autocast.setdefault(phase, set()).add(torch.is_autocast_enabled(trainer.accelerator.device.type))
            return hook
        for model, name in ((trainer.model, "old-policy log-probs"), (trainer.ref_model, "reference")):
            if model is not None:
                model.get_input_embeddings().register_forward_pre_hook(probe(name))
    trainer, report = time_trl(TimedGRPOTrainer, spec, config, state, rows, check_rows=False, patch=autocast_probes,
                               **extra)
    steps = report["step_s"]
    if [r["at_step"] for r in rounds] != list(range(0, mu * n_steps, mu)) or any(r["episodes"] != bs for r in rounds):
        raise RuntimeError(f"unexpected generation rounds: {[(r['at_step'], r['episodes']) for r in rounds]}")
    iters = [sum(steps[mu * i:mu * (i + 1)]) for i in range(n_steps)]  # the round opening step mu*i and its mu steps
    split = {"generation": [r["gen_s"] for r in rounds], "scoring": [r["score_s"] for r in rounds],
             "logprobs": [r["total_s"] - r["gen_s"] - r["score_s"] for r in rounds],
             "update": [t - r["total_s"] for t, r in zip(iters, rounds)]}
    if config.bf16 and (off := {k: sorted(v) for k, v in autocast.items() if v != {True}}):
        report["notes"].append(f"bf16=True, but autocast was off in these forwards: {off}")
    if (dtype := next(trainer.model.parameters()).dtype) != torch.float32:
        report["notes"].append(f"policy weights are {dtype}")
    return report | {"iter_s": iters, "gen_tokens": [r["gen_tokens"] for r in rounds], "split": split,
                     "prompts": [r["prompts"] for r in rounds], "optimizer_steps_per_iter": mu, "beta": config.beta,
                     "ref_model": trainer.ref_model is not None, "loss_type": config.loss_type,
                     "autocast": {k: sorted(v) for k, v in autocast.items()}, "learning_rate": config.learning_rate,
                     **({k: [r[k] for r in rounds] for k in ("turns", "tool_calls")} if turns else {})}


# ----------------------------------------------------------------------------------------------------------------------
# Online benchmarks' tables (bench_ppo.py, bench_grpo.py)


def describe_iterations(r: dict) -> str:
    return f"iterations {seconds(r['iter_s'])} s; generated tokens {r['gen_tokens']}"


def summarize_iterations(res: dict, warmup: int, batch_size: int) -> dict:
    if "error" in res:
        return res
    timed = res["iter_s"][warmup:]
    return res | timed_stats(timed) | {"episodes_per_s": batch_size / statistics.median(timed),
                                       "gen_tokens_mean": mean(res["gen_tokens"][warmup:]),
                                       "split_median": {k: statistics.median(v[warmup:])
                                                        for k, v in res["split"].items()}}


def sampling_line(meta: dict) -> str:
    return (f"- sampling: temperature {meta['temperature']}, top_p 1, top_k off, at most {meta['max_new_tokens']} new "
            f"tokens (ours `--max-new-tokens`, TRL `max_completion_length`), stopping at EOS; generated tokens per "
            f"iteration measured (EOS included)")


def iteration_table(results: dict, runs: list[str], configs: dict) -> list[str]:
    """The per-run table of an online benchmark and the generated tokens of every iteration."""
    rows = []
    for k in runs:
        r, label = results[k], configs[config_name(k)]["label"]
        rows.append(failed(r, k, label) if "error" in r else
                    [k, label, med_range(r), f"{r['episodes_per_s']:.2f}", f"{r['gen_tokens_mean']:.0f}",
                     *(f"{r['split_median'][x]:.2f}" for x in SPLIT_KEYS), gb(r["train_peak_rss"]),
                     gb(r["process_peak_rss"]), f"{r['load_before']} -> {r['load_after']}"])
    L = table(["run", "configuration", "s/iteration (median [min-max])", "episodes/s", "generated tokens/iteration",
               "generation s", "scoring s", "log-probs s", "update s", "peak RSS train GB", "peak RSS process GB",
               "load before -> after"], rows)
    return L + ["\nGenerated tokens per iteration (all, warm-up first): " + "; ".join(
        f"{k}: {results[k]['gen_tokens']}" for k in runs if "error" not in results[k]) + "."]


def split_runs(results: dict, runs: list[str], configs: dict) -> tuple[list[str], list[str]]:
    """-> (the finished runs of ours, of TRL)."""
    ok = [k for k in runs if "error" not in results[k]]
    return tuple([k for k in ok if configs[config_name(k)]["side"] == side] for side in ("ours", "trl"))


def trl_grpo_note(k: str, r: dict) -> str:
    return (f"{k}: gradient_checkpointing={r['gradient_checkpointing']}, beta={r['beta']} (reference model "
            f"{'loaded' if r['ref_model'] else 'not loaded'}), loss_type={r['loss_type']}, optim={r['optim']}, lr "
            f"{r['learning_rate']:g}")


def same_prompts_line(results: dict, ours_runs: list[str], trl_runs: list[str]) -> str:
    if diff := [(o, t) for o in ours_runs for t in trl_runs if results[o]["prompts"] != results[t]["prompts"]]:
        return "\nWarning: the episode prompts differ between " + ", ".join(f"{o}/{t}" for o, t in diff) + "."
    return "\nThe episode prompts of every iteration are identical, in the same order, on both sides."


def online_ratios(results: dict, ours_runs: list[str], trl_runs: list[str], warmup: int):
    """Per ours configuration (the timed iterations of all its runs pooled) and TRL run: a dict of the ratios."""
    for o in dict.fromkeys(config_name(k) for k in ours_runs):  # each ours configuration once, in run order
        mine = [k for k in ours_runs if config_name(k) == o]
        pooled = statistics.median([x for k in mine for x in results[k]["iter_s"][warmup:]])
        train = [results[k]["train_peak_rss"] for k in mine]
        proc = max(results[k]["process_peak_rss"] for k in mine)
        for t in trl_runs:
            rt = results[t]
            rss = max(train) / rt["train_peak_rss"] if all(train) and rt["train_peak_rss"] else None
            yield {"ours": o, "trl": t, "pooled": pooled, "trl_s": rt["median_s"], "speedup": rt["median_s"] / pooled,
                   "per_run": ", ".join(f"{rt['median_s'] / results[k]['median_s']:.2f}" for k in mine),
                   "rss": "n/a" if rss is None else f"{rss:.2f}", "proc": f"{proc / rt['process_peak_rss']:.2f}",
                   "rss_ok": "n/a" if rss is None else "met" if rss <= 1 else "NOT met"}
