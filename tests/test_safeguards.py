"""Nothing lost, round three: a real full disk (tmpfs), a locked and recorded run directory, atomic export, and the
ways a run can be started wrong. Each bad start is one line (UserError -> exit 2) with nothing written or lost."""
import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plumbing import checkpoint, models, run, sharding
from common import UserError
from conftest import ENV, ROOT, big_teacher_dir, dpo_args, read_metrics, script_args, write_prompt_task
from dpo import DPOTrainer, main as dpo_main


# --- a small real disk ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m", read_only: bool = False):
    """A tmpfs of `size` mounted at path (tests run as root); skipped with the reason where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): a real full disk needs one")
    try:
        if read_only:
            (path / "run").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file until the disk has `leave` bytes free (0: until it refuses another byte)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):  # unbuffered: close() writes nothing
        while shutil.disk_usage(disk).free > leave:
            f.write(b"\0" * min(1 << 16, max(shutil.disk_usage(disk).free - leave, 4096)))
        while leave == 0:
            f.write(b"\0" * 512)
    return filler


def _task(tmp_path: Path) -> Path:
    """prompts.jsonl and my_rewards.py (conftest.write_prompt_task) in tmp_path/task."""
    (tmp_path / "task").mkdir()
    return write_prompt_task(tmp_path / "task")


def _grpo_resume_args(model: str, task: Path, run: Path):
    """grpo.py --resume on `run` (a dpo.py run directory in these tests), a few tiny steps."""
    from grpo import Args
    return Args(model=model, dataset=str(task / "prompts.jsonl"), reward_fn=["my_rewards:length"], output_dir=str(run),
                precision="fp32", batch_size=2, num_generations=2, total_steps=4, max_length=48, max_new_tokens=4,
                resume=True)


def weights(t) -> dict:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, pairs_file, tmp_path_factory):
    """An fp32 DPO run of 6 steps (checkpoints every 2): the weights every interrupted-and-resumed run must reach."""
    out = tmp_path_factory.mktemp("reference") / "run"
    t = dpo_main(dpo_args(tiny_model_dir, pairs_file, out, total_steps=6, save_every=2, keep_checkpoints=3))
    return out, weights(t)


def _run_args(tiny_model_dir, pairs_file, out, **kw):
    return dpo_args(tiny_model_dir, pairs_file, out, total_steps=6, save_every=2, keep_checkpoints=3, **kw)


@pytest.mark.parametrize("leave,inner", [(4096, "torch.save's zip writer"), (96 << 10, "DCP")])
def test_real_full_disk_during_a_checkpoint(tiny_model_dir, pairs_file, tmp_path, monkeypatch, reference, leave,
                                            inner):
    """The disk fills after step 4 (4 KB left: the rng file's zip write fails; 96 KB: DCP's shard write fails):
    one line naming the .tmp and ENOSPC, the .tmp removed (the space is free again), step 2 intact; after the
    filler is deleted, --resume reaches the uninterrupted run's weights."""
    with small_disk(tmp_path / "disk") as disk:
        run, filled = disk / "run", []

        def fill_after_step_4(self, out):
            if self.global_step == 4 and not filled:
                filled.append(fill(disk, leave))
        monkeypatch.setattr(DPOTrainer, "on_step_end", fill_after_step_4)
        with pytest.raises(UserError, match=r"^checkpoint write failed: .*step_00000004\.tmp: No space left on "
                                            r"device \(ENOSPC") as e:
            dpo_main(_run_args(tiny_model_dir, pairs_file, run))
        assert "\n" not in str(e.value)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
        filled[0].unlink()
        monkeypatch.undo()
        t = dpo_main(_run_args(tiny_model_dir, pairs_file, run, resume=True))
        for k, v in weights(t).items():
            torch.testing.assert_close(v, reference[1][k])
        assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


def test_full_disk_during_a_metrics_write_leaves_no_torn_line(tiny_model_dir, pairs_file, tmp_path, monkeypatch,
                                                              reference, capsys):
    """The disk fills with 20 bytes of slack in metrics.jsonl's last page: step 3's record is cut short by the disk.
    The run stops with one line, metrics.jsonl ends on a whole record; a torn record left by a kill -9 is dropped
    (and said) by --resume, which reaches the uninterrupted run's weights."""
    with small_disk(tmp_path / "disk") as disk:
        run, filled = disk / "run", []

        def fill_after_step_3(self, out):
            if self.global_step == 3 and not filled:
                metrics = run / "metrics.jsonl"
                lines = metrics.read_text().splitlines()
                pad = (-(len(metrics.read_bytes()) + 20)) % 4096  # whitespace inside the first record is valid JSON
                metrics.write_text("\n".join([lines[0][:-1] + " " * pad + "}"] + lines[1:]) + "\n")
                filled.append(fill(disk, 0))
        monkeypatch.setattr(DPOTrainer, "on_step_end", fill_after_step_3)
        with pytest.raises(UserError, match=r"^cannot write .*metrics\.jsonl: No space left on device \(ENOSPC\)$"):
            dpo_main(_run_args(tiny_model_dir, pairs_file, run))
        text = (run / "metrics.jsonl").read_text()
        assert text.endswith("\n") and [json.loads(ln)["step"] for ln in text.splitlines()][-1] == 2
        filled[0].unlink()
        monkeypatch.undo()
        with open(run / "metrics.jsonl", "a") as f:  # what a kill -9 mid-write leaves
            f.write('{"step": 3, "train/lo')
        t = dpo_main(_run_args(tiny_model_dir, pairs_file, run, resume=True))
        assert "dropped 1 unreadable record" in capsys.readouterr().out
        for k, v in weights(t).items():
            torch.testing.assert_close(v, reference[1][k])
        assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


