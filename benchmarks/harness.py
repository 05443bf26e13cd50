"""What the benchmarks share: one fresh worker process per configuration (ours or TRL) and its protocol, memory probes,
the matmul peak, machine metadata, row selection, samplers, the common flags, and the TRL GRPOTrainer worker that
bench_ppo.py and bench_grpo.py both run against.

Standard library only at module level: the TRL venv imports this file too and needs neither tyro nor this repo's
requirements; torch, transformers and the repo's modules are imported inside the functions that use them.
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


def repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------------------------------
# Memory and time probes (Linux): VmHWM is reset by writing 5 to /proc/self/clear_refs, so the training phase's own
# peak is measured apart from model loading and any reference precompute.


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


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_report(torch, reset_ok: bool) -> dict:
    """What every worker returns about its process: 'train' peak RSS (VmHWM since reset_peak_rss), the process's
    ru_maxrss, the CUDA allocator's peak, torch's threads and version."""
    return {"train_peak_rss": vm_hwm_bytes() if reset_ok else None, "process_peak_rss": process_peak_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def timed_steps(trainer, n_steps: int, torch, before_step=None) -> tuple[list[float], list, bool]:
    """Reset the peak RSS, then time n_steps calls of our trainer.training_step() (device synced). -> (seconds,
    StepOutputs, whether the reset worked)."""
    reset_ok = reset_peak_rss()
    times, outs = [], []
    for _ in range(n_steps):
        t = time.perf_counter()
        outs.append(trainer.training_step())
        sync(torch)
        times.append(time.perf_counter() - t)
    return times, outs, reset_ok


def build_ours(trainer_cls, args, num_rows: int):
    """Our trainer and its setup seconds; it must hold exactly the rows (prompts) the parent wrote."""
    t0 = time.perf_counter()
    trainer = trainer_cls(args)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_data) != num_rows:
        raise RuntimeError(f"ours has {len(trainer.train_data)} training rows, the parent wrote {num_rows}")
    return trainer, setup_s


def on_batch(trainer, record) -> None:
    """Call record(batch) on every micro-batch our trainer makes from now on."""
    make_batch = trainer.make_batch

    def recording(examples):
        b = make_batch(examples)
        record(b)
        return b
    trainer.make_batch = recording


def matmul_peak(seconds: float = 2.0, dtypes: tuple[str, ...] = ("bf16", "fp32"), reps: int = 3) -> dict[str, float]:
    """Best GFLOP/s of a square torch.mm loop per dtype, over a few sizes: the machine's practical matmul peak."""
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name in dtypes:
        dtype, best = {"bf16": torch.bfloat16, "fp32": torch.float32}[name], 0.0
        for n in ((4096, 8192) if dev == "cuda" else (1024, 2048)):  # a GPU needs big products to reach its peak
            a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
            c = torch.empty(n, n, dtype=dtype, device=dev)
            torch.mm(a, b, out=c)  # warm-up
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


def gb(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def ratio(a, b, fmt: str = ".2f") -> str:
    """a / b, or 'n/a' where either is missing (a peak RSS this machine cannot reset)."""
    return f"{a / b:{fmt}}" if a and b else "n/a"


def finished(results: dict, *names: str) -> bool:
    return all(n in results and "error" not in results[n] for n in names)


def timed_stats(timed: list[float]) -> dict:
    return {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed)}


