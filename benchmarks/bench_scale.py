"""Peak host memory per rank: one process vs torchrun --strategy fsdp (2 and 4 ranks), for dpo.py, sft.py, grpo.py.

    python benchmarks/bench_scale.py                          # the issue's size: a 276M random Llama (~1.1 GB fp32)
    python benchmarks/bench_scale.py --hidden 512 --layers 8  # smaller, quicker

A random Llama with the bundled model's tokenizer (tied embeddings) is written once to --model-dir. Each configuration
runs the script in fresh processes, fp32, batch 1, max length 64, 4 eval rows: eval-only (--total-steps 0) and 2
training steps (then the export); each process records its VmHWM at exit. dpo.py runs on 40 HH rows, sft.py and
grpo.py on the built-in task (grpo.py: --beta 0.04, 2 prompts x 2 completions, 8 new tokens).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"dpo": ["--dataset", "{rows}"], "sft": [],
           "grpo": ["--beta", "0.04", "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "8"]}


def child() -> None:
    """`bench_scale.py --child OUT SCRIPT args`: run SCRIPT as __main__, write this process's VmHWM at exit."""
    out, script, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
    atexit.register(lambda: Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(str(next(
        int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))))
    sys.argv, sys.path[:0] = [script] + rest, [str(REPO)]
    runpy.run_path(str(REPO / script), run_name="__main__")


def build_model(d: Path, hidden: int, layers: int) -> int:
    """A random Llama of SmolLM2's shape family (4 query heads per KV head) with the bundled tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(REPO))
    from plumbing.models import BUNDLED_MODEL, load_tokenizer
    tok, heads = load_tokenizer(BUNDLED_MODEL), hidden // 64
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    with torch.device("meta"):  # counted without the memory: the parent stays small while the runs measure
        n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(d)
        tok.save_pretrained(d)
    return n_params


def run(script: str, nproc: int, steps: int, model: Path, rows: Path, tmp: Path, port: int) -> list[int]:
    """Peak RSS (bytes) of each rank of one run."""
    out = tmp / f"{script}-{nproc}-{steps}"
    flags = ["--model", str(model), "--precision", "fp32", "--batch-size", "1", "--max-length", "64", "--eval-size",
             "4", "--total-steps", str(steps), "--eval-every", "0", "--save-every", "0", "--output-dir", str(out)]
    flags += [f.format(rows=rows) for f in SCRIPTS[script]]  # later flags win: grpo's own --batch-size
    launcher = [sys.executable] if nproc == 1 else ["torchrun", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    cmd = launcher + [__file__, "--child", str(out), f"{script}.py"] + flags + ([] if nproc == 1 else
                                                                                ["--strategy", "fsdp"])
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       env=os.environ | {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    peaks = [int(Path(f"{out}.{rank}").read_text()) for rank in range(nproc)]
    shutil.rmtree(out, ignore_errors=True)  # its checkpoint and export: a model's size several times over
    return peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--model-dir", default=None, help="default: a temporary directory per size")
    p.add_argument("--scripts", default="dpo,sft,grpo")
    p.add_argument("--nprocs", default="1,2,4")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results_scale.md"))
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    model = Path(a.model_dir or Path(tempfile.gettempdir()) / f"bench_scale_llama_{a.hidden}x{a.layers}")
    n_params = build_model(model, a.hidden, a.layers)
    rows = tmp / "hh40.jsonl"
    rows.write_text("".join(open(REPO.parent / "shared" / "data" / "hh_harmless_test.jsonl").readlines()[:40]))
    results, port, start = {}, 29700, time.time()
    for script in a.scripts.split(","):
        for steps in (0, 2):
            for nproc in map(int, a.nprocs.split(",")):
                port += 1
                results[script, steps, nproc] = run(script, nproc, steps, model, rows, tmp, port)
                print(script, steps, nproc, [f"{x / 1e9:.2f}" for x in results[script, steps, nproc]], flush=True)
    lines = ["# Peak host memory per rank under FSDP (benchmarks/bench_scale.py)\n",
             f"- model: random Llama, hidden {a.hidden}, {a.layers} layers, {n_params / 1e6:.0f}M parameters "
             f"({4 * n_params / 1e9:.2f} GB fp32), SmolLM2's tokenizer, tied embeddings",
             "- flags: --precision fp32 --batch-size 1 --max-length 64 --eval-size 4; eval-only = --total-steps 0, "
             "train = --total-steps 2 (then the export); FSDP = torchrun --nproc_per_node N ... --strategy fsdp",
             f"- peak RSS = each process's VmHWM at exit; `max rank` = the largest rank's, `sum` = over all ranks; "
             f"x = against one process. CPU, gloo; {os.cpu_count()} cores; {time.time() - start:.0f} s in all\n",
             "| script | run | processes | each rank GB | max rank GB | x one process | sum GB | x one process |",
             "|---|---|---|---|---|---|---|---|"]
    for (script, steps, nproc), peaks in results.items():
        one = results[script, steps, 1]
        each = " ".join(f"{x / 1e9:.2f}" for x in peaks)
        lines.append(f"| {script} | {'train 2 steps + export' if steps else 'eval-only'} | {nproc} | {each} | "
                     f"{max(peaks) / 1e9:.2f} | {max(peaks) / max(one):.2f} | {sum(peaks) / 1e9:.2f} | "
                     f"{sum(peaks) / sum(one):.2f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({f"{k[0]}-{k[1]}-{k[2]}": v for k, v in results.items()}))


if __name__ == "__main__":
    child() if sys.argv[1:2] == ["--child"] else main()
