"""The README's worked example (DPO-Positive as a diff of dpo.py) applies, runs, and computes its paper's loss."""
import importlib.util
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, dpo_args, read_metrics


def test_worked_example_applies_and_trains(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", readme[readme.index("## Write your own algorithm"):], re.S).group(1)
    (tmp_path / "dpop.diff").write_text(diff)
    r = subprocess.run(["patch", "-o", str(tmp_path / "dpop.py"), str(ROOT / "dpo.py"), str(tmp_path / "dpop.diff")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    spec = importlib.util.spec_from_file_location("dpop", tmp_path / "dpop.py")
    dpop = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "dpop", dpop)  # dataclasses look their module up there
    spec.loader.exec_module(dpop)

    # the loss against its closed form: h = (-5 + 4) - (-6 + 6) = -1, penalty = max(0, -4 + 5) = 1
    t = lambda x: torch.tensor([x])
    loss = dpop.dpop_loss(t(-5.0), t(-6.0), t(-4.0), t(-6.0), beta=0.1, dpop_lambda=50.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(5.1)), rel=1e-6)
    no_drop = dpop.dpop_loss(t(-3.0), t(-6.0), t(-4.0), t(-6.0), beta=0.1, dpop_lambda=50.0)  # chosen rose: DPO's
    assert no_drop.item() == pytest.approx(math.log(1 + math.exp(-0.1)), rel=1e-6)

    args = dpop.Args(**vars(dpo_args(tiny_model_dir, pairs_file, tmp_path / "run", total_steps=2)))
    trainer = dpop.main(args)
    assert trainer.output_dir.name == "run" and (trainer.output_dir / "final" / "config.json").exists()
    records = read_metrics(trainer.output_dir)
    assert abs(records[0]["eval/loss"] - math.log(2)) < 1e-6  # step 0: policy = reference, no penalty
    assert [m["step"] for m in records if "train/loss" in m] == [1, 2]
