"""benchmarks/model_speed.py runs end to end (tiny model, one step) and reports sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.model import count_macs, create_model
from tests.helpers.launch import REPO

TINY = json.dumps({"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16})


def run_benchmark(tmp_path: Path, *flags: str) -> tuple[str, list[dict]]:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "model_speed.py"), "--image-size", "64"]
    cmd += ["--batch-size", "2", "--steps", "1", "--matmul-seconds", "0.1", *flags]
    cmd += ["--overrides", TINY, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: see test_model.py's _single_thread
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_model_speed_benchmark_reports_every_configuration(tmp_path):
    stdout, rows = run_benchmark(tmp_path, "--dtypes", "bf16")
    assert "img/s" in stdout and "ratio" in stdout
    assert [(r["dtype"], r["mode"], r["checkpointing"]) for r in rows] == [
        ("bf16", "train", False),
        ("bf16", "train", True),
        ("bf16", "infer", False),
    ]
    # Training FLOPs per image are 6x the MACs (forward 2x, backward twice the forward); torch's own
    # backward count would be far higher, as it ignores the groups of depthwise convs. Inference: 2x.
    macs = count_macs(create_model("coatnet_0", image_size=64, **json.loads(TINY))).macs
    for r in rows:
        per_mac = 6 if r["mode"] == "train" else 2
        assert abs(r["gflops"] * 1e9 / r["images_per_s"] / (per_mac * macs) - 1) < 1e-6
        assert r["images_per_s"] > 0 and r["gflops"] > 0 and r["matmul_gflops"] > 0
        assert 0 < r["ratio_to_matmul"] < 1.5
        assert r["peak_rss_mib"] > r["rss_growth_mib"] >= 0
        assert r["mask"] == "4d" and r["compiled"] is False


@pytest.mark.slow  # four worker processes, two of them compiling
def test_model_speed_benchmark_compares_mask_layouts_and_compilation(tmp_path):
    flags = ["--dtypes", "fp32", "--modes", "infer", "--masks", "4d", "3d", "--compile"]
    stdout, rows = run_benchmark(tmp_path, *flags, "--compile-backend", "aot_eager")
    assert [(r["compiled"], r["mask"]) for r in rows] == [
        (False, "4d"),
        (False, "3d"),
        (True, "4d"),
        (True, "3d"),
    ]
    assert "4d mask vs 3d: fp32 infer ckpt=off mask=4d compiled=False:" in stdout
    assert "compiled vs eager: fp32 infer ckpt=off mask=4d compiled=True:" in stdout
    assert all(r["images_per_s"] > 0 and r["warmup_s"] > 0 for r in rows)
    # Interleaved: both layouts measured in one process, steps alternating between them.
    flags = ["--dtypes", "fp32", "--modes", "infer", "--masks", "3d", "4d", "--interleave"]
    _, rows = run_benchmark(tmp_path, *flags)
    assert [r["mask"] for r in rows] == ["3d", "4d"]
    assert rows[0]["peak_rss_mib"] == rows[1]["peak_rss_mib"] and len(rows[0]["step_times_s"]) == 1
