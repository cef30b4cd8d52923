"""Throughput, MFU, data-wait and memory bookkeeping for the metrics line and MLflow.

Data-wait is the host's time inside `next(batches)`. The loaders hand over batches without a
host-device sync (pinned memory, non_blocking copies, DALI outputs on torch's stream), so that time is
the input pipeline's own: the host no longer waits there for the GPU to finish the previous step. The
host runs ahead of the GPU between log steps; the wall time of an interval is right because every log
step ends in a sync (the loss `.item()` in the trainer), so the figures are interval averages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 2**30


@dataclass
class StepMeter:
    """Accumulates wall time between two metric reports; `report()` returns the figures and resets."""

    global_batch: int
    world_size: int
    flops_per_image: float  # forward + backward, 3 x 2 x multiply-accumulates
    peak_tflops: float  # per device; 0 disables MFU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _t0: float = field(default_factory=time.perf_counter)
    _data_s: float = 0.0
    _steps: int = 0

    def data_wait(self, seconds: float) -> None:
        """Host seconds spent waiting for a batch (measured around `next()` by the trainer)."""
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
            **memory_figures(self.device),
        }
        if self.peak_tflops > 0:
            out["mfu"] = tflops / self.peak_tflops
        self._t0, self._data_s, self._steps = now, 0.0, 0
        return out


def memory_figures(device: torch.device, reset: bool = True) -> dict[str, float]:
    """Memory of this rank since the last call, GiB.

    CUDA: peak allocated (`memory_gb`, also `memory_allocated_peak_gb`) and peak reserved by torch's
    caching allocator since the previous report (the peaks are reset here, so each log interval shows
    its own), and the device's used memory (`cudaMemGetInfo`: every process and every allocation outside
    torch's allocator: CUDA context, NCCL buffers, DALI's nvJPEG buffers). CPU: the process's peak
    resident set (`memory_gb`; the kernel keeps one lifetime peak, it cannot be reset) and the current
    resident set.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.max_memory_allocated(device) / GIB
        out = {
            "memory_gb": allocated,
            "memory_allocated_peak_gb": allocated,
            "memory_reserved_peak_gb": torch.cuda.max_memory_reserved(device) / GIB,
            "memory_device_used_gb": (total - free) / GIB,
        }
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    out = {"memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss: KiB
    rss = resident_bytes()
    if rss is not None:
        out["memory_rss_gb"] = rss / GIB
    return out


def resident_bytes() -> int | None:
    """The current resident set of this process (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


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


# ==================================================================================================== host memory


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or no libc found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_host_memory() -> bool:
    """Hand the pages that malloc keeps free back to the OS (glibc's malloc_trim); False where unavailable.

    On a CPU training device the model states and their temporaries are malloc'd host memory, and glibc
    keeps what is freed in its arenas: measured with benchmarks/memory_breakdown.py on CoAtNet-5 (2 CPU
    ranks), 1.9 GiB per rank held free, 25% of the resident set; trimming at phase boundaries took
    the resident set from 7.6-7.7 to 5.8 GiB and a step's peak from 9.5-9.6 to 7.9-8.6 GiB.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HostMemoryTrim:
    """Releases malloc's free host memory on a CPU training device: at once (`now`) after the build, a
    save, a load or an evaluation, and before an optimizer update, where a step peaks (fp32 gradients and
    Adam's temporaries on top of everything), as long as the update trims so far took at most `BUDGET` of
    the time since the first update (a trim took 0.01-0.14 s on CoAtNet-5: every step there; a model
    whose steps take milliseconds trims every ~100th). A budget over the whole run, not a pause after each
    trim: one slow trim (after a save freed gigabytes) must not skip the next updates, which peak the
    same. Does nothing on GPUs, where the tensors live in the device's own allocator."""

    BUDGET = 0.01

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cpu" and _malloc_trim() is not None
        self._since: float | None = None  # monotonic time of the first `before_update`
        self._spent = 0.0  # seconds the update trims took

    def _trim(self) -> float:
        t0 = time.monotonic()
        release_free_host_memory()
        return time.monotonic() - t0

    def now(self) -> None:
        if self.enabled:
            self._trim()

    def before_update(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._since = now if self._since is None else self._since
        if self._spent <= self.BUDGET * (now - self._since):
            self._spent += self._trim()
