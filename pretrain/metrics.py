"""Throughput, MFU, data-wait and memory bookkeeping for the metrics line and MLflow."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class StepMeter:
    """Accumulates wall time between two metric reports; `report()` returns the figures and resets."""

    global_batch: int
    world_size: int
    flops_per_image: float  # forward + backward, 3 x 2 x multiply-accumulates
    peak_tflops: float  # per device; 0 disables MFU
    _t0: float = field(default_factory=time.perf_counter)
    _data_s: float = 0.0
    _steps: int = 0

    def data_wait(self, seconds: float) -> None:
        self._data_s += seconds

    def step_done(self) -> None:
        self._steps += 1

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        steps = max(self._steps, 1)
        images_s = self.global_batch * steps / elapsed
        tflops = images_s * self.flops_per_image / 1e12 / self.world_size  # per device
        out = {
            "step_time_s": elapsed / steps,
            "images_per_s": images_s,
            "images_per_s_per_device": images_s / self.world_size,
            "data_wait_fraction": min(1.0, self._data_s / elapsed),
            "tflops_per_device": tflops,
            "memory_gb": peak_memory_gb(),
        }
        if self.peak_tflops > 0:
            out["mfu"] = tflops / self.peak_tflops
        self._t0, self._data_s, self._steps = now, 0.0, 0
        return out


def peak_memory_gb() -> float:
    """Peak accelerator memory on GPUs; the process's peak resident set on CPUs."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}d{hours:02d}h{minutes:02d}m" if days else f"{hours:d}:{minutes:02d}:{secs:02d}"


class MetricsFile:
    """Rank 0's metrics.jsonl in the run folder: one JSON line per log step (plain, grep-able, diff-able)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")


class NullMetricsFile:
    def write(self, step: int, metrics: dict[str, float]) -> None:
        pass
