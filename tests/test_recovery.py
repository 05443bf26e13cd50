"""Nothing lost: kill -9 while a checkpoint is being written, SIGTERM mid-training, then --resume (subprocesses)."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_metrics
from conftest import ENV, tiny_flags

pytestmark = pytest.mark.slow


def start(model, data, out, delay=0.0, resume=False, nproc=1):
    flags = tiny_flags(model, data, out, total_steps=10, save_every=2, eval_every=0, keep_checkpoints=10,
                       batch_size=4 // nproc, resume=resume)
    env = ENV | {"CLEANRL_RLHF_TEST_SAVE_DELAY": str(delay)}
    launcher = [sys.executable] if nproc == 1 else ["torchrun", f"--nproc_per_node={nproc}", "--master_port=29561"]
    return subprocess.Popen([*launcher, "dpo.py", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def losses(out):
    return {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    p = start(tiny_model_dir, pairs_file, out)
    assert p.wait(timeout=300) == 0, p.communicate()[1][-2000:]
    return losses(out)


def test_kill_9_during_checkpoint_write_resumes_from_previous(tiny_model_dir, pairs_file, tmp_path, reference):
    out = tmp_path / "run"
    p = start(tiny_model_dir, pairs_file, out, delay=3.0)  # every save sleeps 3 s before its COMPLETE marker
    ckpts = out / "checkpoints"
    wait_for(lambda: (ckpts / "step_00000002" / "COMPLETE").exists() and (ckpts / "step_00000004.tmp").exists(), p)
    p.kill()  # SIGKILL mid-write of step 4
    p.wait()
    assert not (ckpts / "step_00000004").exists()
    r = start(tiny_model_dir, pairs_file, out, resume=True)
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0, stderr[-2000:]
    assert "resumed from" in stdout and "step_00000002 at step 2" in stdout
    assert losses(out) == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert sorted(c.name for c in ckpts.iterdir()) == [f"step_{s:08d}" for s in (2, 4, 6, 8, 10)]  # .tmp replaced


@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGTERM), (1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_preemption_stops_with_checkpoint_and_resume_matches(tiny_model_dir, pairs_file, tmp_path, reference, nproc,
                                                             sig):
    """nproc 2: SIGTERM goes to torchrun, which forwards it to both workers; they stop after the same step."""
    out = tmp_path / "run"
    p = start(tiny_model_dir, pairs_file, out, delay=0.3, nproc=nproc)
    wait_for(lambda: (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 3, p)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert f"{sig.name}: stopped after step" in stdout, stderr[-2000:]
    if nproc == 1:  # under torchrun the agent reports the signal with its own exit code
        assert p.returncode == 0
    stopped = max(losses(out))
    assert 3 <= stopped < 10 and (out / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").exists()
    assert not (out / "final").exists()
    r = start(tiny_model_dir, pairs_file, out, resume=True, nproc=nproc)
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0, stderr[-2000:]
    tol = 1e-6 if nproc == 1 else 1e-4  # 2 ranks x batch 2 == 1 x batch 4 up to float summation order
    assert losses(out) == pytest.approx(reference, rel=tol, abs=1e-7)  # fp32: same losses as uninterrupted
    assert (out / "final" / "model.safetensors").exists()


def test_resume_without_checkpoint_starts_fresh(tiny_model_dir, pairs_file, tmp_path, reference):
    out = tmp_path / "run"
    r = start(tiny_model_dir, pairs_file, out, resume=True)  # a requeued job whose first attempt saved nothing
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0 and "starting fresh" in stdout, stderr[-2000:]
    assert losses(out) == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_nan_injection_keeps_last_good_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    """A data row that makes the loss non-finite is impossible to write as text, so the loss is poisoned in-process
    in tests/test_dpo_trainer.py; here the subprocess contract: exit 2, one line naming the step."""
    out = tmp_path / "run"
    env = ENV | {"PYTHONPATH": str(ROOT)}
    code = ("import dpo, common, torch, sys; a = dpo.tyro.cli(dpo.Args); t = dpo.DPOTrainer(a); f = t.compute_loss\n"
            "def g(m, b):\n o = f(m, b)\n if t.global_step == 3: o.loss = o.loss * float('nan')\n return o\n"
            "t.compute_loss = g; common.run_main(t.train)")
    flags = tiny_flags(tiny_model_dir, pairs_file, out, total_steps=6, save_every=2, batch_size=4)
    r = subprocess.run([sys.executable, "-c", code, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")][0].startswith(
        "error: non-finite loss or gradient norm at step 4 (rows [")
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (out / "checkpoints" / "step_00000004").exists()
