"""The metrics line's memory and data-wait figures (CPU branch; the CUDA branch runs in gpu_check)."""

from __future__ import annotations

import time

import torch

from pretrain.metrics import StepMeter, memory_figures, resident_bytes


def test_cpu_memory_is_the_resident_set():
    figures = memory_figures(torch.device("cpu"))
    assert set(figures) == {"memory_gb", "memory_rss_gb"}
    assert 0 < figures["memory_rss_gb"] <= figures["memory_gb"] + 1e-3, "current <= lifetime peak"
    assert resident_bytes() > 10 * 2**20


def test_report_resets_the_interval():
    meter = StepMeter(global_batch=8, world_size=1, flops_per_image=1e9, peak_tflops=0.0)
    meter.data_wait(0.01)
    time.sleep(0.02)
    meter.step_done()
    first = meter.report()
    assert 0 < first["data_wait_fraction"] < 1 and "mfu" not in first and "memory_rss_gb" in first
    meter.step_done()
    assert meter.report()["data_wait_fraction"] == 0.0, "data-wait is per interval"


FRAGMENTED = """
import torch
from pretrain.metrics import release_free_host_memory, resident_bytes
torch.set_num_threads(1)
# 3000 tensors of 64 KiB (malloc'd from the arena, below glibc's mmap threshold), every tenth kept:
# free() cannot shrink an arena whose top is still in use, so the freed 170 MiB stay resident.
kept, tensors = [], [torch.ones(16384) for _ in range(3000)]
kept = tensors[::10]
del tensors
before = resident_bytes()
assert release_free_host_memory()
print(before - resident_bytes())
"""


def test_release_free_host_memory_returns_what_malloc_kept_free() -> None:
    import subprocess
    import sys

    from tests.helpers.launch import REPO

    proc = subprocess.run(
        [sys.executable, "-c", FRAGMENTED], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 100 * 2**20  # most of the ~170 MiB freed comes back


def test_host_memory_trim_runs_on_cpu_devices_only_and_keeps_update_trims_within_one_percent() -> None:
    from pretrain.metrics import HostMemoryTrim

    assert not HostMemoryTrim(torch.device("cuda")).enabled
    trim = HostMemoryTrim(torch.device("cpu"))
    assert trim.enabled
    trim.now()  # after a save or an evaluation: not charged to the updates' budget
    assert trim._spent == 0.0
    trim.before_update()  # the first update trims
    first = trim._spent
    assert first > 0
    trim.before_update()  # at once again: the trims have had more than 1% of the time since
    assert trim._spent == first
    trim._since -= 200 * first  # as if 200x the first trim's duration had passed since the first update
    trim.before_update()
    assert trim._spent > first
    for _ in range(1000):  # an update loop of no work: trims stay within 1% of its time
        trim.before_update()
    assert trim._spent <= trim.BUDGET * (time.monotonic() - trim._since) + 2 * first