# ----------------------------------------------------------------------------------------------------------------------
# Rows and samplers


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def select_rows(data: Path, model_dir: str, k: int, max_length: int, pairs_fit: bool = False) -> tuple[list[dict], int]:
    """The first k rows of the file whose prompt is shorter than max_length (TRL drops longer ones; so does ours with
    --max-prompt-length = --max-length), so both sides train on exactly these rows. pairs_fit: instead the rows whose
    prompt + chosen and prompt + rejected (+ EOS) fit in max_length, tokenized both ours' way (prompt and completion
    apart) and TRL's (the joined string): TRL's RewardTrainer drops longer pairs (it never truncates). -> (rows,
    rows skipped before the k-th)."""
    repo_on_path()
    from transformers import AutoTokenizer

    from packing import encode_completion, encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, skipped = [], 0
    for row in read_jsonl(data):
        prompt = encode_prompt(tok, row["prompt"])
        if pairs_fit:
            fits = all(len(prompt) + len(encode_completion(tok, row[c])) <= max_length
                       and len(tok(row["prompt"] + row[c] + tok.eos_token)["input_ids"]) <= max_length
                       for c in ("chosen", "rejected"))
        else:
            fits = len(prompt) < max_length
        if not fits:
            skipped += 1
            continue
        rows.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
        if len(rows) == k:
            break
    if len(rows) < k:
        why = f"pairs fit in {max_length} tokens" if pairs_fit else "usable rows"
        raise SystemExit(f"{data}: only {len(rows)} {why}, need {k}")
    return rows, skipped


class SequentialSampler:
    """The rows in file order, like TRL's train_sampling_strategy="sequential" (swapped into our trainers)."""

    def __init__(self, n: int, bs: int):
        self.n, self.bs, self.consumed = n, bs, 0

    def next_indices(self, all_ranks: bool = False) -> list[int]:  # one process: all ranks' rows are its own
        idx = [(self.consumed + i) % self.n for i in range(self.bs)]
        self.consumed += self.bs
        return idx


class ListSampler:
    """Given row indices, one list per step (the prompts of TRL's iterations, the rows of its packed steps)."""

    def __init__(self, steps: list[list[int]]):
        self.steps, self.consumed, self.i = steps, 0, 0

    def next_indices(self) -> list[int]:
        idx = self.steps[self.i]
        self.i, self.consumed = self.i + 1, self.consumed + len(idx)
        return idx


# ----------------------------------------------------------------------------------------------------------------------
# The driver: flags, configurations, one worker process each, machine metadata, the results file


def bench_parser(doc: str, *, output: str, configs: dict, default_order: list[str], warmup: int, timed: int,
                 timeout: int, data: bool = False, repeats: bool = False,
                 unit: str = "steps") -> argparse.ArgumentParser:
    """The flags every ours-vs-TRL benchmark takes; the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python",
                   help="interpreter of the venv where TRL is installed (benchmarks/requirements-trl.txt)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    if data:
        p.add_argument("--data", default=HH_DATA, help="preference rows (.jsonl); a relative path is taken from the "
                       "repo root")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--warmup-steps", type=int, default=warmup, help=f"untimed {unit} first")
    p.add_argument("--timed-steps", type=int, default=timed, help=f"timed {unit} (median reported)")
    p.add_argument("--configs", default=",".join(default_order), help=f"comma-separated, run in this order"
                   f"{' (repeats allowed)' if repeats else ''}; known: {', '.join(configs)}")
    p.add_argument("--timeout", type=int, default=timeout, help="seconds per configuration")
    p.add_argument("--output", default=str(REPO / "benchmarks" / output), help="markdown results file")
    p.add_argument("--workdir", default=None, help="scratch dir for logs, rows and raw numbers (default: a new /tmp "
                   "dir)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def run_as_worker(a, worker_ours, worker_trl) -> bool:
    """In a worker process (--worker): run the side's worker on --spec, write its result to --result."""
    if not a.worker:
        return False
    res = (worker_ours if a.worker == "ours" else worker_trl)(json.loads(Path(a.spec).read_text()))
    Path(a.result).write_text(json.dumps(res))
    return True


def config_name(run: str) -> str:
    """The configuration of a run key: 'ours#2' (the second run of 'ours') -> 'ours'."""
    return run.split("#")[0]


