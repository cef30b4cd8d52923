"""Contract and behaviour tests of the CoAtNet family on CPU with small, real models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.model import VARIANTS, CoAtNet, create_model, create_model_from_config, list_models

IMAGE = 64  # smallest size that keeps a 2x2 grid in S4


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_overrides(name: str) -> dict:
    """Keep the variant's stage layout (block types, strides, the split S3 of 6/7), shrink depth/width.

    Two blocks per stage so every stage has both a downsampling and a plain block.
    """
    n = len(VARIANTS[name].depths)
    dims = [16, 16, 32, 64, 128] if n == 5 else [16, 16, 32, 48, 64, 128]
    return {"depths": [2] * n, "dims": dims, "head_dim": 16}


def tiny(name: str = "coatnet_0", **kw) -> CoAtNet:
    return create_model(name, **{"num_classes": 10, "image_size": IMAGE, **tiny_overrides(name), **kw})


def loss_and_grads(model: CoAtNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_list_models_names_all_eight_variants():
    assert list_models() == [f"coatnet_{i}" for i in range(8)]


@pytest.mark.parametrize("name", list_models())
def test_contract_every_variant(name):
    """Shape, finiteness, a gradient for every parameter, and checkpointing that changes nothing."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, IMAGE, IMAGE), torch.tensor([0, 3, 7, 9])

    model = tiny(name).train()
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    _, grads = loss_and_grads(model, x, y)
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{n} got no gradient"

    # With stochastic depth on: the same seed gives the same drops, and checkpointing replays them.
    plain = tiny(name, drop_path_rate=0.3).train()
    ckpt = tiny(name, drop_path_rate=0.3).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    torch.manual_seed(1)
    loss_a, grads_a = loss_and_grads(plain, x, y)
    torch.manual_seed(1)
    loss_b, grads_b = loss_and_grads(ckpt, x, y)
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    # The recomputation in backward must not update BatchNorm running statistics a second time.
    state_b = ckpt.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, state_b[k]), k


def test_bf16_autocast_forward_backward_tracks_fp32():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_runs_at_any_size_divisible_by_32_and_rejects_others():
    model = tiny().eval()
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


def test_bad_names_and_overrides_are_rejected_by_name():
    with pytest.raises(ValueError, match="coatnet_9"):
        create_model("coatnet_9")
    with pytest.raises(ValueError, match="head_size"):
        create_model("coatnet_0", head_size=16)
    with pytest.raises(ValueError, match="'downsample'"):
        create_model("coatnet_0", downsample="strided")
    with pytest.raises(ValueError, match="'dims' has 4 entries"):
        create_model("coatnet_0", dims=[16, 16, 32, 64])
    with pytest.raises(ValueError, match="not divisible by 'head_dim'"):
        create_model("coatnet_0", head_dim=40)
    with pytest.raises(ValueError, match="'image_size' 200"):
        create_model("coatnet_0", image_size=200)


def test_config_json_round_trip_rebuilds_the_same_model():
    torch.manual_seed(0)
    model = tiny("coatnet_7", downsample="depthwise", pre_logits=False).eval()
    text = json.dumps(dataclasses.asdict(model.config))
    rebuilt = create_model_from_config(json.loads(text)).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 3, IMAGE, IMAGE)
    assert torch.equal(rebuilt(x), model(x))
    # The dataclass itself is accepted too, and overrides apply on top (a fine-tune head).
    assert create_model_from_config(model.config, num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="bogus"):
        create_model_from_config({**json.loads(text), "bogus": 1})


def test_downsample_variants_put_the_stride_where_the_paper_says():
    default = tiny()
    depthwise = tiny(downsample="depthwise")
    first = default.stages[1].blocks[0]
    assert first.conv_expand.stride == (2, 2) and first.conv_dw.stride == (1, 1)
    first = depthwise.stages[1].blocks[0]
    assert first.conv_expand.stride == (1, 1) and first.conv_dw.stride == (2, 2)
    # Same parameters, more compute: the expansion conv runs at full resolution.
    from pretrain.model import count_macs

    assert sum(p.numel() for p in default.parameters()) == sum(p.numel() for p in depthwise.parameters())
    assert count_macs(depthwise).macs > count_macs(default).macs


