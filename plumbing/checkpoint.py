"""What a run keeps on disk, and how it survives a kill or a full disk.

The run directory: runs/<script>-<time>/ holds run.json (what the run was started with; --resume must match it),
run.lock (who holds the directory's flock while a run uses it), metrics.jsonl (whole lines only), checkpoints/ and
final/.

checkpoints/step_N/ = dcp/ (model + optimizer, resharded on load), scheduler.pt, rng_rank*.pt, trainer_state.json
(the step, the data position, the flags, the run record, the open metric window), then manifest.json (size and crc32
of every file), then COMPLETE. Written to step_N.tmp/, fsynced, renamed; a failed
write removes the .tmp and stops the run with one line; older checkpoints stay. Everything is read back with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from plumbing.models import BUNDLED_MODEL
from plumbing.run import UserError, agree_on_error, barrier, first_error, is_main, os_error, print0

# ----------------------------------------------------------------------------------------------------------------------
# What the loop calls: save, resume (with the fallback to an older checkpoint); the export is plumbing/export.py


def dcp_state(model: nn.Module, optimizer, trainable_only: bool) -> dict:
    """Model and optimizer state for DCP: only what trains (a frozen LoRA base is the model on disk already;
    tied weights are in named_parameters once)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    if trainable_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd, "optimizer": optim_sd}


def save(output_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict, keep: int,
         trainable_only: bool) -> None:
    """checkpoints/step_N: model and optimizer (DCP), the scheduler, every rank's RNG, and `state` (JSON: the step,
    the position in the data order, ...)."""
    write_checkpoint(output_dir, step, dcp_state(model, optimizer, trainable_only), scheduler.state_dict(), state,
                     keep)


