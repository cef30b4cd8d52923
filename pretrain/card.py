"""The model card: what a consumer of trained weights needs to rebuild and feed the model, in one schema.

The same card is written into every checkpoint manifest (`meta.card`), into the export's sidecar
(`OUT.json`, by `coatnet-export`) and into the EMA export's sidecar (`ema.json`), so that all three can be
read by one function (`pretrain.transfer`, fine-tuning, and users' own code):

    {"format": "coatnet-card/1",
     "model": {"name": "coatnet_0", "config": {...CoAtNetConfig...}},
     "image_size": 224, "num_classes": 1000, "label_kind": "single", "class_names": [...],
     "step": 1000, "samples_seen": 4096000,
     "preprocessing": {"mean": [...], "std": [...], "eval_crop_ratio": 0.875, "layout": "NCHW",
                       "input": "RGB, 0-255 pixels resized to image_size/eval_crop_ratio on the short side,
                                 center-cropped, (pixel - mean) / std"}}

A sidecar adds, at the top level, the fields that describe its own file (`dtype`, `tensors`, and
`source` + `saved_world_size` for an export or `ema_decay` for the EMA), never replacing the card's.
"""

from __future__ import annotations

import dataclasses

from data_pipeline.pipeline import MEAN, STD

CARD_FORMAT = "coatnet-card/1"
CARD_KEYS = ("model", "image_size", "num_classes", "label_kind", "class_names", "step")


def model_card(
    *,
    model_name: str,
    model_config: object,
    image_size: int,
    num_classes: int,
    label_kind: str,
    class_names: list[str],
    step: int,
    samples_seen: int,
    eval_crop_ratio: float,
) -> dict:
    """The card of a model at `step` (`model_config`: the CoAtNetConfig dataclass it was built from)."""
    return {
        "format": CARD_FORMAT,
        "model": {"name": model_name, "config": dataclasses.asdict(model_config)},
        "image_size": image_size,
        "num_classes": num_classes,
        "label_kind": label_kind,
        "class_names": list(class_names),
        "step": step,
        "samples_seen": samples_seen,
        "preprocessing": {
            "mean": list(MEAN),
            "std": list(STD),
            "eval_crop_ratio": eval_crop_ratio,
            "layout": "NCHW",
            "input": "RGB, 0-255 pixels, shorter side resized to image_size / eval_crop_ratio, "
            "center crop of image_size, then (pixel - mean) / std",
        },
    }


def check_card(card: dict, where: str) -> dict:
    """`card` when it has every key a consumer relies on; else ValueError naming `where`."""
    missing = [k for k in CARD_KEYS if k not in card]
    if missing or card.get("format") != CARD_FORMAT:
        raise ValueError(
            f"{where}: not a {CARD_FORMAT} model card (missing {missing or 'the format tag'}); "
            "written by an older version?"
        )
    return card