def test_full_disk_during_the_export(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """The disk fills as the export starts: one line naming final.tmp and ENOSPC, no final/ and no final.tmp left,
    the last checkpoint intact; after the filler is deleted, --resume only exports."""
    with small_disk(tmp_path / "disk") as disk:
        run, export, filled = disk / "run", DPOTrainer.export, []

        def export_on_a_full_disk(self):
            filled.append(fill(disk, 4096))
            export(self)
        monkeypatch.setattr(DPOTrainer, "export", export_on_a_full_disk)
        with pytest.raises(UserError, match=r"^export failed: .*run/final\.tmp: No space left on device \(ENOSPC"):
            dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2))
        assert not (run / "final").exists() and not (run / "final.tmp").exists()
        assert (run / "checkpoints" / "step_00000002" / "COMPLETE").exists()
        filled[0].unlink()
        monkeypatch.undo()
        dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, resume=True))
        assert (run / "final" / "model.safetensors").exists()


def test_read_only_output_dir_stops_before_the_step_0_eval(tiny_model_dir, pairs_file, tmp_path):
    with small_disk(tmp_path / "disk", read_only=True) as disk:
        with pytest.raises(UserError, match=r"^--output-dir .*run: Read-only file system \(EROFS\)$"):
            DPOTrainer(dpo_args(tiny_model_dir, pairs_file, disk / "run"))


# --- the run directory: run.json and its lock -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny_model_dir, pairs_file, tmp_path_factory):
    """A finished 2-step DPO run with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("saved") / "run"
    dpo_main(dpo_args(tiny_model_dir, pairs_file, out, total_steps=2, save_every=2))
    return out


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_run_json_records_what_the_run_was_started_with(saved, tiny_model_dir):
    record = json.loads((saved / "run.json").read_text())
    assert record == {"script": "dpo", "model": str(Path(tiny_model_dir).resolve()), "lora_r": 0, "lora_alpha": None,
                      "lora_target_modules": None}


@pytest.mark.parametrize("change,flag", [
    ("lora", "--lora-r 4, but .* was started with --lora-r 0"),
    ("model", "--model .*other_model, but .* was started with --model .*tiny_model\\d*")])
def test_resume_with_another_model_or_lora_is_one_line_naming_both(saved, tiny_model_dir, pairs_file, tmp_path, change,
                                                                   flag):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    before = snapshot(run)
    model = str(shutil.copytree(tiny_model_dir, tmp_path / "other_model")) if change == "model" else tiny_model_dir
    args = dpo_args(model, pairs_file, run, total_steps=4, resume=True, lora_r=4 if change == "lora" else 0)
    with pytest.raises(UserError, match=rf"^--resume: {flag} \(its run\.json\); resume with the same"):
        DPOTrainer(args)
    assert snapshot(run) == before  # nothing written, nothing lost


def test_another_script_cannot_resume_a_run(saved, tiny_model_dir, tmp_path, monkeypatch):
    """grpo.py --resume on dpo.py's directory: one line, the directory untouched (it 'resumed' and exported before)."""
    from grpo import GRPOTrainer
    task = _task(tmp_path)
    monkeypatch.syspath_prepend(str(task))
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    before = snapshot(run)
    args = _grpo_resume_args(tiny_model_dir, task, run)
    with pytest.raises(UserError, match=r"^--output-dir .*run: holds a dpo\.py run \(run\.json\); grpo\.py cannot "
                                        r"resume it"):
        GRPOTrainer(args)
    assert snapshot(run) == before


def test_a_locked_output_dir_is_one_line_and_a_stale_lock_is_not(tiny_model_dir, pairs_file, tmp_path):
    """Another live run holds the directory (run.lock names it): one line naming it, nothing written. Once it is gone
    (its run.lock stays, as after a kill -9), the next run goes ahead; a finished run leaves the directory
    unlocked."""
    run = tmp_path / "run"
    run.mkdir()
    other = os.open(run, os.O_RDONLY)  # another process's open file description: flock conflicts with it
    (run / "run.lock").write_text("pid 4242 on elsewhere\n")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(UserError, match=r"^--output-dir .*run: another run \(pid 4242 on elsewhere\) is using it"):
        DPOTrainer(dpo_args(tiny_model_dir, pairs_file, run))
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    os.close(other)  # the holder dies: the file stays, the lock goes
    dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2))
    assert (run / "final" / "model.safetensors").exists()
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit: this would raise if still held
    finally:
        os.close(fd)


# --- models and exports ---------------------------------------------------------------------------------------------


def test_export_is_atomic_and_a_model_without_weights_is_one_line(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """A kill mid-export leaves no final/ (only final.tmp, replaced by the next export); a directory with only
    config.json, or with truncated weights, as --model is one line."""
    from transformers import PreTrainedTokenizerBase
    run = tmp_path / "run"
    save = PreTrainedTokenizerBase.save_pretrained

    def killed(*a, **k):
        raise KeyboardInterrupt  # not an Exception: nothing in the export may clean up after it, as after kill -9
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, save_every=2))
    assert not (run / "final").exists() and (run / "final.tmp" / "config.json").exists()

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(run / "final.tmp" / "config.json", config_only)
    with pytest.raises(UserError, match=r"^--model .*config_only: directory has no weights"):
        DPOTrainer(dpo_args(str(config_only), pairs_file, tmp_path / "r1"))
    truncated = shutil.copytree(tiny_model_dir, tmp_path / "truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "model.safetensors") // 2)
    with pytest.raises(UserError, match=r"^--model .*truncated: could not load \(\w+"):
        DPOTrainer(dpo_args(str(truncated), pairs_file, tmp_path / "r2"))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, save_every=2, resume=True))
    assert (run / "final" / "tokenizer_config.json").exists() and not (run / "final.tmp").exists()
    dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, save_every=2, resume=True))  # exported again
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"]
    assert (run / "final" / "model.safetensors").exists()


