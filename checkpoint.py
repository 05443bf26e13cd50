"""The on-disk format of checkpoints; no algorithm script needs to read this.

checkpoints/step_N/ = dcp/ (model + optimizer, resharded on load), scheduler.pt, rng_rank*.pt, trainer_state.json,
then manifest.json (size and crc32 of every file), then COMPLETE. Written to step_N.tmp/, fsynced, renamed; a failed
write removes the .tmp and stops the run with one line; older checkpoints stay. Everything is read back with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from common import agree_on_error, barrier, first_error, is_main, os_error, print0, write_failure


def write_checkpoint(output_dir: Path, step: int, dcp_state: dict, scheduler_state: dict, state: dict,
                     keep: int) -> None:
    import torch.distributed.checkpoint as dcp
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
    import torch.distributed.checkpoint as dcp
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
