"""The relative-bias attention reaches the fused SDPA kernel on CPU and computes what it computed before.

Before, the (heads, N, N) bias went to ``scaled_dot_product_attention`` as a 3-D mask, which on CPU always
takes the unfused math kernel; now it goes as a (1, heads, N, N) view (``blocks.biased_attention``).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from pretrain.model import blocks, create_model
from pretrain.model.blocks import RelativeAttention

FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"
SMALL = {"depths": [1, 1, 1, 2, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16, "num_classes": 10}


pytestmark = pytest.mark.usefixtures("single_thread")


def attention_3d_mask(q, k, v, bias):
    """The previous formulation: the (heads, N, N) bias passed to SDPA as it is."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def previous_formulation():
    return mock.patch.object(blocks, "biased_attention", attention_3d_mask)


def sdpa_kernels(fn) -> set[str]:
    """Names of the SDPA implementations the profiler sees while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key} - {
        "aten::scaled_dot_product_attention"  # the dispatcher entry above whichever kernel runs
    }


def s3_layer() -> tuple[RelativeAttention, torch.Tensor]:
    """An attention layer shaped like CoAtNet-0's S3 at 224 (14 x 14 tokens), fewer channels."""
    torch.manual_seed(0)
    return RelativeAttention(64, 64, 32, (14, 14)), torch.randn(2, 14, 14, 64)


def test_inference_runs_the_fused_cpu_kernel_and_training_the_math_kernel():
    attn, x = s3_layer()
    with torch.inference_mode():
        assert sdpa_kernels(lambda: attn(x)) == {FLASH_CPU}
        with previous_formulation():
            assert sdpa_kernels(lambda: attn(x)) == {MATH}  # what the 3-D mask gave
    with torch.no_grad():
        assert sdpa_kernels(lambda: attn(x)) == {FLASH_CPU}
    # Training: the learned bias needs its gradient, which the CPU flash kernel does not give.
    assert sdpa_kernels(lambda: attn(x).sum().backward()) >= {MATH}
    assert FLASH_CPU not in sdpa_kernels(lambda: attn(x).sum().backward())


def test_outputs_and_gradients_equal_the_previous_formulation():
    attn, x = s3_layer()
    with torch.inference_mode():
        fused = attn(x)
        with previous_formulation():
            math = attn(x)
    # Flash computes the softmax blockwise (online max/sum): fp32 rounding differs, ~1e-7 relative.
    torch.testing.assert_close(fused, math, rtol=1e-5, atol=1e-6)

    grads = []
    for formulation in (contextlib.nullcontext(), previous_formulation()):
        attn.zero_grad(set_to_none=True)
        with formulation:
            out = attn(x)
            out.pow(2).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (out_4d, g_4d), (out_3d, g_3d) = grads
    # Same math kernel, mask broadcast over the batch either way: bit for bit.
    assert torch.equal(out_4d, out_3d)
    assert g_4d.keys() == g_3d.keys() and "relative_position_bias_table" in g_4d
    for name in g_4d:
        assert torch.equal(g_4d[name], g_3d[name]), name


def test_whole_model_inference_is_unchanged_and_fused():
    torch.manual_seed(0)
    model = create_model("coatnet_0", image_size=64, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert sdpa_kernels(lambda: model(x)) == {FLASH_CPU}
        with previous_formulation():
            before = model(x)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_mask_view_keeps_the_alignment_of_cuda_memory_efficient_attention():
    # CUDA's memory-efficient kernel copies a padded bias unless every stride but the last is a multiple
    # of 8 (aten preprocess_mask); the 4-D view must keep what relative_bias lays out.
    attn = RelativeAttention(8, 16, 8, (14, 14))
    for grid in ((14, 14), (7, 7), (3, 5)):
        n = grid[0] * grid[1]
        mask = attn.relative_bias(grid, torch.bfloat16).unsqueeze(0)  # what biased_attention passes
        assert mask.shape == (1, 2, n, n) and mask.stride(-1) == 1
        assert all(s % 8 == 0 for s in mask.stride()[:-1]), mask.stride()