def test_no_such_reward_model_does_not_mention_omitting_model(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"^--reward-model /no/such/rm: no such directory\. Pass an HF model directory "
                                        r"or a hub id$"):
        models.load_model("/no/such/rm", flag="--reward-model")


def test_peft_wrapping_raises_no_future_warning(tiny_model_dir, tmp_path):
    """peft reads a deprecated transformers property on every wrap: one FutureWarning per rank, per export."""
    from plumbing.export import export_final
    model = models.load_model(tiny_model_dir)
    args = SimpleNamespace(lora_r=4, lora_alpha=None, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = models.add_lora(model, args)
        export_final(tmp_path, peft_model, models.load_tokenizer(tiny_model_dir), True)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_lora_target_modules_all_linear_as_a_flag_value(tiny_model_dir):
    """`--lora-target-modules all-linear` (what a resume refusal names; tyro makes it a list) adapts every linear
    layer but the head, as leaving the flag out does; peft refused the list ("all-linear not found")."""
    counts = []
    for targets in (["all-linear"], None):
        args = SimpleNamespace(lora_r=4, lora_alpha=None, lora_dropout=0.0, lora_target_modules=targets)
        wrapped = models.add_lora(models.load_model(tiny_model_dir), args)
        counts.append(sorted(n for n, _ in wrapped.named_modules() if n.endswith(".lora_A")))
    assert counts[0] == counts[1] and len(counts[0]) == 7 * 2  # q k v o gate up down in each of 2 layers


def test_ddp_wrapping_raises_no_future_warning(tiny_model_dir, tmp_path):
    """torch 2.13 deprecates DDP's broadcast_buffers: one FutureWarning per rank at every start."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharding.wrap_ddp(models.load_model(tiny_model_dir), run.DistInfo(world_size=2))
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


# --- data -------------------------------------------------------------------------------------------------------------


def _conversations(path: Path, long_rows: set[int], n: int = 23) -> str:
    with open(path, "w") as f:
        for i in range(n):
            user = "x" * 10_000 if i in long_rows else f"say {i}"
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": f"ok {i}"}]}) + "\n")
    return str(path)


def test_held_out_slice_lost_to_truncation_costs_only_the_eval(tiny_model_dir, tmp_path, capsys):
    """3 of 23 conversations have a 10k-character user turn and 2 of them are the held-out slice: training goes on
    with the 20 usable rows, without a held-out eval, and says so. An --eval-dataset left empty is one line."""
    from sft import main as sft_main
    order = list(range(23))
    random.Random(0).shuffle(order)  # train_eval_rows' held-out order: the first 2 are held out
    data = _conversations(tmp_path / "chats.jsonl", {order[0], order[1], order[5]})
    sft_main(script_args("sft", tiny_model_dir, data, tmp_path / "run", total_steps=2, batch_size=2))
    out = capsys.readouterr().out
    assert "warning: all 2 rows held out of" in out and "no held-out eval" in out and "train: 20 sequences" in out
    assert not [m for m in read_metrics(tmp_path / "run") if any(k.startswith("eval/") for k in m)]
    evals = _conversations(tmp_path / "evals.jsonl", set(range(3)), n=3)
    with pytest.raises(UserError, match=r"evals\.jsonl: no usable rows left after truncation to --max-length 64$"):
        sft_main(script_args("sft", tiny_model_dir, data, tmp_path / "run2", eval_dataset=evals))


def test_assistant_first_conversation_and_a_refusing_chat_template_are_one_line(tiny_model_dir, tmp_path):
    from sft import SFTTrainer
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]})
                    + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "hello"},
                                                      {"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(UserError, match=r"chats\.jsonl:2: field 'messages' starts with an assistant turn"):
        SFTTrainer(script_args("sft", tiny_model_dir, str(data), tmp_path / "r1", eval_size=0))
    strict = Path(shutil.copytree(tiny_model_dir, tmp_path / "strict"))
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role here') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    data.write_text(json.dumps({"messages": [{"role": "system", "content": "be terse"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(UserError, match=r"chats\.jsonl:1: the model's chat template refuses these messages "
                                        r"\(\w+: no system role here\)$"):
        SFTTrainer(script_args("sft", str(strict), str(data), tmp_path / "r2", eval_size=0))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# --- reward code that misbehaves, GRPO's non-finite message, --eval-size 0 --------------------------------------------


BAD_REWARDS = {
    "syntax_error": ("def f(prompts, completions, **kw)\n    return [0.0]\n", "f",
                     r"importing syntax_error raised SyntaxError: .*line 1"),
    "raises_on_import": ("raise RuntimeError('no GPU for the judge')\n", "f",
                         r"importing raises_on_import raised RuntimeError: no GPU for the judge"),
    "exits_on_import": ("import sys\nsys.exit(0)\n", "f", r"importing exits_on_import raised SystemExit: 0"),
    "exits_when_called": ("import sys\ndef f(prompts, completions, **kw):\n    sys.exit(0)\n", "f",
                          r"called sys\.exit\(0\) on rows \['.*prompts\.jsonl:\d+'"),
}


@pytest.mark.parametrize("module", BAD_REWARDS)
def test_reward_code_that_raises_or_exits_is_one_line(tiny_model_dir, tmp_path, monkeypatch, module):
    """A SyntaxError, an exception or sys.exit(0) at import or in the call: one line, exit 2, nothing trained; never
    exit 0 with nothing done."""
    from grpo import Args
    from grpo import main as grpo_main
    task = _task(tmp_path)
    source, fn, match = BAD_REWARDS[module]
    (task / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(task))
    args = Args(model=tiny_model_dir, dataset=str(task / "prompts.jsonl"), reward_fn=[f"{module}:{fn}"],
                output_dir=str(tmp_path / "run"), precision="fp32", batch_size=2, num_generations=2, total_steps=2,
                max_length=48, max_new_tokens=4, eval_size=2)
    with pytest.raises(UserError, match=rf"^--reward-fn {module}:{fn}: {match}"):
        grpo_main(args)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_grpo_nonfinite_loss_names_its_rows(tiny_model_dir, tmp_path, monkeypatch):
    from grpo import Args, GRPOTrainer
    task = _task(tmp_path)
    monkeypatch.syspath_prepend(str(task))
    t = GRPOTrainer(Args(model=tiny_model_dir, dataset=str(task / "prompts.jsonl"), reward_fn=["my_rewards:length"],
                         output_dir=str(tmp_path / "run"), precision="fp32", batch_size=2, num_generations=2,
                         total_steps=2, max_length=48, max_new_tokens=4, eval_size=2))
    loss = t.compute_loss
    def poisoned(m, b):  # the DAPO loss is a Mean: poison its total
        out = loss(m, b)
        out.loss.total = out.loss.total * torch.nan
        return out
    monkeypatch.setattr(t, "compute_loss", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss or gradient norm at step 1 \(rows \['.*prompts\.jsonl:\d+', "
                                        r"'.*prompts\.jsonl:\d+'\]\)"):
        t.train()


def test_eval_size_zero_logs_no_empty_eval_and_prints_no_empty_summary(tiny_model_dir, pairs_file, tmp_path, capsys):
    dpo_main(dpo_args(tiny_model_dir, pairs_file, tmp_path / "run", total_steps=2, eval_size=0))
    assert all(len(m) > 1 for m in read_metrics(tmp_path / "run"))  # no bare {"step": 0}
    assert "eval before -> after" not in capsys.readouterr().out


# --- subprocesses: two runs at once, SIGTERM in the step-0 eval, LoRA under FSDP --------------------------------------


GATED_REWARD = '''
import os, time
def gated(prompts, completions, **fields):
    gate = os.environ["SAFE_GATE"]
    if not os.path.exists(os.path.join(gate, "go")):  # the step-0 eval waits here until the test lets it go
        open(os.path.join(gate, "in_eval_%d" % os.getpid()), "w").close()
        t0 = time.time()
        while not os.path.exists(os.path.join(gate, "go")) and time.time() - t0 < 120:
            time.sleep(0.05)
    return [len(c) / 8 for c in completions]
'''


@pytest.mark.slow
def test_two_runs_at_once_then_sigterm_in_the_step_0_eval_then_resume(tiny_model_dir, tmp_path):
    """Two grpo.py runs started at once into one new directory: one is refused with one line (exit 2), the other
    holds it. SIGTERM while that one is in its step-0 eval: it stops before step 1, exit 0, its run.json and eval
    record kept. --resume starts fresh (nothing was saved), finishes and exports; LoRA raised no FutureWarning."""
    task = _task(tmp_path)
    (task / "gated_reward.py").write_text(GATED_REWARD)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = ENV | {"SAFE_GATE": str(gate), "PYTHONPATH": str(task)}
    out = tmp_path / "run"
    flags = [f"--model={tiny_model_dir}", f"--dataset={task / 'prompts.jsonl'}", "--reward-fn=gated_reward:gated",
             f"--output-dir={out}", "--precision=fp32", "--batch-size=2", "--num-generations=2", "--total-steps=3",
             "--max-length=48", "--max-new-tokens=4", "--eval-size=2", "--log-every=1", "--save-every=2",
             "--lora-r=4", "--lora-target-modules", "q_proj", "v_proj"]

    def launch(*extra):
        return subprocess.Popen([sys.executable, "grpo.py", *flags, *extra], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [launch(), launch()]
    t0 = time.time()
    while not (list(gate.glob("in_eval_*")) and any(p.poll() is not None for p in procs)):
        assert time.time() - t0 < 240, [p.poll() for p in procs]
        time.sleep(0.1)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    _, err = loser.communicate()
    assert loser.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: --output-dir {out}: another run (pid {winner.pid} on ")
    assert [p.name for p in gate.glob("in_eval_*")] == [f"in_eval_{winner.pid}"]
    winner.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    (gate / "go").touch()
    stdout, err = winner.communicate(timeout=120)
    assert winner.returncode == 0, err[-2000:]
    assert "SIGTERM: stopped before step 1 (nothing to save yet); relaunch the same command with --resume" in stdout
    assert json.loads((out / "run.json").read_text())["script"] == "grpo"
    assert [sorted(m) for m in read_metrics(out)] == [["eval/completions/mean_length", "eval/reward", "step"]]
    assert not (out / "checkpoints").exists() and not (out / "final").exists()

    r = launch("--resume")
    stdout, err = r.communicate(timeout=300)
    assert r.returncode == 0 and "starting fresh" in stdout, err[-2000:]
    assert "FutureWarning" not in err, err[-2000:]
    steps = [(m["step"], "eval" if "eval/reward" in m else "train" if "train/reward" in m else "samples")
             for m in read_metrics(out)]
    assert steps.count((0, "eval")) == 1 and [s for s, k in steps if k == "train"] == [1, 2, 3]
    assert (out / "final" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["grpo", "ppo"])
def test_lora_under_fsdp_runs_rl_scripts(tiny_model_dir, tmp_path, script):
    """The step-0 generation of a LoRA policy under FSDP (peft's generate skips a peft root's hooks): 2 ranks train,
    checkpoint, export the merged model and the adapter; no FutureWarning from peft on any rank."""
    task = _task(tmp_path)
    out = tmp_path / "run"
    flags = [f"--model={tiny_model_dir}", f"--dataset={task / 'prompts.jsonl'}", f"--output-dir={out}",
             "--precision=fp32", "--batch-size=2", "--total-steps=2", "--max-length=48", "--max-new-tokens=4",
             "--eval-size=2", "--save-every=2", "--strategy=fsdp", "--lora-r=8", "--lora-target-modules", "q_proj",
             "v_proj"]
    flags += (["--reward-fn=my_rewards:length", "--num-generations=2", "--beta=0.1"] if script == "grpo" else
              ["--reward-fn=my_rewards:length"])
    r = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={29571 + (script == 'ppo')}",
                        f"{script}.py", *flags], cwd=ROOT, env=ENV | {"PYTHONPATH": str(task)}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FutureWarning" not in r.stderr, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out) if any(k.startswith("eval/") for k in m)] == [0, 2]
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_sigterm_during_the_export_finishes_it(tiny_model_dir, pairs_file, tmp_path):
    """SIGTERM while final.tmp/ is being written (one process; torchrun x2 under FSDP, the signal to torchrun, which
    forwards it): the export finishes, final/ is whole and loads, no final.tmp/ is left, and the run says the signal
    came as it ended; one process exits 0 (torchrun's agent reports a signal with its own exit code; its workers
    finish within its 30 s grace)."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_flags
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        prefix = [sys.executable] if nproc == 1 else ["torchrun", "--nproc_per_node=2", "--master_port=29575"]
        flags = tiny_flags(tiny_model_dir, pairs_file, out, total_steps=2, save_every=2)
        p = subprocess.Popen(prefix + ["dpo.py", *flags] + (["--strategy=fsdp"] if nproc == 2 else []), cwd=ROOT,
                             env=ENV | {"CLEANRL_RLHF_TEST_EXPORT_DELAY": "4"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while not (out / "final.tmp" / "model.safetensors").exists():
            assert p.poll() is None and time.time() - t0 < 240, p.communicate()[1][-2000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
        if nproc == 1:
            assert p.returncode == 0, stderr[-2000:]
        assert f"exported {out / 'final'}" in stdout, (stdout[-2000:], stderr[-2000:])
        assert "SIGTERM: came as the run was ending" in stdout, stdout[-2000:]
        # torchrun's agent raises SignalException on the signal (its own traceback); the workers print none
        assert stderr.count("Traceback") == (nproc == 2 and "SignalException: Process" in stderr), stderr[-3000:]
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("final")) == ["final"]
        AutoModelForCausalLM.from_pretrained(out / "final")


# --- bad input that used to pass: --eval-dataset beside a built-in task, assistant-first prompts, empty lists ---------


def _builtin_task_args(script: str, model: str, out: Path, **kw):
    """Args of kto / distill / dpo / grpo on the built-in arithmetic task, tiny model, in-process."""
    import importlib
    base = dict(model=model, dataset="arithmetic", output_dir=str(out), precision="fp32", batch_size=2,
                total_steps=1, learning_rate=1e-3, max_length=64, seed=3)
    if script == "grpo":
        base |= dict(num_generations=2, max_new_tokens=4)
    if script == "distill":
        base |= dict(teacher=model, max_new_tokens=4)
    module = importlib.import_module(script)
    trainer = {"kto": "KTOTrainer", "distill": "DistillTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}[script]
    return getattr(module, trainer), module.Args(**(base | kw))


@pytest.mark.parametrize("script", ["kto", "distill", "dpo", "grpo"])
def test_eval_dataset_beside_a_builtin_task_is_read(tiny_model_dir, tmp_path, script):
    """--dataset arithmetic --eval-dataset FILE: a missing file, or one whose last line a kill cut short, is one line
    naming it (it was silently ignored for the task's own held-out split); nothing is written."""
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps({"prompt": "1 + 1?", "completion": "2", "label": True, "chosen": "2",
                                "rejected": "3"}) + '\n{"prompt": "2 + 2?", "compl')
    for path, match in [(tmp_path / "missing.jsonl", r"missing\.jsonl: no such file$"),
                        (torn, r"torn\.jsonl:2: malformed JSON")]:
        trainer, args = _builtin_task_args(script, tiny_model_dir, tmp_path / "run", eval_dataset=str(path))
        with pytest.raises(UserError, match=match) as e:
            trainer(args)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


ASSISTANT_FIRST = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "2 + 3?"}]


@pytest.mark.parametrize("script", ["kto", "distill", "dpo"])
def test_a_prompt_that_starts_with_an_assistant_turn_is_one_line(tiny_model_dir, tmp_path, script):
    good = [{"role": "user", "content": "1 + 1?"}]
    rows = [{"prompt": p, "completion": [{"role": "assistant", "content": "5"}], "label": True,
             "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}
            for p in (good, good, ASSISTANT_FIRST, good)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, args = _builtin_task_args(script, tiny_model_dir, tmp_path / "run", dataset=str(data), eval_size=0)
    with pytest.raises(UserError, match=r"rows\.jsonl:3: field 'prompt' starts with an assistant turn"):
        trainer(args)
    assert not (tmp_path / "run").exists()


def test_an_empty_list_completion_says_so(tiny_model_dir, tmp_path):
    from plumbing.data import check_text
    with pytest.raises(UserError, match=r"^rows\.jsonl:4: field 'completion' is an empty list \(expected a string or "
                                        r"a list of messages\)$"):
        check_text("rows.jsonl:4", "completion", [], roles=("assistant",))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 1?", "completion": " 2"}) + "\n" +
                    json.dumps({"prompt": "2 + 2?", "completion": []}) + "\n")
    from sft import SFTTrainer
    with pytest.raises(UserError, match=r"rows\.jsonl:2: field 'completion' is an empty list"):
        SFTTrainer(script_args("sft", tiny_model_dir, str(data), tmp_path / "run", eval_size=0, batch_size=1))


def test_mistyped_relative_path_is_one_line_at_once(tiny_model_dir, tmp_path, monkeypatch):
    """`--model nope/model` (a path without ./) and `--teacher nope/teacher` with no hub to ask: one line within
    seconds, not ~50 s of retries as a hub id. The hub is 'unreachable' twice: offline mode, and an endpoint whose
    host refuses connections."""
    from distill import DistillTrainer
    from huggingface_hub import constants
    monkeypatch.chdir(tmp_path)  # no nope/ here
    for offline, endpoint in [(True, constants.ENDPOINT), (False, "https://127.0.0.1:9")]:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        t0 = time.time()
        with pytest.raises(UserError, match=r"^--model nope/model: no such directory, and no hub id of that name in "
                                            r"the local hub cache"):
            DPOTrainer(dpo_args("nope/model", "arithmetic", tmp_path / "r1"))
        _, args = _builtin_task_args("distill", tiny_model_dir, tmp_path / "r2", teacher="nope/teacher")
        with pytest.raises(UserError, match=r"^--teacher nope/teacher: no such directory, and no hub id of that name"):
            DistillTrainer(args)
        assert time.time() - t0 < 8
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_lr_schedulers_are_checked_up_front(tiny_model_dir, pairs_file, tmp_path):
    """Every name transformers.get_scheduler knows is tried with warm-up steps and a total: the ones that run are
    exactly the accepted ones; the others (reduce_lr_on_plateau: a TypeError at step 1 after run.json and metrics
    were written) are one line listing the accepted ones, before anything is written."""
    from transformers import SchedulerType, get_scheduler
    works = []
    for name in SchedulerType:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        try:
            sched = get_scheduler(name.value, opt, num_warmup_steps=2, num_training_steps=10)
            for _ in range(3):
                opt.step()
                sched.step()
        except Exception:  # a TypeError (a metric to step on, a setting to give), a ValueError
            continue
        works.append(name.value)
    refused = sorted({s.value for s in SchedulerType} - set(works))
    assert {"reduce_lr_on_plateau", "warmup_stable_decay", "greedy"} <= set(refused) and "linear" in works
    for name in refused:
        with pytest.raises(UserError, match=rf"^--lr-scheduler {name}: not one of the schedules that need only "
                                            rf"warm-up steps and a total \(linear, cosine, "):
            DPOTrainer(dpo_args(tiny_model_dir, pairs_file, tmp_path / "run", lr_scheduler=name, warmup_steps=2))
    assert not (tmp_path / "run").exists()
    from common import LR_SCHEDULERS
    assert sorted(works) == sorted(LR_SCHEDULERS)  # the accepted ones are exactly those that run
    dpo_main(dpo_args(tiny_model_dir, pairs_file, tmp_path / "ok", lr_scheduler="inverse_sqrt", warmup_steps=1,
                      total_steps=2))


# --- the run's record: run.json lost, flags changed on --resume, the lock ---------------------------------------------


def _rewrite_trainer_state(ckpt: Path, edit) -> None:
    """Edit a checkpoint's trainer_state.json and keep its manifest true (as a checkpoint written so would be)."""
    path = ckpt / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["trainer_state.json"] = [path.stat().st_size, checkpoint.file_crc32(path)]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_lost_run_json_is_checked_against_the_checkpoint_then_rewritten(saved, tiny_model_dir, pairs_file, tmp_path,
                                                                       monkeypatch, capsys):
    """run.json deleted or replaced by {}: another script or model is still refused (one line naming the
    checkpoint's record, nothing written); the run itself resumes and run.json is rewritten, and said. A run from
    before run records (none in run.json or its checkpoints) resumes with a one-line warning."""
    from grpo import GRPOTrainer
    task = _task(tmp_path)
    monkeypatch.syspath_prepend(str(task))
    record = json.loads((saved / "run.json").read_text())
    for damage in ("deleted", "empty"):
        run = tmp_path / damage
        shutil.copytree(saved, run)
        if damage == "deleted":
            (run / "run.json").unlink()
        else:
            (run / "run.json").write_text("{}")
        before = snapshot(run)
        args = _grpo_resume_args(tiny_model_dir, task, run)
        with pytest.raises(UserError, match=r"^--output-dir .*: holds a dpo\.py run \(step_00000002/trainer_state\."
                                            r"json\); grpo\.py cannot resume it"):
            GRPOTrainer(args)
        other = str(shutil.copytree(tiny_model_dir, tmp_path / f"other_{damage}"))
        with pytest.raises(UserError, match=r"^--resume: --model .*other_\w+, but .* was started with --model .*tiny_"
                                            r"model\d* \(its step_00000002/trainer_state\.json\)"):
            DPOTrainer(dpo_args(other, pairs_file, run, total_steps=3, resume=True))
        assert snapshot(run) == before
        capsys.readouterr()
        dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=3, resume=True))
        out = capsys.readouterr().out
        assert f"run.json {'is missing' if damage == 'deleted' else 'is empty'}: checked against the record in " \
               f"step_00000002/trainer_state.json and rewritten" in out
        assert json.loads((run / "run.json").read_text()) == record
    run = tmp_path / "old"
    shutil.copytree(saved, run)
    (run / "run.json").unlink()
    _rewrite_trainer_state(run / "checkpoints" / "step_00000002", lambda s: s.pop("record"))
    capsys.readouterr()
    dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=3, resume=True))
    out = capsys.readouterr().out
    assert "warning: " in out and "no checkpoint holds a run record" in out and "resumed from" in out
    assert json.loads((run / "run.json").read_text()) == record