def parse_runs(a, configs: dict, groups: dict | None = None, repeats: bool = False) -> list[str]:
    """--configs -> run keys in order: a group name expands to its configurations; with repeats, the k-th run of a
    configuration is keyed 'name#k'. Unknown names and a missing TRL interpreter are errors."""
    order = [n for c in a.configs.split(",") if c.strip() for n in (groups or {}).get(c.strip(), [c.strip()])]
    unknown = [c for c in order if c not in configs]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {list(configs)}")
    if any(configs[c]["side"] == "trl" for c in order) and not Path(a.trl_python).exists():
        raise SystemExit(f"--trl-python {a.trl_python}: not found. Create the venv: python3 -m venv /tmp/trl-venv && "
                         f"/tmp/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt")
    if not repeats:
        return order
    return [c if order[:i].count(c) == 0 else f"{c}#{order[:i].count(c) + 1}" for i, c in enumerate(order)]


def workdir(path: str | None, prefix: str) -> Path:
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def data_path(data: str) -> Path:
    return Path(data) if Path(data).is_absolute() else (REPO / data).resolve()


def default_model(model: str | None) -> str:
    repo_on_path()
    from common import bundled_model_dir
    return model or str(bundled_model_dir())


def machine_meta() -> dict:
    import torch
    import transformers
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_start": loadavg()}


def machine_line(meta: dict) -> str:
    return (f"- machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['threads']}; torch {meta['torch']} "
            f"(ours), {meta.get('trl_torch', '?')} (TRL venv), transformers {meta['transformers']} (ours) / "
            f"{meta.get('trl_transformers', '?')} (TRL)")


def steps_line(meta: dict) -> str:
    return (f"- steps: {meta['warmup']} warm-up + {meta['timed']} timed optimizer steps per configuration, each "
            f"configuration in a fresh process, ours and TRL alternating; s/step = median of the timed steps "
            f"[min-max]")


def load_line(meta: dict) -> str:
    return (f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}. Other "
            f"processes may have been running on the same cores.\n")


def run_logged(cmd: list[str], log: Path, timeout: float | None, env: dict | None = None) -> tuple[int, float]:
    """Run cmd from the repo root, its output in log, in its own process group so that a timeout ends its children
    too (torchrun's ranks, data loaders). -> (exit code, 124 on a timeout; wall seconds)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env or os.environ.copy(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    return rc, time.perf_counter() - t


def run_worker(script: str, side: str, name: str, spec: dict, work: Path, python: str, timeout: int) -> dict:
    """Run one configuration in a fresh process, `python script --worker side`, its output in work/name.log. -> the
    worker's result plus wall time, load average before and after and the log's path, or an 'error'."""
    spec_file, result_file, log_file = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec | {"name": name, "output_dir": str(work / f"out-{name}")}))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [python, str(Path(script).resolve()), "--worker", side, "--spec", str(spec_file), "--result",
           str(result_file)]
    load_before = loadavg()
    rc, wall = run_logged(cmd, log_file, timeout, env)
    res = {"name": name, "wall_s": wall, "load_before": load_before, "load_after": loadavg(), "log": str(log_file)}
    if rc == 0 and result_file.exists():
        return res | json.loads(result_file.read_text())
    lines = log_file.read_text(errors="replace").strip().splitlines()[1:]  # after the command line
    return res | {"error": f"{'timeout' if rc == 124 else f'exit {rc}'}: {lines[-1] if lines else '(no output)'}"}


def run_all(a, script: str, runs: list[str], configs: dict, work: Path, meta: dict, spec_of, describe,
            raw: dict | None = None) -> dict:
    """Each run in turn: spec_of(name, cfg) -> the worker's spec (or a reason to skip it), describe(result) -> its
    progress line. Notes the TRL side's versions in meta. -> raw (run key -> result), filled as the runs finish."""
    raw = {} if raw is None else raw
    for name in runs:
        cfg = configs[config_name(name)]
        print(f"[{name}] {cfg['label']} ...", flush=True)
        spec = spec_of(name, cfg)
        if isinstance(spec, str):
            raw[name] = {"name": name, "error": spec}
            print(f"[{name}] skipped: {spec}", flush=True)
            continue
        python = a.ours_python if cfg["side"] == "ours" else a.trl_python
        raw[name] = r = run_worker(script, cfg["side"], name, spec, work, python, a.timeout)
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