def resume(output_dir: Path, model: nn.Module, optimizer, scheduler, rank: int, trainable_only: bool,
           check=None) -> dict | None:
    """Load the newest complete checkpoint that passes its manifest and loads (a damaged one is named and the
    previous one tried) into model, optimizer, scheduler and this rank's RNG; drop the metrics records it will write
    again. `check(state, ckpt)` may refuse the checkpoint's saved state (UserError) before anything is loaded or
    rewritten. -> its saved `state`, or None (said) when there is no checkpoint: a fresh start."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    for ckpt in reversed(complete_checkpoints(output_dir)):
        loaded = read_checkpoint(ckpt, dcp_state(model, optimizer, trainable_only), rank)
        if loaded is None:
            continue
        dcp_loaded, scheduler_state, state, rng = loaded
        if check is not None:
            error = ""
            try:
                check(state, ckpt)
            except UserError as e:
                error = str(e)
            agree_on_error(error)
        set_state_dict(model, optimizer, model_state_dict=dcp_loaded["model"],
                       optim_state_dict=dcp_loaded["optimizer"], options=StateDictOptions(strict=False))
        scheduler.load_state_dict(scheduler_state)
        if rng is not None:  # absent when resuming on more ranks than saved: those keep the fresh seed
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], torch.cuda.current_device())
        _rollback_metrics(output_dir, state["global_step"])
        print0(f"resumed from {ckpt} at step {state['global_step']} (row {state['consumed_rows']} of the data order)")
        return state
    if complete_checkpoints(output_dir):
        raise UserError(f"--resume: no intact checkpoint in {output_dir}/checkpoints (see above); move them "
                        f"away to start fresh")
    print0(f"--resume: no complete checkpoint in {output_dir}/checkpoints, starting fresh")
    _rollback_metrics(output_dir, 0)
    return None


def _rollback_metrics(output_dir: Path, step: int) -> None:
    error = ""
    try:
        rollback_metrics(output_dir, step)
    except UserError as e:  # rank 0's disk: every rank stops with it
        error = str(e)
    agree_on_error(error)


def check_changed_flags(state: dict, ckpt: Path, args, world_size: int, state_flags: tuple[str, ...]) -> None:
    """--resume: one line naming every flag that differs from the checkpoint's; a change of a flag that changes what
    is trained (any but RUN_FLAGS; --batch-size and accumulation only where the global batch changes) is refused
    unless --allow-changed-flags. (Script, model, LoRA and state flags: the run record, checked already.)"""
    saved = state.get("args")
    if not isinstance(saved, dict):  # a checkpoint from before flags were saved
        return
    now = flag_values(args)
    # the run record's (checked already), and those that differ on every resume
    skipped = {"model", "lora_r", "lora_alpha", "lora_target_modules", *state_flags, "output_dir", "resume",
               "allow_changed_flags"}
    batch = ("batch_size", "gradient_accumulation_steps")
    changed, trained = [], []
    for k, v in now.items():
        if k in saved and k not in skipped and saved[k] != v:
            changed.append(f"--{k.replace('_', '-')} {_shown(saved[k])} -> {_shown(v)}")
            if k not in RUN_FLAGS and k not in batch:
                trained.append(changed[-1])
    if all(k in saved for k in batch):  # another per-device batch on another world size may keep the global one
        before = dataclasses.replace(args, **{k: saved[k] for k in batch}).rows_per_step(
            state.get("world_size", world_size))
        if before != (after := args.rows_per_step(world_size)):
            changed.append(f"global batch {before} -> {after}")
            trained.append(changed[-1])
    if trained and not args.allow_changed_flags:
        raise UserError(f"--resume: {', '.join(trained)} since {ckpt.name}: that changes what is trained; resume "
                        f"with the checkpoint's values or pass --allow-changed-flags")
    if changed:
        print0(f"--resume: changed since {ckpt.name}: {', '.join(changed)}")


RUN_FLAGS = frozenset({
    "total_steps", "output_dir", "resume", "allow_changed_flags", "log_every", "eval_every", "save_every",
    "keep_checkpoints", "track", "wandb_project", "gather_for_generation", "skip_nonfinite_steps", "strategy",
    "gradient_checkpointing", "trust_remote_code", "padding_free", "loss_chunk", "precompute_ref_logps",
    "env_timeout"})
"""flags that manage a run without changing what it trains (or change it only within float rounding: the layout,
recomputation and sharding): --resume may change them, and names them. Everything else, --precision and --seed
included, changes what is trained: --resume refuses a change unless --allow-changed-flags."""


def flag_values(args) -> dict:
    """The flags as JSON values (what a checkpoint saves and a resume compares)."""
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


def _shown(v) -> str:
    return "(not set)" if v is None else " ".join(map(str, v)) if isinstance(v, list) else str(v)


# ----------------------------------------------------------------------------------------------------------------------
# The run directory: its name, lock and run.json; whole metrics lines; what a failed write says

_HELD_LOCKS: dict[Path, Any] = {}  # run directories this process has locked (in-process tests build several trainers)


def write_failure(what: str, path, e: BaseException) -> str:
    """One line for a failed write: the OSError inside (DCP wraps each rank's failure in a CheckpointException),
    else the last line of what was raised, named a full disk when the disk is full (torch.save's zip writer reports
    ENOSPC as 'unexpected pos'). Call before the partial files are removed."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return str(os_error(what, path, x))
        failures = getattr(x, "failures", None)
        for f in (failures.values() if isinstance(failures, dict) else []):
            todo.append(f[0] if isinstance(f, tuple) else f)
        todo += [x.__cause__, x.__context__]
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    detail = last if getattr(e, "failures", None) else f"{type(e).__name__}: {last}"  # DCP's ends in the inner one
    with contextlib.suppress(OSError):
        probe = Path(path) if Path(path).exists() else Path(path).parent
        free = shutil.disk_usage(probe).free
        if free < 1 << 20:
            return f"{what} {path}: No space left on device (ENOSPC: {free} bytes free; {detail})"
    return f"{what} {path}: {detail}"


def append_line(path: Path, line: str) -> None:
    """Append one line whole or not at all: a write cut short (a full disk) is truncated away, so the file never
    ends in a torn record that a later --resume would have to parse."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def resolve_output_dir(output_dir: str | None, script: str, resume: bool) -> Path:
    """The run's directory (created later, once the inputs are validated). Never overwrites a run."""
    # the pid keeps two default runs started in the same second apart
    name = output_dir or f"runs/{script}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    if dist.is_initialized():  # ranks may straddle a second boundary: rank 0's name wins
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    out = Path(name)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out}: exists and is not a directory")
    if not resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise UserError(f"--output-dir {out}: already holds a run; pass --resume to continue it or choose "
                        f"another --output-dir (nothing was overwritten)")
    return out


