"""Nothing lost: damaged checkpoints, a full disk, kill -9 mid-write, SIGTERM mid-training, then --resume."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from plumbing import checkpoint
from common import UserError
from conftest import ENV, ROOT, dpo_args, read_metrics, tiny_flags
from dpo import DPOTrainer, main


# --- damaged checkpoints and full disks (in-process, tiny model) ------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, pairs_file, tmp_path_factory):
    """An fp32 run with checkpoints at steps 2, 4, 6 and its final weights."""
    out = tmp_path_factory.mktemp("saved") / "run"
    t = main(dpo_args(tiny_model_dir, pairs_file, out, total_steps=6, save_every=2, keep_checkpoints=3))
    return out, {k: v.clone() for k, v in t.model.state_dict().items()}


def _zero_bytes(f):
    with open(f, "r+b") as h:
        h.seek(200)
        h.write(b"\0" * 400)


def _truncate(f):
    with open(f, "r+b") as h:
        h.truncate(max(os.path.getsize(f) // 2, 1))


DAMAGE = {
    "zeroed shard": ("dcp/__0_0.distcp", _zero_bytes),
    "truncated shard": ("dcp/__0_0.distcp", _truncate),
    "garbage scheduler": ("scheduler.pt", lambda f: f.write_bytes(b"garbage")),
    "garbage trainer state": ("trainer_state.json", lambda f: f.write_text("{not json")),
    "truncated metadata": ("dcp/.metadata", _truncate),
    "missing rng": ("rng_rank0.pt", lambda f: f.unlink()),
    "garbage manifest": ("manifest.json", lambda f: f.write_text("[")),
}


@pytest.mark.parametrize("what", DAMAGE)
def test_damaged_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, pairs_file, tmp_path, saved_run, capsys,
                                                           what):
    src, final_weights = saved_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # interrupted after step 5: newest is step 4
    name, damage = DAMAGE[what]
    damage(run / "checkpoints" / "step_00000004" / name)
    t = main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=6, save_every=2, keep_checkpoints=3, resume=True))
    out = capsys.readouterr().out
    assert f"step_00000004 is damaged: {name}" in out and "trying the previous one" in out
    assert "resumed from" in out and "at step 2" in out
    for k, v in t.model.state_dict().items():  # the same weights as the uninterrupted run
        torch.testing.assert_close(v, final_weights[k])


def test_no_intact_checkpoint_stops_with_one_line(tiny_model_dir, pairs_file, tmp_path, saved_run):
    run = tmp_path / "run"
    shutil.copytree(saved_run[0], run)
    for ckpt in (run / "checkpoints").iterdir():
        _zero_bytes(ckpt / "dcp" / "__0_0.distcp")
    with pytest.raises(UserError, match=r"--resume: no intact checkpoint in .*run/checkpoints"):
        DPOTrainer(dpo_args(tiny_model_dir, pairs_file, run, total_steps=6, resume=True))


def test_full_disk_during_a_checkpoint_stops_cleanly(tiny_model_dir, pairs_file, tmp_path, monkeypatch, saved_run):
    """ENOSPC while writing step 4: one line naming the path and errno, the .tmp removed, step 2 intact; resuming
    after space is freed reaches the uninterrupted run's weights."""
    run = tmp_path / "run"
    save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step_00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    args = dpo_args(tiny_model_dir, pairs_file, run, total_steps=6, save_every=2, keep_checkpoints=3)
    with pytest.raises(UserError, match=r"checkpoint write failed: .*step_00000004\.tmp: No space left on device "
                                        r"\(ENOSPC\)"):
        main(args)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert checkpoint.verify_checkpoint(run / "checkpoints" / "step_00000002") == ""
    monkeypatch.setattr(torch, "save", save)
    t = main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=6, save_every=2, keep_checkpoints=3, resume=True))
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, saved_run[1][k])


def test_resume_with_another_batch_size_sees_each_row_once_per_epoch(tiny_model_dir, pairs_file, tmp_path):
    """batch 4 -> 3 -> 4 across two resumes: the row ids of the whole run are one epoch order, then the next."""
    seen = []

    def run(batch_size, steps, resume):
        t = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path, batch_size=batch_size, total_steps=steps,
                                save_every=steps, resume=resume, allow_changed_flags=resume))  # another global batch
        draw = t.sampler.next_indices

        def record():
            rows = draw()
            seen.extend(t.train_data[i]["source"] for i in rows)
            return rows
        t.sampler.next_indices = record
        t.train()
        return t
    run(4, 5, False)  # 20 rows
    run(3, 5 + 10, True)  # 30 more: crosses into the second epoch of 44 training rows
    t = run(4, 15 + 3, True)  # 12 more
    n = len(t.train_data)
    assert len(seen) == 62 and n == 44
    assert sorted(seen[:n]) == sorted(e["source"] for e in t.train_data)  # epoch 0: every row exactly once
    assert len(set(seen[n:])) == len(seen[n:])  # epoch 1 so far: no row twice
    order = [t.train_data[i]["source"] for i in t.sampler.epoch_order(1)]
    assert seen[n:] == order[:len(seen) - n]


