"""Parameter and MAC counts of the full-size variants against the paper, all on the meta device."""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import MacCount, count_macs, create_model, list_models
from pretrain.model.macs import PUBLISHED_MACS, PUBLISHED_PARAMS, PublishedMacs
from pretrain.model.summary import main as summary_main

# What the paper's counter charges per attention logit beyond q.k^T and attn.v: a least-squares fit of
# (paper - ours) against attention_logits over CoAtNet-0..5 (macs.py docstring, docs/macs.md). Used only
# to check that explanation; count_macs never adds it.
PAPER_MACS_PER_LOGIT = 13.5
# CoAtNet-6/7 split S3 into MBConv then Transformer blocks, a layout read from Table 12 (docs/coatnet.md
# 1.1); they stay 1.2%/1.5% low after the per-logit term, for reasons unrelated to attention.
SPLIT_S3_VARIANTS = ("coatnet_6", "coatnet_7")


def _point_id(point: PublishedMacs) -> str:
    suffix = "-dw" if point.downsample == "depthwise" else ""
    return f"{point.name}-{point.image_size}{suffix}"


@functools.cache
def _counts(point: PublishedMacs) -> tuple[MacCount, float]:
    """Our count and torch's FlopCounterMode MACs for one published point (cached: tests share them)."""
    with torch.device("meta"):
        model = create_model(point.name, image_size=point.image_size, downsample=point.downsample)
        # torch's own counter sees the aten ops (convolution, addmm, bmm of the decomposed attention).
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, point.image_size, point.image_size))
    return count_macs(model), counter.get_total_flops() / 2


def test_published_tables_cover_every_variant():
    assert sorted(PUBLISHED_PARAMS) == list_models()
    assert sorted({p.name for p in PUBLISHED_MACS}) == list_models()
    keys = [(p.name, p.image_size, p.downsample) for p in PUBLISHED_MACS]
    assert len(set(keys)) == len(keys) == 20, "one entry per (variant, size, downsampling)"


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_within_1_percent_of_published(name):
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / PUBLISHED_PARAMS[name] - 1) < 0.01, f"{name}: {params:,}"
    # The summary's per-stage rows add up to the same number.
    assert count_macs(model).params == params


@pytest.mark.parametrize("point", PUBLISHED_MACS, ids=_point_id)
def test_macs_at_most_4_percent_below_published(point):
    # Measured: 0.9% (CoAtNet-3 at 224) to 3.5% (CoAtNet-2 at 512) below, never above. The paper's figures
    # include about 13.5 MACs per attention logit that this counter does not count (next test).
    ours = _counts(point)[0].macs
    assert -0.04 < ours / point.macs - 1 < 0, (
        f"{_point_id(point)}: {ours / 1e9:.2f}B vs {point.macs / 1e9:g}B"
    )


@pytest.mark.parametrize("point", PUBLISHED_MACS, ids=_point_id)
def test_shortfall_is_a_fixed_cost_per_attention_logit(point):
    # Within 1%: measured at most 0.86% (CoAtNet-1 at 224) and at most 0.5% at every 384/512 point, the
    # order of the paper's rounding for the small models (4.2B is +-1.2%). 2% for the split-S3 variants
    # (measured 1.2% and 1.5%).
    count = _counts(point)[0]
    explained = count.macs + PAPER_MACS_PER_LOGIT * count.attention_logits
    tolerance = 0.02 if point.name in SPLIT_S3_VARIANTS else 0.01
    assert abs(explained / point.macs - 1) < tolerance, f"{_point_id(point)}: {explained / 1e9:.2f}B"


@pytest.mark.parametrize("point", PUBLISHED_MACS, ids=_point_id)
def test_two_independent_counters_agree(point):
    count, torch_macs = _counts(point)
    assert abs(count.macs / torch_macs - 1) < 0.001, (
        f"{_point_id(point)}: {count.macs:,} vs {torch_macs:,.0f}"
    )


def test_attention_logits_are_heads_times_tokens_squared():
    count = count_macs("coatnet_2", 512)
    rows = {row.label: row for row in count.stages}
    # S3: 14 layers, 16 heads, 32x32 tokens; S4: 2 layers, 32 heads, 16x16 tokens; no attention before.
    assert rows["S3"].attention_logits == 14 * 16 * 1024**2
    assert rows["S4"].attention_logits == 2 * 32 * 256**2
    assert count.attention_logits == rows["S3"].attention_logits + rows["S4"].attention_logits


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
