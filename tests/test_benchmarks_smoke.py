"""benchmarks/engine_overhead.py runs end to end (2 timed steps) and its figures hang together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO


@pytest.mark.slow
@pytest.mark.multiprocess
def test_engine_overhead_benchmark_compares_zero3_with_plain(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "engine_overhead.py"), "--steps", "2", "--warmup", "1"]
    cmd += ["--repeats", "1", "--batch", "4", "--image-size", "32", "--num-classes", "10", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio ZeRO-3 / plain (2 threads" in proc.stdout and "load average" in proc.stdout
    fig = json.loads(out.read_text())
    for key in ("plain_2threads_s", "plain_1thread_s", "zero3_s"):
        assert 0 < fig[key] < 60, (key, fig[key])
    assert fig["ratio_vs_plain_2threads"] == pytest.approx(fig["zero3_s"] / fig["plain_2threads_s"])
    assert fig["ratio_vs_plain_1thread"] == pytest.approx(fig["zero3_s"] / fig["plain_1thread_s"])
    # With persistence threshold 0 every parameter is partitioned: each of the 2 ranks holds about half of
    # the bf16 weights and of the fp32 master + AdamW state (padding to the world size adds a few elements).
    for held in fig["zero3_param_bytes_per_rank"]:
        assert held / fig["plain_param_bytes"] == pytest.approx(0.5, abs=0.01)
    for held in fig["zero3_optimizer_bytes_per_rank"]:
        assert held / fig["plain_optimizer_bytes"] == pytest.approx(0.5, abs=0.01)
