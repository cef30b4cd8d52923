"""benchmarks/model_speed.py runs end to end (tiny model, one step) and reports sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pretrain.model import count_macs, create_model
from tests.helpers.launch import REPO


def test_model_speed_benchmark_reports_every_configuration(tmp_path):
    out = tmp_path / "speed.json"
    tiny = json.dumps({"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16})
    cmd = [sys.executable, str(REPO / "benchmarks" / "model_speed.py"), "--image-size", "64"]
    cmd += ["--batch-size", "2", "--steps", "1", "--matmul-seconds", "0.1", "--dtypes", "bf16"]
    cmd += ["--overrides", tiny, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: see test_model.py's _single_thread
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stdout and "ratio" in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["checkpointing"]) for r in rows] == [("bf16", False), ("bf16", True)]
    # Training FLOPs per image are 6x the MACs (forward 2x, backward twice the forward); torch's own
    # backward count would be far higher, as it ignores the groups of depthwise convs.
    macs = count_macs(create_model("coatnet_0", image_size=64, **json.loads(tiny))).macs
    for r in rows:
        assert abs(r["gflops"] * 1e9 / r["images_per_s"] / (6 * macs) - 1) < 1e-6
        assert r["images_per_s"] > 0 and r["gflops"] > 0 and r["matmul_gflops"] > 0
        assert 0 < r["ratio_to_matmul"] < 1.5
        assert r["peak_rss_mib"] > r["rss_growth_mib"] >= 0