def run_record(args, script: str, state_flags: tuple[str, ...] = ()) -> dict:
    """What a run was started with that a resume must share (output_dir/run.json): the script, the model, LoRA, and
    the script's `state_flags` (world-size-independent flags that change the saved state's shape)."""
    lora = {"lora_r": args.lora_r, "lora_alpha": (args.lora_alpha or 2 * args.lora_r) if args.lora_r else None,
            "lora_target_modules": sorted(args.lora_target_modules or ["all-linear"]) if args.lora_r else None}
    flags = {name: _resolved(getattr(args, name)) if name in MODEL_FLAGS else getattr(args, name)
             for name in state_flags}
    return json.loads(json.dumps({"script": script, "model": _resolved(args.model)} | lora | flags, default=str))


MODEL_FLAGS = ("reward_model",)  # state flags naming a model: recorded as absolute paths, like --model


def _resolved(model: str | None) -> str | None:
    path = Path(model).expanduser() if model else None
    return str(path.resolve()) if path is not None and model != BUNDLED_MODEL and path.exists() else model


def open_run_dir(out: Path, record: dict, resume: bool, is_main: bool):
    """Once the inputs are validated: rank 0 claims the run directory (claim_output_dir), every rank agrees on its
    error. -> the lock (rank 0) or None."""
    lock, error = None, ""
    if is_main:
        try:
            lock = claim_output_dir(out, record, resume)
        except UserError as e:
            error = str(e)
    agree_on_error(error)  # also the barrier: the directory exists for every rank
    return lock


