"""BatchNorm momentum is a model config key that reaches every BatchNorm layer, also from the YAML config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import load_config
from pretrain.configlib import ConfigError
from pretrain.model import create_model, list_models
from pretrain.model.layers import BatchNorm2d

TINY5 = {"depths": [2, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}
TINY6 = {"depths": [2, 1, 1, 1, 1, 1], "dims": [16, 16, 32, 48, 64, 128], "head_dim": 16}


def norms(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert found and all(isinstance(m, BatchNorm2d) for m in found)  # the checkpoint-safe variant
    return found


@pytest.mark.parametrize("name", list_models())
def test_momentum_reaches_every_batchnorm(name):
    tiny = TINY6 if name in ("coatnet_6", "coatnet_7") else TINY5  # stem depth 2: it has a norm too
    with torch.device("meta"):
        default = create_model(name, image_size=64, **tiny)
        tf_like = create_model(name, image_size=64, bn_momentum=0.01, **tiny)
    assert default.config.bn_momentum == 0.1  # what nn.BatchNorm2d gave before the key existed
    assert {m.momentum for m in norms(default)} == {0.1}
    assert {m.momentum for m in norms(tf_like)} == {0.01}
    config = tf_like.config
    mbconv_blocks = sum(d for d, t in zip(config.depths, config.block_types) if t == "mbconv")
    assert len(norms(tf_like)) == (config.depths[0] - 1) + 3 * mbconv_blocks  # every one was looked at


def test_running_statistics_move_by_the_configured_momentum():
    torch.manual_seed(0)
    model = create_model("coatnet_0", image_size=64, bn_momentum=0.01, **TINY5).train()
    stem_norm = model.stages[0].blocks[0].layers[1]
    seen = []
    stem_norm.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    model(torch.randn(4, 3, 64, 64))
    (x,) = seen
    # From mean 0 / variance 1: one step moves them 1% of the way to the batch's (unbiased) statistics.
    torch.testing.assert_close(stem_norm.running_mean, 0.01 * x.mean((0, 2, 3)))
    torch.testing.assert_close(stem_norm.running_var, 0.99 + 0.01 * x.var((0, 2, 3), unbiased=True))


def test_yaml_key_reaches_the_model_and_bad_values_are_rejected(tmp_path: Path):
    base = tmp_path / "c.yaml"
    base.write_text("model: {name: coatnet_0, image_size: 64}\nschedule: {steps: 1}\n")
    cfg = load_config(base, ["model.bn_momentum=0.01"])
    assert cfg.model.overrides() == {"bn_momentum": 0.01}
    with torch.device("meta"):
        model = create_model(cfg.model.name, image_size=cfg.model.image_size, **cfg.model.overrides())
    assert {m.momentum for m in norms(model)} == {0.01}
    assert load_config(base).model.overrides() == {}  # unset: the model's default
    with pytest.raises(ConfigError, match=r"model\.bn_momentum"):
        load_config(base, ["model.bn_momentum=1.5"])
    with pytest.raises(ValueError, match="'bn_momentum'"):
        create_model("coatnet_0", bn_momentum=0.0)