def test_resume_names_changed_flags_and_refuses_those_that_change_training(saved, tiny_model_dir, pairs_file,
                                                                          tmp_path, capsys):
    """--seed, --beta, --loss-type, --dataset, --precision, the global batch: refused in one line naming each, the
    directory untouched, unless --allow-changed-flags; run-management flags (--total-steps, --log-every) and another
    per-device batch at the same global batch are named and go ahead."""
    other_data = shutil.copy(pairs_file, tmp_path / "other_pairs.jsonl")
    cases = [(dict(seed=4), r"--seed 3 -> 4"), (dict(beta=0.2, loss_type="ipo"), r"--beta 0\.1 -> 0\.2, --loss-type "
                                                                                   r"sigmoid -> ipo"),
             (dict(precision="bf16"), r"--precision fp32 -> bf16"), (dict(batch_size=2), r"global batch 4 -> 2")]
    for kw, match in cases:
        run = tmp_path / f"run{len(kw)}{next(iter(kw))}"
        shutil.copytree(saved, run)
        before = snapshot(run)
        with pytest.raises(UserError, match=rf"^--resume: .*{match}.* since step_00000002: that changes what is "
                                            r"trained; resume with the checkpoint's values or pass "
                                            r"--allow-changed-flags$"):
            DPOTrainer(dpo_args(tiny_model_dir, pairs_file, run, total_steps=4, resume=True, **kw))
        assert snapshot(run) == before
    run = tmp_path / "data"
    shutil.copytree(saved, run)
    with pytest.raises(UserError, match=r"--dataset .*pairs\.jsonl -> .*other_pairs\.jsonl"):
        DPOTrainer(dpo_args(tiny_model_dir, str(other_data), run, total_steps=4, resume=True))
    capsys.readouterr()
    dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=3, log_every=2, resume=True, batch_size=2,
                      gradient_accumulation_steps=2))
    assert "--resume: changed since step_00000002: --total-steps 2 -> 3, --batch-size 4 -> 2, " \
           "--gradient-accumulation-steps 1 -> 2, --log-every 1 -> 2, --save-every 2 -> 0\n" in capsys.readouterr().out
    run = tmp_path / "allowed"
    shutil.copytree(saved, run)
    t = dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=3, save_every=2, resume=True, seed=4,
                          allow_changed_flags=True))
    assert t.global_step == 3
    assert "--resume: changed since step_00000002: --seed 3 -> 4, --total-steps 2 -> 3\n" in capsys.readouterr().out


