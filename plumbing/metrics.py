"""Metrics: exact means over micro-batches, steps and ranks (`MetricWindow`), and where they go (`RunLog`):
output_dir/metrics.jsonl (one JSON object per event, whole lines only), wandb with --track, the console."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plumbing.checkpoint import append_line
from plumbing.run import os_error, print0


class MetricWindow:
    """Totals and counts of metrics; `reduce` sums them across ranks with ONE all-reduce, then divides. A value with
    `.total` and `.count` (common.Mean) adds both; a plain number adds number x weight and weight."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.samples = self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict, weight: float, tokens: float = 0.0) -> None:
        for k, v in metrics.items():
            total, count = (v.total, v.count) if hasattr(v, "count") else (float(v) * weight, weight)
            scalar = lambda x: float(x.detach()) if torch.is_tensor(x) else float(x)  # a metric may carry a graph
            self.totals[k] = self.totals.get(k, 0.0) + scalar(total)
            self.counts[k] = self.counts.get(k, 0.0) + scalar(count)
        self.samples += weight
        self.tokens += tokens

    def means(self) -> dict[str, tuple[float, float]]:
        """This window's metrics as (total, count), to be added to another window exactly."""
        return {k: (self.totals[k], self.counts[k]) for k in self.totals}

    def state(self, device) -> dict:
        """The window summed over ranks (one all-reduce; every rank holds the same keys), for a checkpoint: restored
        on one rank (`restore`), a resumed run's next record averages exactly the steps an uninterrupted run's does."""
        keys = sorted(self.totals)
        values = [self.totals[k] for k in keys] + [self.counts[k] for k in keys] + [self.samples, self.tokens]
        vec = torch.tensor(values, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(vec)
        v, n = vec.tolist(), len(keys)
        return {"totals": dict(zip(keys, v[:n])), "counts": dict(zip(keys, v[n:2 * n])), "samples": v[-2],
                "tokens": v[-1], "elapsed": time.perf_counter() - self.start}

    @classmethod
    def restore(cls, state: dict, is_main: bool) -> MetricWindow:
        """A saved window: its sums on rank 0, zeros under the same keys elsewhere (reduce sums over ranks); its
        clock as if it had run on."""
        w = cls()
        w.totals = {k: float(v) if is_main else 0.0 for k, v in state["totals"].items()}
        w.counts = {k: float(v) if is_main else 0.0 for k, v in state["counts"].items()}
        w.samples, w.tokens = (float(state["samples"]), float(state["tokens"])) if is_main else (0.0, 0.0)
        w.start -= float(state.get("elapsed", 0.0))
        return w

    def reduce(self, device, rates: bool = True, samples_per_s: str = "samples_per_s") -> dict[str, float]:
        keys = sorted(self.totals)
        values = [self.totals[k] for k in keys] + [self.counts[k] for k in keys] + [self.samples, self.tokens]
        vec = torch.tensor(values, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(vec)
        n = len(keys)  # a mean over nothing (no row of a class, no loss token in the window) is undefined: left out
        out = {k: (vec[i] / vec[n + i]).item() for i, k in enumerate(keys) if vec[n + i] > 0}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if rates and vec[-1] > 0:  # throughput is summed over ranks
            out["tokens_per_s"] = vec[-1].item() / elapsed
            out[samples_per_s] = vec[-2].item() / elapsed
        return out


class RunLog:
    """metrics.jsonl, wandb and the console of one run; only rank 0 writes."""

    def __init__(self, output_dir: Path, is_main: bool):
        self.path, self.is_main = Path(output_dir) / "metrics.jsonl", is_main
        self.wandb, self.wandb_id, self.bar = None, None, None

    def start(self, args, run_name: str, total: int, initial: int, desc: str) -> None:
        """wandb (with --track; a resumed run continues its wandb run) and the progress bar."""
        if self.is_main and args.track:
            import dataclasses

            import wandb
            self.wandb = wandb.init(project=args.wandb_project, config=dataclasses.asdict(args), name=run_name,
                                    dir=str(self.path.parent), id=self.wandb_id, resume="allow")
            self.wandb_id = self.wandb.id
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, disable=not self.is_main, dynamic_ncols=True, desc=desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # ends the bar's line, so an error message starts on its own
            self.bar = None

    def finish(self, first: dict | None, last: dict | None, keys: tuple[str, ...]) -> None:
        """The end of a run: the eval metrics `keys` as "before -> after", and the wandb run closed."""
        summary = [f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in keys if first and last and k in first and k in last]
        if summary:
            print0("eval before -> after: " + ", ".join(summary))
        if self.wandb is not None:
            self.wandb.finish()

    def log(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        """One record {"step", "prefix/key": value, ...} in metrics.jsonl and wandb, and one console line."""
        if not self.is_main:
            return
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        try:
            append_line(self.path, json.dumps(record))
        except OSError as e:
            raise os_error("cannot write", self.path, e) from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        line = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self.write(f"[{prefix} step {step}] {line}")

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """Rows of text (sampled replies) as a record in metrics.jsonl and a wandb table."""
        if not self.is_main or not rows:
            return
        self.log(step, {name: rows}, "train")
        if self.wandb is not None:
            import wandb
            columns = list(rows[0])
            self.wandb.log({f"train/{name}_table": wandb.Table(columns=columns,
                                                               data=[[r[c] for c in columns] for r in rows])},
                           step=step)

    def write(self, line: str) -> None:
        """print on rank 0, above the progress bar if there is one."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print0(line)
