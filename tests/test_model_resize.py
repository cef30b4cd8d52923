"""Relative attention and bias-table resizing between resolutions (docs/coatnet.md section 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import create_model, resize_relative_bias_tables
from pretrain.model.blocks import RelativeAttention
from pretrain.model.relative_bias import interpolate_table, relative_position_index

SMALL = {"depths": [1, 1, 1, 2, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}


pytestmark = pytest.mark.usefixtures("single_thread")


def test_index_reads_the_table_at_the_token_offsets():
    h, w = 3, 4  # non-square on purpose
    table = torch.randn(2, 2 * h - 1, 2 * w - 1)
    attn = RelativeAttention(8, 8, 4, (h, w))
    attn.relative_position_bias_table.data.copy_(table)
    bias = attn.relative_bias((h, w))
    for a in range(h * w):
        for b in range(h * w):
            (i, j), (k, m) = divmod(a, w), divmod(b, w)
            assert torch.equal(bias[:, a, b], table[:, i - k + h - 1, j - m + w - 1])


def test_attention_adds_the_bias_to_the_logits_before_the_softmax():
    torch.manual_seed(0)
    attn = RelativeAttention(16, 32, 8, (3, 3))
    x = torch.randn(2, 3, 3, 16)
    q, k, v = attn.qkv(x.reshape(2, 9, 16)).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / 8**0.5 + attn.relative_bias((3, 3))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 3, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_224_state_dict_loads_into_384_model_with_bilinear_tables():
    torch.manual_seed(0)
    src = create_model("coatnet_0", image_size=224)
    dst = create_model("coatnet_0", image_size=384)
    state = src.state_dict()
    dst.load_state_dict(state)  # strict
    s3 = "stages.3.blocks.0.attn.relative_position_bias_table"
    s4 = "stages.4.blocks.1.attn.relative_position_bias_table"
    assert state[s3].shape == (12, 27, 27) and dst.state_dict()[s3].shape == (12, 47, 47)
    assert state[s4].shape == (24, 13, 13) and dst.state_dict()[s4].shape == (24, 23, 23)
    expected = F.interpolate(state[s3][None], size=(47, 47), mode="bilinear", align_corners=False)[0]
    assert torch.equal(dst.state_dict()[s3], expected)
    # Everything that is not a table is copied unchanged.
    for key, value in state.items():
        if not key.endswith("relative_position_bias_table"):
            assert torch.equal(dst.state_dict()[key], value), key


def test_pure_resize_uses_given_shapes_and_reports_keys():
    # Target shapes from the config of a model on meta: what a caller does when the real target is a
    # ZeRO-3 shard whose parameters have no usable .shape.
    with torch.device("meta"):
        target = create_model("coatnet_0", image_size=512, **SMALL)
    shapes = target.relative_bias_table_shapes()
    state = create_model("coatnet_0", image_size=224, **SMALL).state_dict()
    out, resized = resize_relative_bias_tables(state, shapes)
    assert sorted(resized) == sorted(shapes)
    assert all(out[k].shape == shapes[k] for k in shapes)
    assert {out[k].shape[1:] for k in resized} == {(63, 63), (31, 31)}  # S3 32x32 tokens, S4 16x16
    untouched = [k for k in state if k not in shapes]
    assert all(out[k] is state[k] for k in untouched)
    assert state[resized[0]].shape != out[resized[0]].shape  # the input dict is not modified


def test_constant_table_stays_constant_and_identity_is_exact():
    const = torch.full((4, 13, 13), 0.37)
    assert torch.allclose(interpolate_table(const, (23, 23)), torch.full((4, 23, 23), 0.37))
    table = torch.randn(4, 13, 13)
    state = {"x.relative_position_bias_table": table}
    out, resized = resize_relative_bias_tables(state, {"x.relative_position_bias_table": table.shape})
    assert resized == [] and out["x.relative_position_bias_table"] is table
    # Up and back down is not the identity, but stays close for a smooth table.
    smooth = torch.linspace(0, 1, 13)[None, :, None] * torch.ones(4, 13, 13)
    back = interpolate_table(interpolate_table(smooth, (23, 23)), (13, 13))
    assert torch.allclose(back, smooth, atol=0.02)


def test_head_count_mismatch_names_the_key():
    state = {"stages.3.blocks.0.attn.relative_position_bias_table": torch.zeros(12, 27, 27)}
    with pytest.raises(ValueError, match=r"stages\.3\.blocks\.0\.attn"):
        resize_relative_bias_tables(state, {k: torch.Size((6, 47, 47)) for k in state})


def test_running_at_another_size_equals_resizing_on_load():
    torch.manual_seed(0)
    at_224 = create_model("coatnet_0", image_size=224, **SMALL).eval()
    at_384 = create_model("coatnet_0", image_size=384, **SMALL).eval()
    at_384.load_state_dict(at_224.state_dict())
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        on_the_fly, loaded = at_224(x), at_384(x)
    assert torch.allclose(on_the_fly, loaded, atol=1e-5)
    # ... and the on-the-fly path leaves the stored tables alone.
    table = at_224.state_dict()["stages.3.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (4, 27, 27)


def test_index_buffer_is_not_saved():
    model = create_model("coatnet_0", **SMALL)
    assert not any("relative_position_index" in k for k in model.state_dict())
    assert relative_position_index((2, 2)).tolist() == [
        [4, 3, 1, 0],
        [5, 4, 2, 1],
        [7, 6, 4, 3],
        [8, 7, 5, 4],
    ]


def test_empty_zero3_placeholders_pass_through():
    # A ZeRO-3 engine's module state dict holds empty tensors for partitioned parameters.
    key = "stages.3.blocks.0.attn.relative_position_bias_table"
    placeholder = torch.empty(0)
    out, resized = resize_relative_bias_tables({key: placeholder}, {key: torch.Size((12, 47, 47))})
    assert resized == [] and out[key] is placeholder


def test_bias_is_laid_out_for_cuda_memory_efficient_attention():
    # The kernel needs every stride but the last to be a multiple of 8 (else SDPA copies a padded bias).
    attn = RelativeAttention(8, 16, 8, (14, 14))
    for grid in ((14, 14), (7, 7), (3, 5)):
        bias = attn.relative_bias(grid, torch.bfloat16)
        n = grid[0] * grid[1]
        assert bias.shape == (2, n, n) and bias.dtype == torch.bfloat16
        assert bias.stride(-1) == 1 and all(s % 8 == 0 for s in bias.stride()[:-1]), bias.stride()
