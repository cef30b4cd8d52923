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
