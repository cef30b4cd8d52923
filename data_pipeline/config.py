"""The `data:` section of the run config: every knob of the input pipeline, one field each.

This module is importable without DALI or torch: the config loader and the docs generator read the
fields' metadata ("doc", and "min"/"max" where a range applies). The crop size is not here (the trainer
passes `model.image_size`), nor is the seed (`run.seed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    """Input pipeline settings (YAML section `data:`)."""

    train: str = field(
        default="",
        metadata={
            "doc": "Directory of training shards with their manifest.json (from `coatnet-data build/index`)."
        },
    )
    val: str | None = field(
        default=None,
        metadata={
            "doc": "Directory of validation shards with their manifest.json; null disables evaluation."
        },
    )
    batch_size: int = field(default=128, metadata={"doc": "Training micro-batch per rank.", "min": 1})
    eval_batch_size: int = field(default=128, metadata={"doc": "Evaluation batch per rank.", "min": 1})
    num_threads: int = field(default=4, metadata={"doc": "DALI CPU worker threads per rank.", "min": 1})
    prefetch_queue: int = field(
        default=2, metadata={"doc": "Batches DALI prepares ahead of the trainer.", "min": 1, "max": 16}
    )
    scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={"doc": "Random-resized-crop area range, as fractions of the image area."},
    )
    ratio: list[float] = field(
        default_factory=lambda: [0.75, 1.3333],
        metadata={"doc": "Random-resized-crop aspect-ratio range (width / height)."},
    )
    hflip: bool = field(default=True, metadata={"doc": "Random horizontal flip with probability 0.5."})
    randaugment_layers: int = field(
        default=0, metadata={"doc": "RandAugment operations per image; 0 disables it.", "min": 0, "max": 8}
    )
    randaugment_magnitude: int = field(
        default=9,
        metadata={"doc": "RandAugment magnitude (0-30 scale of DALI's auto_aug).", "min": 0, "max": 30},
    )
    mixup_alpha: float = field(
        default=0.0, metadata={"doc": "Mixup Beta(alpha, alpha) parameter; 0 disables Mixup.", "min": 0.0}
    )
    eval_crop_ratio: float = field(
        default=0.875,
        metadata={
            "doc": "Evaluation: resize the shorter side to image_size / ratio, then center crop.",
            "min": 0.1,
            "max": 1.0,
        },
    )
    decode: Literal["auto", "cpu", "gpu"] = field(
        default="auto",
        metadata={"doc": "JPEG decoding device: auto = GPU when the training device is CUDA, else CPU."},
    )
    output_dtype: Literal["bf16", "fp32"] | None = field(
        default=None,
        metadata={
            "doc": "Dtype of the image batches handed to the model; null: the model's (engine.precision, "
            "filled in when a training config is loaded), fp32 when a loader is used on its own."
        },
    )
    on_corrupt: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "doc": "A sample that fails to decode: stop with an error naming shard and key, or replace it "
            "with a neighbour and count it."
        },
    )
    segment_shards: int = field(
        default=256,
        metadata={
            "doc": "Shards a rank's DALI pipeline covers before it is rebuilt for the next part of the epoch "
            "(bounds open files and index files).",
            "min": 1,
        },
    )
    segment_ahead: bool = field(
        default=True,
        metadata={
            "doc": "Build the next segment's pipeline (index files, DALI build, first batch) in a background "
            "thread while the current one plays, so a segment switch does not stall the step; costs a second "
            "pipeline's decoder buffers near each switch.",
        },
    )
    # nvJPEG sizing, GPU ("mixed") decoding only. NVIDIA's ImageNet examples (DeepLearningExamples
    # ConvNets, DALI's ResNet-50 example) preallocate these so that a large JPEG never makes nvJPEG
    # reallocate in the middle of training.
    device_memory_padding: int = field(
        default=211_025_920,
        metadata={
            "doc": "GPU decoding: nvJPEG device buffer preallocated per decoder thread, bytes (sized for "
            "full-size ImageNet; DALI's own default is 16 MiB).",
            "min": 0,
        },
    )
    host_memory_padding: int = field(
        default=140_544_512,
        metadata={
            "doc": "GPU decoding: nvJPEG pinned host buffer preallocated per decoder thread, bytes (sized "
            "for full-size ImageNet; DALI's own default is 8 MiB).",
            "min": 0,
        },
    )
    hw_decoder_load: float = field(
        default=0.65,
        metadata={
            "doc": "GPU decoding: share of the JPEGs sent to the hardware JPEG decoder of A100/H100-class "
            "GPUs (the rest go to the CUDA decoder); ignored where there is none.",
            "min": 0.0,
            "max": 1.0,
        },
    )
    index_cache: str | None = field(
        default=None,
        metadata={
            "doc": "Directory for the per-rank index files the loader writes; null = a temporary directory."
        },
    )
