"""benchmarks/engine_overhead.py, memory_breakdown.py, checkpoint_speed.py and data_speed.py run end to end and their figures hang together."""

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


@pytest.mark.slow
@pytest.mark.multiprocess
def test_memory_breakdown_holds_what_the_planner_counts_and_the_canary_adds_no_moment_copy(tmp_path):
    """CoAtNet-5's widths with one block per stage (74.8M parameters) on 2 ranks, phase by phase."""
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "memory_breakdown.py"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fig = json.loads(out.read_text())
    planned, gib = fig["planner_gib"], 2**30
    for rank in fig["phases"]:
        phases = {row["phase"]: row for row in rank}
        held = phases["load_checkpoint"]["held"]
        assert held["bf16 param partitions"] / gib == pytest.approx(planned["bf16 params"], rel=0.05)
        assert held["grad partition buffer"] / gib == pytest.approx(planned["bf16 grads"], rel=0.05)
        master_adam = held["fp32 master partitions"] + held["Adam moments"]
        assert master_adam / gib == pytest.approx(planned["fp32 master + Adam"], rel=0.05)
        # The canary's sums of the Adam moments: at most a chunk's temporaries, never a moment-sized copy
        # (it was 12 bytes per moment element, 1.5x the moments: 4.1 GB per rank for CoAtNet-5 on 2 ranks).
        before = phases["step 2 optimizer step"]["rss"]
        assert phases["canary: Adam moments' sums"]["peak"] - before < held["Adam moments"] / 2


@pytest.mark.slow
def test_checkpoint_benchmark_prints_the_ratios_and_leaves_committed_checkpoints(tmp_path):
    import re

    from pretrain.checkpoint import HASH_KEY, POINTER, checksum_mismatches, read_manifest

    cmd = [sys.executable, str(REPO / "benchmarks" / "checkpoint_speed.py"), "--model", "coatnet_0"]
    cmd += ["--image-size", "64", "--repeat", "1", "--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "ratio: training blocked" in x)
    blocked, asynchronous, synchronous = (float(v) for v in re.findall(r"\d+\.\d+", line)[:3])
    assert min(blocked, asynchronous, synchronous) > 0, line
    assert "load average at the end" in proc.stdout
    for kind in ("sync", "async"):  # each manager's last save is committed, with today's digest
        tag = tmp_path / kind / (tmp_path / kind / POINTER).read_text().strip()
        assert all(HASH_KEY in entry for entry in read_manifest(tag)["files"].values())
        assert checksum_mismatches(tag) == []


@pytest.mark.slow
def test_data_benchmark_compares_dali_with_pil_and_splits_dali_time_by_stage():
    import re

    cmd = [sys.executable, str(REPO / "benchmarks" / "data_speed.py"), "--images", "512", "--batches", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio DALI 2 threads / PIL 2 workers:" in proc.stdout and "load average" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "cut after each stage" in x)
    found = re.search(
        r"crop-decode (\d+) images/s, \+ resize (\d+), \+ flip/normalise (\d+): the resize is (\d+)%", line
    )
    assert found, line
    decode, resize, normalise, share = (int(v) for v in found.groups())
    assert decode > resize and decode > normalise and 0 < share < 100, line  # each cut does less work