def test_a_deleted_run_lock_does_not_let_a_second_run_in(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """The lock is on the output directory itself: deleting run.lock (its description) while a run holds the
    directory lets no second --resume start (both died on ENOENT); the holder is still named when the file is
    there."""
    run = tmp_path / "run"
    first = DPOTrainer(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, save_every=2))
    assert (run / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    (run / "run.lock").unlink()
    monkeypatch.setattr(checkpoint, "_HELD_LOCKS", {})  # as another process: its own open of the directory
    with pytest.raises(UserError, match=r"^--output-dir .*run: another run \(another process\) is using it"):
        DPOTrainer(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, resume=True))
    first.train()  # unharmed: trains, saves and exports, then lets go of the directory
    assert (run / "final" / "model.safetensors").exists()
    t = dpo_main(dpo_args(tiny_model_dir, pairs_file, run, total_steps=2, resume=True))
    assert t.global_step == 2


def test_run_json_records_the_reward_model(tiny_model_dir, tmp_path, monkeypatch):
    """ppo.py and online_dpo.py --reward-model: the judge is part of what a resume must share."""
    from online_dpo import Args as OnlineArgs, OnlineDPOTrainer
    from ppo import Args as PPOArgs, PPOTrainer
    rm = _reward_model_dir(tiny_model_dir, tmp_path / "rm")
    task = _task(tmp_path)
    common = dict(model=tiny_model_dir, dataset=str(task / "prompts.jsonl"), reward_model=str(rm), precision="fp32",
                  batch_size=2, total_steps=1, max_length=48, max_new_tokens=4, eval_size=2)
    for trainer, args in ((PPOTrainer, PPOArgs), (OnlineDPOTrainer, OnlineArgs)):
        out = tmp_path / trainer.script_name
        trainer(args(**common, output_dir=str(out))).release_output_dir()
        assert json.loads((out / "run.json").read_text())["reward_model"] == str(rm.resolve())