class RunLock:
    """The flock a run holds on its output directory itself (an fd of the directory, which cannot be deleted from
    under the run as a lock file could); run.lock only describes the holder (pid, host) for the message of a second
    run. Closing the fd, or the process ending however it ends, drops the lock."""

    def __init__(self, fd: int):
        self.fd, self.closed = fd, False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def claim_output_dir(out: Path, record: dict, resume: bool) -> RunLock:
    """Rank 0, once the inputs are validated: create the run directory, lock it (one run at a time) and check or
    record what the run was started with (run.json; without a readable one, the newest checkpoint's copy of it).
    -> the lock: it lasts while it is open, and the OS drops it when the process ends however it ends, so a killed
    run never blocks the next one."""
    import fcntl
    import socket
    key = out.resolve()
    lock = _HELD_LOCKS.get(key)
    if lock is None or lock.closed:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(os.open(out, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            raise os_error("--output-dir", out, e) from None
        try:
            fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            try:
                holder = (out / "run.lock").read_text().strip()
            except OSError:  # deleted (or unreadable): the lock itself still holds
                holder = ""
            raise UserError(f"--output-dir {out}: another run ({holder or 'another process'}) is using it; wait for "
                            f"it to end or choose another --output-dir") from None
        except OSError as e:  # a filesystem without flock (some network mounts): run unlocked rather than never
            print0(f"warning: cannot lock {out} ({e.strerror}); make sure no other run uses it")
        try:
            (out / "run.lock").write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        except OSError as e:
            lock.close()
            raise os_error("--output-dir", out, e) from None
        _HELD_LOCKS[key] = lock
    try:
        # checked again under the lock: a run started at the same moment may have written since resolve_output_dir
        if not resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
            raise UserError(f"--output-dir {out}: already holds a run; pass --resume to continue it or choose "
                            f"another --output-dir (nothing was overwritten)")
        saved_path = out / "run.json"
        if resume and _check_resumed_record(out, saved_path, record):
            return lock
        tmp = saved_path.with_name(f"run.json.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, saved_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error("--output-dir", out, e) from None
    except UserError:
        release_lock(lock)
        raise
    return lock


def _check_resumed_record(out: Path, saved_path: Path, record: dict) -> bool:
    """--resume: the run there must be this one (check_run_record), judged by run.json, or when that is missing,
    unreadable or empty by the record saved in its newest checkpoint (then run.json is rewritten, and said); a run
    from before run records resumes unchecked with a warning. -> whether run.json is right as it is."""
    saved, why = None, "is missing"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
            why = "is empty" if saved == {} else "is not a JSON object"
        except (OSError, ValueError):
            why = "is unreadable"
    if isinstance(saved, dict) and saved:
        check_run_record(out, saved, record, "run.json")
        return all(saved.get(k) == v for k, v in record.items())
    ckpts = complete_checkpoints(out)
    if not ckpts:
        if why in ("is unreadable", "is not a JSON object"):
            raise UserError(f"{saved_path}: unreadable (what this run was started with); restore it or move the run "
                            f"away")
        return False  # nothing saved to continue: the run starts fresh and records itself
    for ckpt in reversed(ckpts):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # a damaged checkpoint: the next older one has the same record
        if isinstance(state, dict) and isinstance(state.get("record"), dict):
            check_run_record(out, state["record"], record, f"{ckpt.name}/trainer_state.json")
            print0(f"{saved_path} {why}: checked against the record in {ckpt.name}/trainer_state.json and rewritten")
            return False
    print0(f"warning: {saved_path} {why} and no checkpoint holds a run record (a run from before run records): "
           f"resuming without checking the script, model and LoRA it was started with; run.json rewritten")
    return False


def check_run_record(out: Path, saved: dict, record: dict, where: str = "run.json") -> None:
    """--resume continues the run that is there: the same script, model, LoRA and state-shaping flags, or one line
    naming both values (the saved weights would not fit, or would silently be another run's)."""
    if saved.get("script", record["script"]) != record["script"]:
        raise UserError(f"--output-dir {out}: holds a {saved['script']}.py run ({where}); {record['script']}.py "
                        f"cannot resume it. Start a new run, e.g. with --model {out / 'final'}")
    for key, value in record.items():
        if key in saved and saved[key] != value:
            flag = f"--{key.replace('_', '-')}"
            raise UserError(f"--resume: {flag} {_shown(value)}, but {out} was started with {flag} {_shown(saved[key])} "
                            f"(its {where}); resume with the same {flag} or choose another --output-dir")


def release_lock(lock) -> None:
    if lock is not None and not lock.closed:
        for key, held in list(_HELD_LOCKS.items()):
            if held is lock:
                del _HELD_LOCKS[key]
        lock.close()  # closing the directory's fd drops the flock


# ----------------------------------------------------------------------------------------------------------------------
# The format


def write_checkpoint(output_dir: Path, step: int, dcp_state: dict, scheduler_state: dict, state: dict,
                     keep: int) -> None:
    final = Path(output_dir) / "checkpoints" / f"step_{step:08d}"
    tmp, rank, error = final.with_name(final.name + ".tmp"), dist.get_rank() if dist.is_initialized() else 0, ""
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = str(os_error("checkpoint write failed:", tmp, e))
    agree_on_error(error)  # also the barrier: the directory exists for every rank
    try:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng_rank{rank}.pt")
        fsync(tmp / f"rng_rank{rank}.pt")  # each rank its own file: rank 0's fsync can't flush other nodes
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(dcp_state, checkpoint_id=tmp / "dcp")
        if rank == 0:
            torch.save(scheduler_state, tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps a rank's OSError in a BaseException
        error = write_failure("checkpoint write failed:", tmp, e)
    if not (error := first_error(error)):  # a collective: every rank has written its files
        if os.environ.get("CLEANRL_RLHF_TEST_SAVE_DELAY"):  # test hook: widen the window for a kill mid-save
            time.sleep(float(os.environ["CLEANRL_RLHF_TEST_SAVE_DELAY"]))
        try:
            if rank == 0:
                _seal(tmp, final, step, keep)
        except OSError as e:
            error = write_failure("checkpoint write failed:", tmp, e)
    if error and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    agree_on_error(error)
    barrier()


def _seal(tmp: Path, final: Path, step: int, keep: int) -> None:
    """Manifest (size + crc32 of every file), fsync, COMPLETE marker, rename; then retention."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    manifest = {str(f.relative_to(tmp)): [f.stat().st_size, file_crc32(f)] for f in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for f in files + [tmp / "manifest.json"]:  # durable before the marker claims completeness
        fsync(f)
    (tmp / "COMPLETE").write_text(str(step))
    fsync(tmp / "COMPLETE")
    if final.exists():  # same step saved again: retire the old copy marker-first
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync(final.parent)
    for old in complete_checkpoints(final.parent.parent)[:-keep]:
        remove_checkpoint(old)
    for stale in final.parent.glob("step_*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """step_N directories holding the COMPLETE marker (written last), oldest first; .tmp leftovers never count."""
    ckpts = sorted((Path(output_dir) / "checkpoints").glob("step_*"))
    return [c for c in ckpts if re.fullmatch(r"step_\d+", c.name) and (c / "COMPLETE").exists()]


def remove_checkpoint(path: Path) -> None:
    # the marker goes first: a kill mid-delete leaves an incomplete directory, never one that looks complete
    (path / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(ckpt: Path) -> str:
    """'' if every file the manifest lists is there with its size and crc32, else which file and why."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({type(e).__name__})"
    for name, (size, crc) in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
        if file_crc32(f) != crc:
            return f"{name} fails its checksum"
    return ""


def read_checkpoint(ckpt: Path, dcp_state: dict, rank: int):
    """-> (dcp_state filled in, scheduler state, trainer state, this rank's rng or None), or None (said why) if the
    checkpoint is damaged on any rank. Rank 0 verifies the manifest; then every rank loads."""
    why = verify_checkpoint(ckpt) if rank == 0 else ""
    if dist.is_initialized():
        box = [why]
        dist.broadcast_object_list(box, src=0)
        why = box[0]
    loaded = None
    if not why:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(dcp_state, checkpoint_id=ckpt / "dcp")
            state = json.loads((ckpt / "trainer_state.json").read_text())
            rng_file = ckpt / f"rng_rank{rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
            loaded = (dcp_state, torch.load(ckpt / "scheduler.pt", weights_only=True), state, rng)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not this checkpoint
            why = f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''})"
    whys = [why]
    if dist.is_initialized():
        whys = [None] * dist.get_world_size()
        dist.all_gather_object(whys, why)
    if any(whys):
        print0(f"warning: checkpoint {ckpt} is damaged: {next(w for w in whys if w)}; trying the previous one")
        return None
    return loaded


def rollback_metrics(output_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records that the resumed run writes again (after the checkpoint; all on a fresh start),
    and a torn record a kill or a full disk left mid-line (said, not fatal). Rewritten atomically."""
    metrics = Path(output_dir) / "metrics.jsonl"
    if not is_main() or not metrics.exists():
        return
    kept, torn = [], 0
    try:
        lines = metrics.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                torn += 1
                continue
            if step > 0 and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if torn:
            print0(f"warning: {metrics}: dropped {torn} unreadable record(s) (a write cut short by a kill or a full "
                   f"disk)")
        tmp = metrics.with_name(f"metrics.jsonl.tmp{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, metrics)
    except OSError as e:
        metrics.with_name(f"metrics.jsonl.tmp{os.getpid()}").unlink(missing_ok=True)
        raise os_error("--resume: cannot rewrite", metrics, e) from None


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc
