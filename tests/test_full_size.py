"""The CI twin of benchmarks/full_size.py: CoAtNet-5's widths with one block per stage (75M parameters).

The same path as the full-size benchmark, through the real deepspeed launcher on 2 CPU ranks (ZeRO-3, bf16,
activation checkpointing, batch 1 per rank): train, stop after a step and resume with the same losses
bitwise, export, fine-tune from the export at 96 px on another label set.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launch import REPO, tail

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_coatnet5_widths_train_resume_bitwise_export_and_finetune(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "full_size.py"), "--depths", "1,1,1,1,1"]
    cmd += ["--steps", "3", "--stop-after", "1", "--out", str(tmp_path / "work"), "--json", str(figures)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, tail(proc)
    f = json.loads(figures.read_text())

    assert f["resume_bitwise_equal"] and len(f["losses"]["uninterrupted"]) == 3
    assert "load_s" in f["phases"]["resumed"]  # the second launch resumed from the stop checkpoint
    (loss,) = f["finetune"]["loss"].values()
    assert math.isfinite(loss) and loss < 2 * math.log(1000)  # 2 classes now; a broken load explodes
    assert f["finetune"]["resized"] == 2  # S3 and S4 tables, 64 -> 96 px
    assert f["finetune"]["reinitialised"] == ["head.fc.bias", "head.fc.weight"]

    plan = f["planner_gib"]
    params = plan["parameters (M)"] * 1e6
    assert f["export_gib"] == pytest.approx(4 * params / 2**30, rel=0.02)  # fp32, nothing else
    for rank in (0, 1):  # what ZeRO-3 holds per rank: the planner's fp32 master + Adam shard
        shard = f["zero3_on_disk_gib"][f"rank {rank} optimizer shard"]
        assert shard == pytest.approx(plan["fp32 master + Adam shard"], rel=0.05), (rank, shard)
    for run in ("uninterrupted", "resumed", "finetune"):
        assert set(f["memory"][run]) == {"rank 0", "rank 1"}, f["memory"][run]