# --- kill -9 and pre-emption (subprocesses) ---------------------------------------------------------------------------


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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGTERM), (1, signal.SIGUSR1), (1, signal.SIGINT),
                                       (2, signal.SIGTERM)])
def test_preemption_stops_with_checkpoint_and_resume_matches(tiny_model_dir, pairs_file, tmp_path, reference, nproc,
                                                             sig):
    """nproc 2: SIGTERM goes to torchrun, which forwards it to both workers; they stop after the same step. SIGINT
    (Ctrl-C) is a pre-emption too: no KeyboardInterrupt traceback, a checkpoint, exit 0, resumable."""
    out = tmp_path / "run"
    p = start(tiny_model_dir, pairs_file, out, delay=0.3, nproc=nproc)
    wait_for(lambda: (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 3, p)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert f"{sig.name}: stopped after step" in stdout, stderr[-2000:]
    if nproc == 1:  # under torchrun the agent reports the signal with its own exit code
        assert p.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    stopped = max(losses(out))
    assert 3 <= stopped < 10 and (out / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").exists()
    assert not (out / "final").exists()
    r = start(tiny_model_dir, pairs_file, out, resume=True, nproc=nproc)
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0, stderr[-2000:]
    tol = 1e-6 if nproc == 1 else 1e-4  # 2 ranks x batch 2 == 1 x batch 4 up to float summation order
    assert losses(out) == pytest.approx(reference, rel=tol, abs=1e-7)  # fp32: same losses as uninterrupted
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_resume_without_checkpoint_starts_fresh(tiny_model_dir, pairs_file, tmp_path, reference):
    out = tmp_path / "run"
    r = start(tiny_model_dir, pairs_file, out, resume=True)  # a requeued job whose first attempt saved nothing
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0 and "starting fresh" in stdout, stderr[-2000:]
    assert losses(out) == pytest.approx(reference, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_nan_injection_keeps_last_good_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    """A data row that makes the loss non-finite is impossible to write as text, so the loss is poisoned in-process
    in tests/test_trainer.py; here the subprocess contract: exit 2, one line naming the step."""
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


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_0_with_one_line(tiny_model_dir, pairs_file, tmp_path):
    """SIGTERM during setup (the model loading, held 3 s by a wrapper) was death by signal (-15) with nothing said:
    now the run stops before step 1, exit 0, one line saying so and how to continue."""
    gate = tmp_path / "loading"
    code = ("import os, pathlib, time, common, dpo\n"
            "load = common.load_model\n"
            "def slow(*a, **k):\n"
            "    pathlib.Path(os.environ['LOAD_GATE']).touch(); time.sleep(3); return load(*a, **k)\n"
            "common.load_model = slow\n"
            "common.run_main(dpo.main)")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", code, *tiny_flags(tiny_model_dir, pairs_file, out)], cwd=ROOT,
                         env=ENV | {"LOAD_GATE": str(gate), "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(gate.exists, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in stderr, (p.returncode, stderr[-2000:])
    lines = [ln for ln in stdout.splitlines() if "SIGTERM" in ln]
    assert lines == ["SIGTERM: stopped before step 1 (nothing to save yet); relaunch the same command with --resume "
                     "to continue"], stdout[-2000:]
    assert not (out / "checkpoints").exists()


def test_resumed_run_logs_the_record_an_uninterrupted_run_writes(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """--log-every 4, a checkpoint every 3 steps, SIGTERM at step 3: the log window open then (steps 1-3) is saved in
    the checkpoint, so the resumed run's record at step 4 averages steps 1-4, as the uninterrupted run's does (it
    averaged step 4 alone, after an extra record at step 3); the weights are the same either way."""
    kw = dict(total_steps=6, log_every=4, save_every=3, keep_checkpoints=3)
    full = main(dpo_args(tiny_model_dir, pairs_file, tmp_path / "full", **kw))
    ref = [m for m in read_metrics(tmp_path / "full") if "train/loss" in m]
    assert [m["step"] for m in ref] == [4, 6]
    run = tmp_path / "run"

    def sigterm_at_step_3(self, out):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(DPOTrainer, "on_step_end", sigterm_at_step_3)
    assert main(dpo_args(tiny_model_dir, pairs_file, run, **kw)).global_step == 3
    monkeypatch.undo()
    resumed = main(dpo_args(tiny_model_dir, pairs_file, run, resume=True, **kw))
    got = [m for m in read_metrics(run) if "train/loss" in m]
    assert [m["step"] for m in got] == [4, 6]
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            if not k.endswith("_per_s"):  # throughput aside
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full.model.state_dict()[k])
