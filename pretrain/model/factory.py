"""Model constructors: ``create_model`` by variant name, ``create_model_from_config`` from a saved config."""

from __future__ import annotations

import dataclasses
from typing import Any

from .coatnet import CoAtNet
from .config import VARIANTS, CoAtNetConfig, config_from_dict, resolve_config


def list_models() -> list[str]:
    """Registered variant names, ``coatnet_0`` ... ``coatnet_7``."""
    return sorted(VARIANTS)


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    image_size: int = 224,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> CoAtNet:
    """Build variant ``name``; ``overrides`` replace fields of its ``CoAtNetConfig``.

    E.g. a smoke-test model: ``create_model("coatnet_0", depths=[1, 1, 1, 1, 1],
    dims=[16, 16, 32, 64, 128], head_dim=16)``. Unknown variants or fields raise ValueError naming them.
    Build inside ``torch.device("meta")`` for shapes/counts without memory, or inside
    ``deepspeed.zero.Init`` to shard at construction.
    """
    config = resolve_config(
        name, num_classes=num_classes, image_size=image_size, drop_path_rate=drop_path_rate, **overrides
    )
    return CoAtNet(config)


def create_model_from_config(config: CoAtNetConfig | dict[str, Any], **overrides: Any) -> CoAtNet:
    """Rebuild a model from ``model.config`` or its ``dataclasses.asdict``/JSON form, plus ``overrides``.

    E.g. ``create_model_from_config(json.load(f), num_classes=10, image_size=384)`` for a fine-tune.
    """
    values = dataclasses.asdict(config) if isinstance(config, CoAtNetConfig) else dict(config)
    return CoAtNet(config_from_dict({**values, **overrides}))