def _reward_model_dir(tiny_model_dir, d: Path) -> Path:
    """A one-output sequence classifier on the tiny model's backbone (what reward.py exports)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    config.pad_token_id = config.eos_token_id
    torch.manual_seed(7)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    return d


# --- FSDP x2: incomplete weights, a big teacher's memory plan, reward models on the meta device (one launch) ---------


def _damaged_models(tiny_model_dir, d: Path) -> dict[str, Path]:
    """The tiny model three ways incomplete: sharded safetensors with one shard deleted, model.safetensors cut in
    half, a cut pytorch_model.bin (tokenizers intact)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = {}
    for name in ("shard_deleted", "safetensors_cut", "bin_cut"):
        target = d / name
        shutil.copytree(tiny_model_dir, target)
        (target / "model.safetensors").unlink()
        if name == "shard_deleted":
            model.save_pretrained(target, max_shard_size="40KB")
            index = json.loads((target / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
            assert len(shards) >= 2, shards
            (target / shards[-1]).unlink()
        elif name == "safetensors_cut":
            shutil.copy(Path(tiny_model_dir) / "model.safetensors", target)
            with open(target / "model.safetensors", "r+b") as f:
                f.truncate(os.path.getsize(target / "model.safetensors") // 2)
        else:
            torch.save(model.state_dict(), target / "pytorch_model.bin")
            with open(target / "pytorch_model.bin", "r+b") as f:
                f.truncate(os.path.getsize(target / "pytorch_model.bin") // 2)
        out[name] = target
    return out


@pytest.mark.slow
def test_fsdp_x2_incomplete_weights_big_teacher_and_meta_reward_models(tiny_model_dir, tmp_path):
    """One torchrun launch, FSDP x2 (tests/fsdp_worker.py):
    - --model (dpo.py) and --teacher (distill.py) with a deleted shard, a cut model.safetensors, a cut
      pytorch_model.bin: one UserError naming the flag and the path, the same on both ranks (it was a traceback per
      rank, exit 1); the last one through run_main: exit 2 on both ranks, one error line;
    - distill.py with a 39M teacher: the plan counts the teacher's own bytes (half per rank) and its largest unit;
    - reward.py loads on the meta device, its new head seeded: the whole model equals one process's;
      ppo.py --reward-model loads the reward model on the meta device too."""
    from reward import Args as RewardArgs, RewardTrainer
    damaged = _damaged_models(tiny_model_dir, tmp_path / "damaged")
    teacher, n_teacher, layer = big_teacher_dir(tmp_path / "teacher")  # conftest: 39M parameters
    rm = _reward_model_dir(tiny_model_dir, tmp_path / "rm")
    small = dict(precision="fp32", batch_size=2, total_steps=1, max_length=64, dataset="arithmetic", strategy="fsdp")
    cases = []
    for name, path in damaged.items():
        cases.append(dict(name=f"model_{name}", script="dpo", trainer="DPOTrainer", kind="error",
                          args=small | dict(model=str(path), output_dir=str(tmp_path / f"m_{name}"))))
        cases.append(dict(name=f"teacher_{name}", script="distill", trainer="DistillTrainer", kind="error",
                          args=small | dict(model=tiny_model_dir, teacher=str(path), max_new_tokens=4,
                                            output_dir=str(tmp_path / f"t_{name}"))))
    reward_args = small | dict(model=tiny_model_dir, seed=5)
    cases += [dict(name="plan", script="distill", trainer="DistillTrainer", kind="plan",
                   args=small | dict(model=tiny_model_dir, teacher=str(teacher), max_new_tokens=4,
                                     output_dir=str(tmp_path / "plan"))),
              dict(name="reward", script="reward", trainer="RewardTrainer", kind="meta", patch="reward",
                   args=reward_args | dict(output_dir=str(tmp_path / "reward"))),
              dict(name="ppo", script="ppo", trainer="PPOTrainer", kind="meta", patch="rollout",
                   args=small | dict(model=tiny_model_dir, reward_model=str(rm), max_new_tokens=4,
                                     max_length=48, output_dir=str(tmp_path / "ppo")))]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    r = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29597", "tests/fsdp_worker.py",
                        str(tmp_path), str(tmp_path / "cases.json")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-4000:]
    assert "exitcode: 2" in r.stderr and "exitcode: -" not in r.stderr and "[rank" not in r.stderr, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank agreed on each error, plan and load
    got = ranks[0]
    for name, path in damaged.items():
        for flag, key in (("--model", f"model_{name}"), ("--teacher", f"teacher_{name}")):
            assert re.match(rf"{flag} {re.escape(str(path))}: could not load", got[key]), (key, got[key])
            assert "\n" not in got[key]
        assert not (tmp_path / f"m_{name}").exists() and not (tmp_path / f"t_{name}").exists()
    assert errors[0] == f"error: {got['teacher_bin_cut']}"  # the last error case, again through run_main
    plan = got["plan"]
    assert plan["reference"] == pytest.approx(4 * n_teacher / 2)  # the teacher's own size, sharded on 2 ranks
    assert plan["gathered"] == pytest.approx(4 * layer * 2)  # a teacher's layer, gathered: far above the student's
    assert got["reward"] == [["--model", True]]
    assert got["ppo"] == [["--reward-model", True]]  # (the policy and its reference: BaseTrainer's meta load)
    one = RewardTrainer(RewardArgs(**(reward_args | dict(strategy="ddp", output_dir=str(tmp_path / "reward1")))))
    fsdp = torch.load(tmp_path / "reward.pt")
    assert fsdp.keys() == dict(one.model.named_parameters()).keys()
    for n, p in one.model.named_parameters():
        torch.testing.assert_close(fsdp[n], p.detach(), msg=n)
    one.release_output_dir()
