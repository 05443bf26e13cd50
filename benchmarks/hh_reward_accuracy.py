"""Held-out accuracy of our reward model (reward.py) against TRL's RewardTrainer on real human preferences.

    python benchmarks/hh_reward_accuracy.py --trl-python /tmp/trl-venv/bin/python     # ~30 min on the 2-core CPU

Both sides train the same model (the bundled SmolLM2-135M-Instruct by default) on the same rows of
`../shared/data/hh_harmless_test.jsonl` (Anthropic HH harmless-base, test split) and are scored on the same held-out
pairs: the pairs whose prompt + chosen and prompt + rejected (+ EOS) fit in --max-length tokens (TRL drops longer
ones, so nothing is truncated on either side), the first --train-pairs for training and the next --heldout for eval.
Same batch, steps (one pass over the training pairs), learning rate, linear decay without warm-up, bf16 autocast with
fp32 master weights, seed. Each side reports the accuracy (chosen scored above rejected) on the held-out pairs before
and after training with its own evaluation: ours `eval/accuracy` from metrics.jsonl, TRL `eval_accuracy` from
`trainer.evaluate()`. The sides shuffle the rows with their own samplers, so their orders differ.

Results go to benchmarks/results_hh_reward.md. The TRL worker is this file run in the TRL venv
(benchmarks/requirements-trl.txt, `--worker trl --spec FILE`); it imports nothing from this repo but harness.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import REPO


def worker_trl(spec: dict) -> dict:
    torch = harness.trl_setup()
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer

    load = lambda p: datasets.Dataset.from_list(harness.read_jsonl(p))
    train, heldout = load(spec["train"]), load(spec["heldout"])
    config = trl.RewardConfig(output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"],
                              per_device_eval_batch_size=spec["batch_size"], max_steps=spec["steps"],
                              learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
                              max_length=spec["max_length"], bf16=True, seed=spec["seed"], report_to="none",
                              save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
                              use_cpu=not torch.cuda.is_available())
    trainer = trl.RewardTrainer(model=spec["model"], args=config, train_dataset=train, eval_dataset=heldout,
                                processing_class=AutoTokenizer.from_pretrained(spec["model"]))
    if len(trainer.train_dataset) != len(train) or len(trainer.eval_dataset) != len(heldout):
        raise SystemExit(f"TRL dropped rows: {len(trainer.train_dataset)}/{len(train)}, "
                         f"{len(trainer.eval_dataset)}/{len(heldout)}")
    before = trainer.evaluate()
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    after = trainer.evaluate()
    return {"before": before["eval_accuracy"], "after": after["eval_accuracy"], "eval_loss": after["eval_loss"],
            "train_s": train_s, "trl": trl.__version__, "transformers": transformers.__version__,
            "gradient_checkpointing": config.gradient_checkpointing}


def run_ours(a, work: Path, steps: int) -> dict:
    out = work / "ours"
    cmd = [a.ours_python, str(REPO / "reward.py"), "--model", a.model, "--dataset", str(work / "train.jsonl"),
           "--eval-dataset", str(work / "heldout.jsonl"), "--batch-size", str(a.batch_size), "--total-steps",
           str(steps), "--learning-rate", str(a.learning_rate), "--lr-scheduler", "linear", "--warmup-steps", "0",
           "--max-length", str(a.max_length), "--max-prompt-length", str(a.max_length), "--precision", "bf16",
           "--seed", str(a.seed), "--eval-every", "0", "--save-every", "0", "--log-every", "10",
           "--output-dir", str(out)]
    t = time.perf_counter()
    with open(work / "ours.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    wall = time.perf_counter() - t
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
    return {"before": evals[0]["eval/accuracy"], "after": evals[-1]["eval/accuracy"],
            "eval_loss": evals[-1]["eval/loss"], "wall_s": wall, "steps_logged": [r.get("step") for r in evals]}


def run_trl(a, work: Path, steps: int) -> dict:
    spec = {"model": a.model, "train": str(work / "train.jsonl"), "heldout": str(work / "heldout.jsonl"),
            "batch_size": a.batch_size, "steps": steps, "lr": a.learning_rate, "max_length": a.max_length,
            "seed": a.seed}
    r = harness.run_worker(__file__, "trl", "trl", spec, work, a.trl_python, None)
    if "error" in r:
        raise SystemExit(f"TRL worker failed ({r['error']}); log: {r['log']}")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python", help="interpreter of the TRL venv")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our side (this repo's env)")
    p.add_argument("--data", default="../shared/data/hh_harmless_test.jsonl", help="preference rows (.jsonl)")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--train-pairs", type=int, default=1024, help="training pairs (one pass)")
    p.add_argument("--heldout", type=int, default=256, help="held-out pairs")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step, both sides")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="peak lr, linear decay, both sides")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens; longer pairs are skipped")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results_hh_reward.md"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if harness.run_as_worker(a, None, worker_trl):
        return
    a.model = harness.default_model(a.model)
    work = harness.workdir(a.workdir, "hh_reward_")
    rows, skipped = harness.select_rows(harness.data_path(a.data), a.model, a.train_pairs + a.heldout, a.max_length,
                                        pairs_fit=True)
    harness.write_jsonl(work / "train.jsonl", rows[:a.train_pairs])
    harness.write_jsonl(work / "heldout.jsonl", rows[a.train_pairs:])
    steps = a.train_pairs // a.batch_size
    print(f"work dir {work}; {a.train_pairs} train + {a.heldout} held-out pairs ({skipped} longer skipped); "
          f"{steps} steps", flush=True)
    res = {}
    for side in a.sides.split(","):
        load = harness.loadavg()
        res[side] = (run_ours if side == "ours" else run_trl)(a, work, steps) | {"load": load}
        print(side, res[side], flush=True)
    (work / "results.json").write_text(json.dumps(res, indent=1))
    L = ["# Reward model on Anthropic HH: held-out accuracy, ours (reward.py) vs TRL RewardTrainer\n",
         f"- rows: `{a.data}`, the pairs whose prompt + chosen and prompt + rejected (+ EOS) fit in {a.max_length} "
         f"tokens ({skipped} longer ones skipped before the {a.train_pairs + a.heldout}th fitting pair): the first "
         f"{a.train_pairs} train, the next {a.heldout} are held out",
         f"- model `{a.model}`; batch {a.batch_size} pairs, {steps} steps (one pass), lr {a.learning_rate:g} linear "
         f"decay, no warm-up, bf16 autocast, fp32 master weights, seed {a.seed}; each side shuffles with its own "
         f"sampler",
         f"- TRL {res.get('trl', {}).get('trl', '?')}: RewardConfig defaults otherwise (gradient checkpointing "
         f"{res.get('trl', {}).get('gradient_checkpointing', '?')}, which does not change the math); ours: reward.py "
         f"defaults otherwise (prefix-shared packing)",
         "- accuracy = share of held-out pairs where chosen scores above rejected, each side's own evaluation\n",
         "| side | held-out accuracy before -> after | eval loss after | wall s | load at start |",
         "| --- | --- | --- | --- | --- |"]
    for side, r in res.items():
        L.append(f"| {side} | {r['before']:.3f} -> {r['after']:.3f} | {r['eval_loss']:.3f} | {r['wall_s']:.0f} | "
                 f"{r['load']} |")
    if {"ours", "trl"} <= res.keys():
        d = 100 * (res["ours"]["after"] - res["trl"]["after"])
        L.append(f"\nours - TRL: {d:+.1f} points after training (target: >= -2). One held-out pair is "
                 f"{100 / a.heldout:.2f} points; the binomial standard error of one accuracy near 0.6 is about "
                 f"{100 * (0.24 / a.heldout) ** 0.5:.1f} points.")
    text = "\n".join(L) + "\n"
    Path(a.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
