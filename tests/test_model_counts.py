"""Parameter and MAC counts of the full-size variants against the paper, all on the meta device."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import count_macs, create_model, list_models
from pretrain.model.summary import main as summary_main

# docs/coatnet.md section 1: published parameters, and "FLOPs" (= multiply-accumulates) with their size.
PUBLISHED_PARAMS = {
    "coatnet_0": 25e6,
    "coatnet_1": 42e6,
    "coatnet_2": 75e6,
    "coatnet_3": 168e6,
    "coatnet_4": 275e6,
    "coatnet_5": 688e6,
    "coatnet_6": 1.47e9,
    "coatnet_7": 2.44e9,
}
PUBLISHED_MACS = {
    "coatnet_0": (224, 4.2e9),
    "coatnet_1": (224, 8.4e9),
    "coatnet_2": (224, 15.7e9),
    "coatnet_3": (224, 34.7e9),
    "coatnet_5": (512, 812e9),
    "coatnet_6": (512, 1521e9),
    "coatnet_7": (512, 2586e9),
}


def test_published_table_covers_every_variant():
    assert sorted(PUBLISHED_PARAMS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_within_1_percent_of_published(name):
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / PUBLISHED_PARAMS[name] - 1) < 0.01, f"{name}: {params:,}"
    # The summary's per-stage rows add up to the same number.
    assert count_macs(model).params == params


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_macs_within_3_percent_by_two_independent_counters(name):
    size, published = PUBLISHED_MACS[name]
    ours = count_macs(name, size).macs
    # torch's own counter sees the aten ops (convolution, addmm, bmm of the decomposed attention).
    with torch.device("meta"):
        model = create_model(name, image_size=size)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, size, size))
    torch_macs = counter.get_total_flops() / 2
    assert abs(ours / published - 1) < 0.03, f"{name}: {ours / 1e9:.1f}B"
    assert abs(torch_macs / published - 1) < 0.03, f"{name}: {torch_macs / 1e9:.1f}B"
    assert abs(ours / torch_macs - 1) < 0.001


def test_coatnet_7_builds_on_meta_in_seconds():
    start = time.perf_counter()
    with torch.device("meta"):
        model = create_model("coatnet_7", image_size=512)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.1f}s"
    assert all(p.is_meta for p in model.parameters())
    # 42 + 2 Transformer blocks at 32x32 and 16x16 tokens: tables 63x63 and 31x31, 16 and 24 heads.
    shapes = set(model.relative_bias_table_shapes().values())
    assert shapes == {torch.Size((16, 63, 63)), torch.Size((24, 31, 31))}


def test_summary_prints_per_stage_table(capsys):
    assert summary_main(["summary", "coatnet_7", "--image-size", "512"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()[3:10]}
    assert list(rows) == [
        "S0 stem",
        "S1 mbconv",
        "S2 mbconv",
        "S3 mbconv",
        "S3 transformer",
        "S4 transformer",
        "head head",
    ]
    assert "32x32" in rows["S3 transformer"] and "2.11B" in rows["S3 transformer"]
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:] == ["2.44B", "2538.53B"]


def test_summary_cli_help_and_errors(capsys):
    run = [sys.executable, "-m", "pretrain.model.summary", "--help"]
    help_text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "summary" in help_text and "list" in help_text
    assert summary_main(["summary", "coatnet_0", "--image-size", "200"]) == 2
    assert "'image_size' 200" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        summary_main(["summary", "coatnet_9"])
    assert exit_info.value.code == 2 and "coatnet_9" in capsys.readouterr().err