def test_pre_logits_switch_and_head_api():
    torch.manual_seed(0)
    with_pl, without = tiny(), tiny(pre_logits=False)
    d = 128
    n_with = sum(p.numel() for p in with_pl.parameters())
    assert n_with - sum(p.numel() for p in without.parameters()) == d * d + d
    x = torch.randn(2, 3, IMAGE, IMAGE)
    feats = with_pl.forward_features(x)
    assert feats.shape == (2, IMAGE // 32, IMAGE // 32, d)
    pre = with_pl.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, d) and pre.abs().max() <= 1.0  # tanh
    with_pl.reset_classifier(5)
    assert with_pl(x).shape == (2, 5)
    assert with_pl.num_classes == 5 and with_pl.config.num_classes == 5
    with_pl.reset_classifier(0)
    assert with_pl(x).shape == (2, d)


def test_no_weight_decay_names_biases_norms_and_tables_only():
    model = tiny()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    for n, p in params.items():
        exempt = p.ndim <= 1 or n.endswith("relative_position_bias_table")
        assert (n in names) == exempt, n
    assert any(n.endswith("relative_position_bias_table") for n in names)


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    model = create_model("coatnet_0", image_size=IMAGE, depths=[1, 1, 1, 1, 1], dims=[32, 32, 64, 128, 256])
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight
            assert w.abs().max() <= 0.04 + 1e-6, name  # truncated at 2 std
            if w.numel() >= 10_000:
                assert abs(w.std().item() - 0.0176) < 0.002, name  # std of N(0, 0.02) cut at 2 std
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0, name
    table = model.stages[3].blocks[0].attn.relative_position_bias_table
    assert 0 < table.abs().max() <= 0.04


def test_meta_model_materialises_with_to_empty():
    with torch.device("meta"):
        model = tiny()
    model.to_empty(device="cpu")
    model.init_non_persistent_buffers()
    index = model.stages[4].blocks[1].attn.relative_position_index
    assert index.device.type == "cpu" and int(index.max()) == 3 * 3 - 1  # 2x2 grid -> 3x3 table
    model.load_state_dict(tiny().state_dict())
    assert torch.isfinite(model.eval()(torch.randn(1, 3, IMAGE, IMAGE))).all()


def _photo_crops(size: int = 64, per_image: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of sklearn's two bundled photographs (a temple in China, a flower), labels 0/1."""
    from sklearn.datasets import load_sample_image

    gen = np.random.default_rng(0)
    crops, labels = [], []
    for label, name in enumerate(("china.jpg", "flower.jpg")):
        img = load_sample_image(name)  # (427, 640, 3) uint8
        for _ in range(per_image):
            top, left = gen.integers(0, img.shape[0] - 2 * size), gen.integers(0, img.shape[1] - 2 * size)
            crop = img[top : top + 2 * size : 2, left : left + 2 * size : 2]
            crops.append(torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255.0)
            labels.append(label)
    x = torch.stack(crops)
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True), torch.tensor(labels)


def test_tiny_model_learns_to_tell_two_real_photographs_apart():
    torch.manual_seed(1)
    x, y = _photo_crops()
    model = create_model("coatnet_0", num_classes=2, image_size=64, **tiny_overrides("coatnet_0"))
    model.set_grad_checkpointing(True)
    decay = model.no_weight_decay()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.05},
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    # BatchNorm running statistics lag a model that changed this fast: recalibrate them (no weight
    # update), then eval mode must classify like train mode did.
    with torch.no_grad():
        for _ in range(50):
            model(x)
        assert (model.eval()(x).argmax(1) == y).float().mean() >= 0.9