def trl_setup():
    """Quiet progress bars; -> torch (for the probes)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import torch
    datasets.disable_progress_bars()
    return torch


def trl_kwargs(spec: dict, torch, **kw) -> dict:
    """TrainingArguments both sides' settings need on TRL's: no reports, checkpoints or bars, seed 1; bf16 on CPU
    needs use_cpu (else an error)."""
    return dict(output_dir=spec["output_dir"], report_to="none", save_strategy="no", disable_tqdm=True, seed=1,
                use_cpu=not torch.cuda.is_available(), **kw) | spec["trl_kwargs"]


def trl_report(config, torch, reset_ok: bool, notes: list[str], **extra) -> dict:
    import transformers
    import trl
    return memory_report(torch, reset_ok) | {
        "notes": notes, "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "gradient_checkpointing": config.gradient_checkpointing,
        "optim": getattr(config.optim, "value", str(config.optim))} | extra


def trl_step_timer(state: dict, torch):
    """A TrainerCallback: one optimizer step = the time between consecutive on_step_end calls (data, forward,
    backward, clip, AdamW, scheduler, and the trainer's own bookkeeping); the first interval starts at
    on_train_begin, where the peak RSS is reset. Appends to state["times"], sets state["reset_ok"]."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["reset_ok"] = reset_peak_rss()
            state["t_prev"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            sync(torch)
            now = time.perf_counter()
            state["times"].append(now - state["t_prev"])
            state["t_prev"] = now
    state.setdefault("times", [])
    return StepTimer()


def worker_ours_grpo(spec: dict) -> dict:
    """Our grpo.py on the built-in arithmetic prompts, iteration s on prompts spec["ours_steps"][s]: per iteration
    the seconds, where they went (the step's own time/* metrics), the generated tokens and the episode prompts."""
    repo_on_path()
    import torch

    import grpo

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    g = spec["num_generations"]
    kwargs = dict(model=spec["model"], dataset="arithmetic", output_dir=spec["output_dir"], total_steps=n_steps,
                  batch_size=spec["batch_size"] // g, num_generations=g, max_new_tokens=spec["max_new_tokens"],
                  temperature=spec["temperature"], top_p=1.0, loss_type=grpo.LossType.dapo, beta=0.0,
                  num_iterations=spec["num_iterations"], gradient_accumulation_steps=1, precision="bf16", seed=1,
                  log_every=10 ** 9, eval_every=0)
    args = grpo.Args(**kwargs | spec["ours_kwargs"])
    trainer, setup_s = build_ours(grpo.GRPOTrainer, args, spec["num_task_prompts"])
    trainer.sampler = ListSampler(spec["ours_steps"])  # indices into the built-in prompts, per iteration
    notes = []
    dtype = next(trainer.model.parameters()).dtype
    if dtype != torch.float32:
        notes.append(f"policy weights are {dtype}")
    # grpo.py repeats each prompt G times, groups contiguous (as TRL)
    prompts = [[trainer.train_data[j]["prompt"][-1]["content"] for j in step for _ in range(g)]
               for step in spec["ours_steps"]]
    times, outs, reset_ok = timed_steps(trainer, n_steps, torch)
    if any(o.num_samples != spec["batch_size"] for o in outs):
        raise RuntimeError(f"ours ran {[o.num_samples for o in outs]} episodes, expected {spec['batch_size']}")
    return memory_report(torch, reset_ok) | {
        "iter_s": times, "gen_tokens": [round(o.metrics["completions/mean_length"] * o.num_samples) for o in outs],
        "split": {k: [o.metrics[f"time/{k}"] for o in outs] for k in SPLIT_KEYS}, "prompts": prompts,
        "setup_s": setup_s, "optimizer_steps_per_iter": args.num_iterations,
        "rewards": [o.metrics["reward"] for o in outs], "notes": notes, "learning_rate": args.learning_rate,
        "padding_free": args.padding_free, "precision": args.precision}


def worker_trl_grpo(spec: dict) -> dict:
    """TRL's GRPOTrainer on the prompt file: per iteration (one generation round and the num_iterations optimizer
    steps it feeds) the seconds, where they went, the generated tokens and the episode prompts."""
    torch = trl_setup()
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    notes = []
    repo_on_path()
    try:  # the very function ours scores with; tasks.py needs only torch, which this venv has
        from tasks import reward as arithmetic_reward
    except ImportError as e:  # an identical copy (first integer of the reply == answer), and the table says so
        import re
        notes.append(f"tasks.py not importable here ({e}); the reward is a copy of tasks.reward")

        def arithmetic_reward(prompts, completions, answer, **_):
            firsts = [re.search(r"-?\d+", c) for c in completions]
            return [float(m is not None and int(m.group()) == a) for m, a in zip(firsts, answer)]

    def arithmetic(prompts, completions, answer, **_):
        # conversational dataset: each completion is [{"role": "assistant", "content": text}]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return arithmetic_reward(prompts, texts, answer)

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    mu = spec.get("num_iterations", 2)  # optimizer steps per generation round (bench_ppo: 2, bench_grpo: 1)
    bs, g = spec["batch_size"], spec["num_generations"]
    # per_device_train_batch_size = the whole generation batch and no accumulation: steps_per_generation defaults to
    # gradient_accumulation_steps = 1, so generation_batch_size = bs and each optimizer step sees all bs episodes;
    # num_iterations=mu reuses the batch for mu optimizer steps (ours PPO: ppo_epochs 2 x num_minibatches 1)
    config = GRPOConfig(**trl_kwargs(spec, torch, per_device_train_batch_size=bs, gradient_accumulation_steps=1,
                                     num_generations=g, num_iterations=mu, max_steps=mu * n_steps,
                                     max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"],
                                     top_p=1.0, shuffle_dataset=False, bf16=True))
    if config.generation_batch_size != bs or config.steps_per_generation != 1:
        raise RuntimeError(f"generation_batch_size {config.generation_batch_size}, steps_per_generation "
                           f"{config.steps_per_generation}: expected {bs} and 1")
    state = {"rounds": [], "in_gen": False, "autocast": {}}

    class TimedGRPOTrainer(GRPOTrainer):
        # one generation round = _generate_and_score_completions: _generate (chat template, model.generate, decode),
        # _calculate_rewards, and the rest (old-policy and reference log-probs, advantages, TRL's metrics)
        def _generate_and_score_completions(self, inputs):
            r = {"at_step": len(state["times"]), "prompts": [x["prompt"][-1]["content"] for x in inputs]}
            state["rounds"].append(r)
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync(torch)
            r["total_s"] = time.perf_counter() - t
            return out

        def _generate(self, prompts):
            t = time.perf_counter()
            state["in_gen"] = True
            try:
                out = super()._generate(prompts)
            finally:
                state["in_gen"] = False
            sync(torch)
            state["rounds"][-1]["gen_s"] = time.perf_counter() - t
            state["rounds"][-1]["gen_tokens"] = sum(len(ids) for ids in out[1])  # completion ids, EOS included
            state["rounds"][-1]["episodes"] = len(out[1])
            return out

        def _calculate_rewards(self, *a, **k):
            t = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            state["rounds"][-1]["score_s"] = time.perf_counter() - t
            return out

    t0 = time.perf_counter()
    trainer = TimedGRPOTrainer(model=spec["model"], reward_funcs=arithmetic, args=config,
                               train_dataset=datasets.Dataset.from_list(read_jsonl(spec["prompts"])),
                               processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                               callbacks=[trl_step_timer(state, torch)])
    setup_s = time.perf_counter() - t0
    dev = trainer.accelerator.device.type

    # is each kind of forward computed under autocast? (the input embedding runs in every forward; TRL's log-prob
    # forwards never call the LM head module: a fused head projects only the completion positions)
    def note_autocast(name):
        def hook(module, args):
            phase = "generation" if state["in_gen"] else name if not torch.is_grad_enabled() else "training"
            state["autocast"].setdefault(phase, set()).add(torch.is_autocast_enabled(dev))
        return hook
    trainer.model.get_input_embeddings().register_forward_pre_hook(note_autocast("old-policy log-probs"))
    if trainer.ref_model is not None:
        trainer.ref_model.get_input_embeddings().register_forward_pre_hook(note_autocast("reference"))
    trainer.train()
    rounds, steps = state["rounds"], state["times"]
    if len(steps) != mu * n_steps or len(rounds) != n_steps:
        raise RuntimeError(f"TRL ran {len(steps)} optimizer steps / {len(rounds)} generations, expected "
                           f"{mu * n_steps} / {n_steps}")
    if [r["at_step"] for r in rounds] != list(range(0, mu * n_steps, mu)) or any(r["episodes"] != bs for r in rounds):
        raise RuntimeError(f"unexpected generation rounds: {[(r['at_step'], r['episodes']) for r in rounds]}")
    # iteration i = optimizer steps mu*i .. mu*i+mu-1: the generation round that opens step mu*i and all mu updates
    iters = [sum(steps[mu * i:mu * (i + 1)]) for i in range(n_steps)]
    split = {"generation": [r["gen_s"] for r in rounds], "scoring": [r["score_s"] for r in rounds],
             "logprobs": [r["total_s"] - r["gen_s"] - r["score_s"] for r in rounds],
             "update": [t - r["total_s"] for t, r in zip(iters, rounds)]}
    if config.bf16:
        off = {k: sorted(v) for k, v in state["autocast"].items() if v != {True}}
        if off:
            notes.append(f"bf16=True, but autocast was off in these forwards: {off}")
    dtype = next(trainer.model.parameters()).dtype
    if dtype != torch.float32:
        notes.append(f"policy weights are {dtype}")
    return trl_report(config, torch, state["reset_ok"], notes, iter_s=iters, step_s=steps,
                      gen_tokens=[r["gen_tokens"] for r in rounds], split=split,
                      prompts=[r["prompts"] for r in rounds], setup_s=setup_s, optimizer_steps_per_iter=mu,
                      beta=config.beta, ref_model=trainer.ref_model is not None, loss_type=config.loss_type,
                      autocast={k: sorted(v) for k, v in state["autocast"].items()},
                      learning_rate=config.learning_rate)


# ----------------------------------------------------------------------------------------------------------------------
# Online benchmarks (bench_ppo.py, bench_grpo.py): iterations of generation, scoring, log-probs and updates

SPLIT_KEYS = ("generation", "scoring", "logprobs", "update")


def prompt_tokens(model_dir: str, rows: list[dict]) -> str:
    """The prompts' lengths in tokens after the chat template: '44', or '40-48'."""
    repo_on_path()
    from transformers import AutoTokenizer

    from packing import encode_prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted({len(encode_prompt(tok, r["prompt"])) for r in rows})
    return f"{lengths[0]}" + (f"-{lengths[-1]}" if lengths[-1] != lengths[0] else "")


def describe_iterations(r: dict) -> str:
    return f"iterations {' '.join(f'{s:.2f}' for s in r['iter_s'])} s; generated tokens {r['gen_tokens']}"


def summarize_iterations(res: dict, warmup: int, batch_size: int) -> dict:
    if "error" in res:
        return res
    timed, toks = res["iter_s"][warmup:], res["gen_tokens"][warmup:]
    return res | timed_stats(timed) | {"episodes_per_s": batch_size / statistics.median(timed),
                  "gen_tokens_mean": sum(toks) / len(toks),
                  "split_median": {k: statistics.median(v[warmup:]) for k, v in res["split"].items()}}


def sampling_line(meta: dict) -> str:
    return (f"- sampling: temperature {meta['temperature']}, top_p 1, top_k off, at most {meta['max_new_tokens']} new "
            f"tokens (ours `--max-new-tokens`, TRL `max_completion_length`), stopping at EOS; the generated tokens "
            f"per iteration are measured (EOS included) and shown")


def iteration_table(results: dict, runs: list[str], configs: dict) -> list[str]:
    """The per-run table of an online benchmark and the generated tokens of every iteration."""
    L = ["| run | configuration | s/iteration (median [min-max]) | episodes/s | generated tokens/iteration "
         "| generation s | scoring s | log-probs s | update s | peak RSS train GB | peak RSS process GB "
         "| load before -> after |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in runs:
        r, cfg = results[k], configs[config_name(k)]
        if "error" in r:
            L.append(f"| {k} | {cfg['label']} | failed: {r['error']} | | | | | | | | | |")
            continue
        s = r["split_median"]
        L.append(f"| {k} | {cfg['label']} | {r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | "
                 f"{r['episodes_per_s']:.2f} | {r['gen_tokens_mean']:.0f} | "
                 + " | ".join(f"{s[x]:.2f}" for x in SPLIT_KEYS)
                 + f" | {gb(r['train_peak_rss'])} | {gb(r['process_peak_rss'])} | {r['load_before']} -> "
                   f"{r['load_after']} |")
    L.append("\nGenerated tokens per iteration (all, warm-up first): "
             + "; ".join(f"{k}: {results[k]['gen_tokens']}" for k in runs if "error" not in results[k]) + ".")
    return L


def rss_and_load_lines(meta: dict) -> list[str]:
    return ["- peak RSS: 'train' = VmHWM of the worker reset just before the first iteration; 'process' = ru_maxrss "
            "over the process's life (imports, loading, training)", load_line(meta)]


def split_runs(results: dict, runs: list[str], configs: dict) -> tuple[list[str], list[str], list[str]]:
    """-> (the runs that finished, those of ours, those of TRL)."""
    ok = [k for k in runs if "error" not in results[k]]
    return ok, *([k for k in ok if configs[config_name(k)]["side"] == side] for side in ("ours", "trl"))


def trl_note(k: str, r: dict) -> str:
    return (f"{k}: gradient_checkpointing={r['gradient_checkpointing']}, beta={r['beta']} (reference model "
            f"{'loaded' if r['ref_model'] else 'not loaded'}), loss_type={r['loss_type']}, optim={r['optim']}, lr "
            f"{r['learning_rate']:g}")


def same_prompts_line(results: dict, ours_runs: list[str], trl_runs: list[str]) -> str:
    diff = [(o, t) for o in ours_runs for t in trl_runs if results[o]["prompts"] != results[t]["prompts"]]
    if diff:
        return "\nWarning: the episode prompts differ between " + ", ".join(f"{o}/{t}" for o, t in diff) + "."
    return "\nThe episode prompts of every iteration are identical, in the same order, on both sides."


def pooled_ours(results: dict, mine: list[str], warmup: int) -> tuple[float, list, int]:
    """The runs of one ours configuration: (median of all their timed iterations, each run's train peak RSS, the
    largest process peak RSS)."""
    pooled = statistics.median([x for k in mine for x in results[k]["iter_s"][warmup:]])
    return pooled, [results[k]["train_peak_rss"] for k in mine], max(results[k]["process_peak_rss"] for k in mine)
