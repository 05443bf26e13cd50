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
from bench_dpo import _sync, gb, loadavg, process_peak_bytes, reset_peak_rss, vm_hwm_bytes

REPO = Path(__file__).resolve().parent.parent
SPLIT_KEYS = ("generation", "scoring", "logprobs", "update")

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
# Workers


def worker_ours(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    import ppo

    class ListSampler:  # the parent's episode prompts (indices into the prompt file), one list per iteration
        def __init__(self, steps: list[list[int]]):
            self.steps, self.consumed = steps, 0

        def next_indices(self) -> list[int]:
            idx = self.steps[self.consumed // len(self.steps[0])]
            self.consumed += len(idx)
            return idx

    n_steps = spec["warmup_steps"] + spec["timed_steps"]
    kwargs = dict(model=spec["model"], dataset=spec["prompts"], eval_dataset=spec["eval_prompts"],
                  reward_fn="tasks:reward", output_dir=spec["output_dir"], total_steps=n_steps,
                  batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"],
                  temperature=spec["temperature"], top_p=1.0, ppo_epochs=2, num_minibatches=1,
                  gradient_accumulation_steps=1, precision="bf16", seed=1, log_every=10 ** 9, eval_every=0)
    kwargs.update(spec["ours_kwargs"])
    args = ppo.Args(**kwargs)
    t0 = time.perf_counter()
    trainer = ppo.PPOTrainer(args)
    setup_s = time.perf_counter() - t0
    if len(trainer.train_data) != spec["num_prompts"]:
        raise RuntimeError(f"ours kept {len(trainer.train_data)} of {spec['num_prompts']} prompts")
    trainer.sampler = ListSampler(spec["ours_steps"])
    reset_ok = reset_peak_rss()
    times, gen_tokens, split, prompts = [], [], {k: [] for k in SPLIT_KEYS}, []
    for i in range(n_steps):
        prompts.append([trainer.train_data[j]["prompt"][-1]["content"] for j in spec["ours_steps"][i]])
        t = time.perf_counter()
        out = trainer.training_step()
        _sync(torch)
        times.append(time.perf_counter() - t)
        m = out.metrics
        gen_tokens.append(round(m["response_length"] * out.num_samples))  # per-episode mean x episodes (incl. EOS)
        for k, key in zip(SPLIT_KEYS, ("time/generation", "time/scoring", "time/logprobs_values", "time/update")):
            split[k].append(m[key])
    return {"iter_s": times, "gen_tokens": gen_tokens, "split": split, "prompts": prompts, "setup_s": setup_s,
            "optimizer_steps_per_iter": args.ppo_epochs * args.num_minibatches,
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
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    notes = []
    sys.path.insert(0, str(REPO))
    try:  # the very function ours scores with; common.py needs only torch, which this venv has
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
    mu = spec.get("num_iterations", 2)  # optimizer steps per generation round (bench_grpo.py: 1)
    with open(spec["prompts"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ds = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    bs, g = spec["batch_size"], spec["num_generations"]
    # per_device_train_batch_size = the whole generation batch and no accumulation: steps_per_generation defaults to
    # gradient_accumulation_steps = 1, so generation_batch_size = bs and each optimizer step sees all bs episodes;
    # num_iterations=mu reuses the batch for mu optimizer steps (ours: ppo_epochs 2 x num_minibatches 1)
    kwargs = dict(output_dir=spec["output_dir"], per_device_train_batch_size=bs, gradient_accumulation_steps=1,
                  num_generations=g, num_iterations=mu, max_steps=mu * n_steps,
                  max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0,
                  shuffle_dataset=False, bf16=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=1,
                  use_cpu=not torch.cuda.is_available())  # bf16 on CPU needs use_cpu (else an error)
    kwargs.update(spec["trl_kwargs"])
    config = GRPOConfig(**kwargs)
    if config.generation_batch_size != bs or config.steps_per_generation != 1:
        raise RuntimeError(f"generation_batch_size {config.generation_batch_size}, steps_per_generation "
                           f"{config.steps_per_generation}: expected {bs} and 1")
    state = {"times": [], "reset_ok": False, "t_prev": None, "rounds": [], "in_gen": False, "autocast": {}}

    class TimedGRPOTrainer(GRPOTrainer):
        # one generation round = _generate_and_score_completions: _generate (chat template, model.generate, decode),
        # _calculate_rewards, and the rest (old-policy and reference log-probs, advantages, TRL's metrics)
        def _generate_and_score_completions(self, inputs):
            r = {"at_step": len(state["times"]), "prompts": [x["prompt"][-1]["content"] for x in inputs]}
            state["rounds"].append(r)
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            _sync(torch)
            r["total_s"] = time.perf_counter() - t
            return out

        def _generate(self, prompts):
            t = time.perf_counter()
            state["in_gen"] = True
            try:
                out = super()._generate(prompts)
            finally:
                state["in_gen"] = False
            _sync(torch)
            state["rounds"][-1]["gen_s"] = time.perf_counter() - t
            state["rounds"][-1]["gen_tokens"] = sum(len(ids) for ids in out[1])  # completion ids, EOS included
            state["rounds"][-1]["episodes"] = len(out[1])
            return out

        def _calculate_rewards(self, *a, **k):
            t = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            state["rounds"][-1]["score_s"] = time.perf_counter() - t
            return out

    class StepTimer(TrainerCallback):
        # one optimizer step = the time between consecutive on_step_end calls; the first starts at on_train_begin
        def on_train_begin(self, args, st, control, **kw):
            state["reset_ok"] = reset_peak_rss()
            state["t_prev"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(torch)
            now = time.perf_counter()
            state["times"].append(now - state["t_prev"])
            state["t_prev"] = now

    t0 = time.perf_counter()
    trainer = TimedGRPOTrainer(model=spec["model"], reward_funcs=arithmetic, args=config, train_dataset=ds,
                               processing_class=tok, callbacks=[StepTimer()])
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
    hwm = vm_hwm_bytes() if state["reset_ok"] else None
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
    return {"iter_s": iters, "step_s": steps, "gen_tokens": [r["gen_tokens"] for r in rounds], "split": split,
            "prompts": [r["prompts"] for r in rounds], "setup_s": setup_s, "optimizer_steps_per_iter": mu,
            "train_peak_rss": hwm, "process_peak_rss": process_peak_bytes(),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "notes": notes,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "gradient_checkpointing": config.gradient_checkpointing, "beta": config.beta,
            "ref_model": trainer.ref_model is not None, "loss_type": config.loss_type,
            "autocast": {k: sorted(v) for k, v in state["autocast"].items()},
            "optim": getattr(config.optim, "value", str(config.optim)), "learning_rate": config.learning_rate}


# ----------------------------------------------------------------------------------------------------------------------
# Parent


def base(run: str) -> str:
    """The configuration of a run key: 'ours#2' (the second run of 'ours') -> 'ours'."""
    return run.split("#")[0]


def run_config(name: str, cfg: dict, base_spec: dict, work: Path, python: str, timeout: int,
               script: Path | None = None) -> dict:
    """Run one configuration as `python script --worker SIDE` (script: this file unless another bench reuses it)."""
    spec = dict(base_spec, name=name, ours_kwargs=cfg.get("ours_kwargs", {}), trl_kwargs=cfg.get("trl_kwargs", {}),
                output_dir=str(work / f"out-{name}"))
    spec_file, result_file, log_file = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [python, str(Path(script or __file__).resolve()), "--worker", cfg["side"], "--spec", str(spec_file),
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


def summarize(res: dict, warmup: int, batch_size: int) -> dict:
    if "error" in res:
        return res
    timed = res["iter_s"][warmup:]
    med = statistics.median(timed)
    toks = res["gen_tokens"][warmup:]
    return res | {"median_s": med, "min_s": min(timed), "max_s": max(timed), "episodes_per_s": batch_size / med,
                  "gen_tokens_mean": sum(toks) / len(toks),
                  "split_median": {k: statistics.median(v[warmup:]) for k, v in res["split"].items()}}


def render(results: dict, runs: list[str], meta: dict) -> str:
    bs, g = meta["batch_size"], meta["num_generations"]
    L = []
    L.append(f"# PPO benchmark: ours (ppo.py) vs TRL {meta.get('trl_version', '?')} GRPOTrainer\n")
    L.append(f"- machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['threads']}; "
             f"torch {meta['torch']} (ours), {meta.get('trl_torch', '?')} (TRL venv), "
             f"transformers {meta['transformers']} (ours) / {meta.get('trl_transformers', '?')} (TRL)")
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
    L.append(f"- sampling: temperature {meta['temperature']}, top_p 1, top_k off, at most {meta['max_new_tokens']} "
             f"new tokens (ours `--max-new-tokens`, TRL `max_completion_length`), stopping at EOS; the generated "
             f"tokens per iteration are measured (EOS included) and shown")
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
    L.append("- peak RSS: 'train' = VmHWM of the worker reset just before the first iteration; 'process' = "
             "ru_maxrss over the process's life (imports, loading, training)")
    L.append(f"- load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}. Other "
             f"processes may have been running on the same cores.\n")

    L.append("| run | configuration | s/iteration (median [min-max]) | episodes/s | generated tokens/iteration "
             "| generation s | scoring s | log-probs s | update s | peak RSS train GB | peak RSS process GB "
             "| load before -> after |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = [k for k in runs if "error" not in results[k]]
    for k in runs:
        r, cfg = results[k], CONFIGS[base(k)]
        if "error" in r:
            L.append(f"| {k} | {cfg['label']} | failed: {r['error']} | | | | | | | | | |")
            continue
        s = r["split_median"]
        L.append(f"| {k} | {cfg['label']} | {r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}] | "
                 f"{r['episodes_per_s']:.2f} | {r['gen_tokens_mean']:.0f} | " + " | ".join(
                     f"{s[x]:.2f}" for x in SPLIT_KEYS) +
                 f" | {gb(r['train_peak_rss'])} | {gb(r['process_peak_rss'])} | {r['load_before']} -> "
                 f"{r['load_after']} |")
    L.append("\nGenerated tokens per iteration (all, warm-up first): "
             + "; ".join(f"{k}: {results[k]['gen_tokens']}" for k in ok) + ".")
    notes = [f"{k}: {x}" for k in ok for x in results[k].get("notes", [])]
    for k in ok:
        r = results[k]
        if CONFIGS[base(k)]["side"] == "trl":
            notes.append(f"{k}: gradient_checkpointing={r['gradient_checkpointing']}, beta={r['beta']} (reference "
                         f"model {'loaded' if r['ref_model'] else 'not loaded'}), loss_type={r['loss_type']}, "
                         f"optim={r['optim']}, lr {r['learning_rate']:g}")
    L.append("\nNotes: " + ("; ".join(notes) + "." if notes else "none."))
    ours_runs = [k for k in ok if CONFIGS[base(k)]["side"] == "ours"]
    trl_runs = [k for k in ok if CONFIGS[base(k)]["side"] == "trl"]
    if meta["ours_prompts"] == "grouped" and ours_runs and trl_runs:
        diff = [(o, t) for o in ours_runs for t in trl_runs if results[o]["prompts"] != results[t]["prompts"]]
        L.append("\nWarning: the episode prompts differ between " + ", ".join(f"{o}/{t}" for o, t in diff) + "."
                 if diff else "\nThe episode prompts of every iteration are identical, in the same order, on both "
                 "sides.")

    L.append("\n## Ratios ours / TRL (target of the issue: ours >= 2x TRL's episodes/s)\n\nours = the timed "
             "iterations of all runs of that configuration pooled (median); per run in brackets.\n")
    L.append("| ours | TRL | ours s/iteration (pooled) | episodes/s ours/TRL (per ours run) | ours >= 2x TRL "
             "| peak RSS train ours/TRL | peak RSS process ours/TRL |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for o in dict.fromkeys(base(k) for k in ours_runs):  # each ours configuration once, in run order
        mine = [k for k in ours_runs if base(k) == o]
        pooled = statistics.median([x for k in mine for x in results[k]["iter_s"][meta["warmup"]:]])
        train = [results[k]["train_peak_rss"] for k in mine]
        proc = max(results[k]["process_peak_rss"] for k in mine)
        for t in trl_runs:
            rt = results[t]
            ratio = rt["median_s"] / pooled
            per_run = ", ".join(f"{rt['median_s'] / results[k]['median_s']:.2f}" for k in mine)
            tr = f"{max(train) / rt['train_peak_rss']:.2f}" if all(train) and rt["train_peak_rss"] else "n/a"
            L.append(f"| {o} | {t} | {pooled:.2f} | {ratio:.2f}x [{per_run}] | {'met' if ratio >= 2 else 'NOT met'} "
                     f"| {tr} | {proc / rt['process_peak_rss']:.2f} |")
    return "\n".join(L) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python",
                   help="interpreter of the venv where TRL is installed (benchmarks/requirements-trl.txt)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per iteration")
    p.add_argument("--num-generations", type=int, default=8,
                   help="TRL's completions per prompt (GRPOConfig's default; --batch-size must be a multiple)")
    p.add_argument("--ours-prompts", choices=["grouped", "distinct"], default="grouped",
                   help="grouped: ours gets TRL's exact episode prompts (each prompt --num-generations times);\n"
                        "distinct: ours samples --batch-size distinct prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens per episode, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (both sides)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed iterations first")
    p.add_argument("--timed-steps", type=int, default=4, help="timed iterations (median reported)")
    p.add_argument("--configs", default=",".join(DEFAULT_ORDER),
                   help=f"comma-separated, run in this order (repeats allowed); known: {', '.join(CONFIGS)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results_ppo.md"), help="markdown results file")
    p.add_argument("--workdir", default=None, help="scratch dir for logs and prompts (default: a new /tmp dir)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        res = (worker_ours if a.worker == "ours" else worker_trl)(spec)
        Path(a.result).write_text(json.dumps(res))
        return

    order = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in order if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    # a configuration may run more than once (ours between the TRL runs): its k-th run is keyed 'name#k'
    runs = [c if order[:i].count(c) == 0 else f"{c}#{order[:i].count(c) + 1}" for i, c in enumerate(order)]
    if a.num_generations < 2 or a.batch_size % a.num_generations:
        raise SystemExit(f"--num-generations {a.num_generations}: must be >= 2 (GRPO) and divide --batch-size "
                         f"{a.batch_size}")
    if any(CONFIGS[c]["side"] == "trl" for c in order) and not Path(a.trl_python).exists():
        raise SystemExit(f"--trl-python {a.trl_python}: not found. Create the venv: python3 -m venv /tmp/trl-venv && "
                         f"/tmp/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers
    from transformers import AutoTokenizer

    import tasks
    from common import bundled_model_dir, encode_prompt
    model_dir = a.model or str(bundled_model_dir())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_ppo_"))
    work.mkdir(parents=True, exist_ok=True)
    n_steps = a.warmup_steps + a.timed_steps
    per_iter = a.batch_size // a.num_generations  # distinct prompts per TRL iteration
    # ours' trainer refuses a file with fewer rows than one batch (its own sampler, replaced here, needs them)
    n_prompts = max((a.batch_size if a.ours_prompts == "distinct" else per_iter) * n_steps, a.batch_size)
    # the training questions in their fixed order, cycled as often as needed; TRL reads the first per_iter x n_steps
    questions = tasks.questions("arithmetic", held_out=False)
    rows = [{"prompt": tasks.prompt(q), "answer": sum(q)} for q in (questions[i % len(questions)] for i in range(n_prompts))]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "eval_prompts.jsonl").write_text(json.dumps(rows[0]) + "\n")  # ours needs an eval set; never run
    if a.ours_prompts == "grouped":  # TRL's RepeatSampler order: each prompt num_generations times in a row
        ours_steps = [[s * per_iter + j for j in range(per_iter) for _ in range(a.num_generations)]
                      for s in range(n_steps)]
    else:
        ours_steps = [list(range(s * a.batch_size, (s + 1) * a.batch_size)) for s in range(n_steps)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted({len(encode_prompt(tok, r["prompt"])) for r in rows})
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    meta = {"model": model_dir, "batch_size": a.batch_size, "num_generations": a.num_generations,
            "ours_prompts": a.ours_prompts, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
            "warmup": a.warmup_steps, "timed": a.timed_steps, "num_prompts": n_prompts,
            "prompt_tokens": f"{lengths[0]}" + (f"-{lengths[-1]}" if lengths[-1] != lengths[0] else ""), "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_start": loadavg()}
    print(f"work dir {work}; {n_prompts} prompt rows ({len(questions)} distinct questions), {meta['prompt_tokens']} "
          f"tokens each; load {meta['load_start']}", flush=True)
    base_spec = {"model": model_dir, "prompts": str(work / "prompts.jsonl"),
            "eval_prompts": str(work / "eval_prompts.jsonl"), "num_prompts": n_prompts, "ours_steps": ours_steps,
            "batch_size": a.batch_size, "num_generations": a.num_generations, "max_new_tokens": a.max_new_tokens,
            "temperature": a.temperature, "warmup_steps": a.warmup_steps, "timed_steps": a.timed_steps}
    raw = {}
    for name in runs:
        cfg = CONFIGS[base(name)]
        python = a.ours_python if cfg["side"] == "ours" else a.trl_python
        print(f"[{name}] {cfg['label']} ...", flush=True)
        raw[name] = r = run_config(name, cfg, base_spec, work, python, a.timeout)
        if "error" in r:
            print(f"[{name}] FAILED ({r['error']}); log: {r['log']}", flush=True)
        else:
            print(f"[{name}] iterations {' '.join(f'{s:.2f}' for s in r['iter_s'])} s; generated tokens "
                  f"{r['gen_tokens']}; peak RSS train {gb(r['train_peak_rss'])} GB, process "
                  f"{gb(r['process_peak_rss'])} GB; setup {r['setup_s']:.0f} s, wall {r['wall_s']:.0f} s; load "
                  f"{r['load_before']} -> {r['load_after']}", flush=True)
            if "versions" in r:
                meta["trl_version"], meta["trl_transformers"] = r["versions"]["trl"], r["versions"]["transformers"]
                meta["trl_torch"] = r["torch"]
    meta["load_end"] = loadavg()
    results = {name: summarize(raw[name], a.warmup_steps, a.batch_size) for name in runs}
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = render(results, runs, meta)
    print("\n" + text, flush=True)
    Path(a.output).write_text(text)
    print(f"written to {a.output} (raw numbers: {work / 'results.json'})")


if __name__ == "__main__":
    main()
