"""Processes and ranks: torchrun's environment, one-line errors, pre-emption signals, seeding."""
from __future__ import annotations

import atexit
import contextlib
import errno
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad flags, paths or data: reported as one line naming the culprit, never as a traceback."""


def os_error(what: str, path, e: OSError) -> UserError:
    name = errno.errorcode.get(e.errno, "?") if e.errno else type(e).__name__
    return UserError(f"{what} {path}: {e.strerror or e} ({name})")


def first_line(e: BaseException) -> str:
    """`Type: the first line of its message`, for one-line errors about other people's code and files."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK), else a single process. nccl on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*a, **kw) -> None:
    if is_main():
        print(*a, **kw, flush=True)


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar on rank 0 for phases longer than a few seconds; it disappears when done."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not is_main(), leave=False, dynamic_ncols=True)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def all_ranks(share: dict) -> dict:
    """Every rank's dict merged (each rank contributes its own keys)."""
    if not dist.is_initialized():
        return share
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, share)
    return {k: v for s in shares for k, v in s.items()}


def first_error(error: str) -> str:
    """Ranks that may fail differently (their own rows, their own disk) agree: the first rank's error, or ''."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def agree_on_error(error: str) -> None:
    """Every rank raises the first rank's error, so none waits forever in a collective and rank 0 can say why."""
    if error := first_error(error):
        raise UserError(error)


class NonFiniteUpdates:
    """--skip-nonfinite-steps: an update whose (synced) gradient norm is not finite is skipped, said, counted; one more
    than allowed stops the run with one line naming the step and its rows."""

    def __init__(self, allowed: int):
        self.allowed, self.skipped = allowed, 0

    def skip(self, grad_norm: torch.Tensor, step: int, sources: list[str]) -> bool:
        if torch.isfinite(grad_norm):
            return False
        self.skipped += 1
        where = f"at step {step} (rows {sources[:8]})"
        if self.skipped > self.allowed:
            raise UserError(f"non-finite loss or gradient norm {where}; nothing was updated, the last checkpoint is "
                            f"intact (--skip-nonfinite-steps tolerates a few)")
        print0(f"warning: non-finite loss or gradient norm {where}: update skipped ({self.skipped}/{self.allowed})")
        return True


# ----------------------------------------------------------------------------------------------------------------------
# Pre-emption: SIGTERM, SIGUSR1 (Slurm) and SIGINT (Ctrl-C) are recorded, never fatal; the loop stops after the step
# in flight, saves and exits 0.

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_signalled: list = [None]  # the name of the first signal received while handlers are installed
_installed = [0]


@contextlib.contextmanager
def catch_preemption():
    """Record the pre-emption signals instead of dying (re-entrant: run_main installs it for the whole run, the loop
    again for in-process use). Yields a one-item list holding the signal's name once one came."""
    if _installed[0]:
        _installed[0] += 1
        try:
            yield _signalled
        finally:
            _installed[0] -= 1
        return
    _signalled[0] = None
    old = {sig: signal.signal(sig, _record) for sig in PREEMPTION_SIGNALS}
    _installed[0] = 1
    try:
        yield _signalled
    finally:
        _installed[0] = 0
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _record(signum, _frame) -> None:
    if _signalled[0] is not None and signum == signal.SIGINT:  # a second Ctrl-C: the user means now
        print(f"\n{signal.Signals(signum).name} again: stopping at once (the last checkpoint is intact)",
              file=sys.stderr, flush=True)
        os._exit(130)
    _signalled[0] = _signalled[0] or signal.Signals(signum).name


def any_rank_signalled(signalled: list, device) -> bool:
    """One tiny all-reduce per step, so all ranks stop after the same step."""
    flag = torch.tensor([float(signalled[0] is not None)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run_main(fn) -> None:
    """Call fn() with the pre-emption signals caught from the first line on (a signal while the model loads stops the
    run before step 1, exit 0); turn a UserError into one line on stderr and exit code 2."""
    code = 0
    try:
        with catch_preemption():
            fn()
        barrier()  # ranks tear the process group down together: gloo can abort when one leaves mid-way
    except UserError as e:
        if is_main():  # every rank sees the same bad input: one line, not one per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            # gloo's worker threads can still be joinable when the interpreter finalizes, which aborts the process
            # (SIGABRT) after a run that finished well: leave without finalizing, everything written and flushed,
            # after the atexit handlers (profilers, loggers, the benchmarks' memory probes) have run
            if sys.exc_info()[0] is None:
                atexit._run_exitfuncs()
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
    if code:
        sys.exit(code)


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """TimeoutError in the main thread after `seconds` (SIGALRM; elsewhere no limit)."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds:g} s (--env-timeout)")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def stopwatch(device: torch.device):
    """Each call returns the seconds since the previous one (CUDA work finished first): per-phase times."""
    last = time.perf_counter()

    def lap() -> float:
        nonlocal last
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, last = now - last, now
        return elapsed
    return lap
