"""Typed configuration of a CoAtNet and the table of named variants (CoAtNet-0 ... CoAtNet-7).

The table reproduces Table 3/12 of Dai et al. 2021 as decided in docs/coatnet.md. A model is a list of
*stages*; stage 0 is always the convolutional stem, every later stage is a run of MBConv or Transformer
blocks. ``depths``, ``dims``, ``block_types`` and ``strides`` are parallel lists over those stages, so
CoAtNet-6/7, whose third stage is split into MBConv blocks followed by Transformer blocks at the same
resolution, simply have six stages instead of five (the second half of the split has stride 1).

Adding a variant (CoAtNet-8) is one row in ``VARIANTS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

BlockType = Literal["stem", "mbconv", "transformer"]
Downsample = Literal["conv1x1", "depthwise"]

BLOCK_TYPES: tuple[str, ...] = ("stem", "mbconv", "transformer")
DOWNSAMPLE_MODES: tuple[str, ...] = ("conv1x1", "depthwise")


@dataclass
class CoAtNetConfig:
    """Everything needed to rebuild one CoAtNet; ``dataclasses.asdict`` of it is JSON-serialisable.

    ``strides[i]`` is the spatial stride of stage ``i`` relative to its input (2 or 1); the product over
    all stages is the network's total stride (32 for every published variant).
    """

    name: str
    depths: list[int]
    dims: list[int]
    block_types: list[str]
    strides: list[int]
    # Channels per attention head ("head size" in the paper's Table 12).
    head_dim: int = 32
    # MBConv expands to expand_ratio * D_out; squeeze-excitation squeezes to se_ratio * D_out.
    expand_ratio: int = 4
    se_ratio: float = 0.25
    mlp_ratio: int = 4
    # Where an MBConv block puts its stride: the first 1x1 conv (paper Eq. 5) or the depthwise conv.
    downsample: str = "conv1x1"
    # GAP -> LayerNorm -> Linear(D, D) + tanh before the classifier; needed for the published counts.
    pre_logits: bool = True
    num_classes: int = 1000
    image_size: int = 224
    in_chans: int = 3
    # Maximum stochastic-depth rate; block i of n gets drop_path_rate * i / (n - 1).
    drop_path_rate: float = 0.0
    bn_eps: float = 1e-5
    # PyTorch convention: running = (1 - momentum) * running + momentum * batch. TensorFlow's decay d is
    # momentum 1 - d (TF/Keras's default decay 0.99, presumably the paper's, is 0.01); 0.1 is torch's
    # default, which this model has always used (docs/coatnet.md does not fix it).
    bn_momentum: float = 0.1
    ln_eps: float = 1e-5
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self._validate()

    @property
    def total_stride(self) -> int:
        """Input pixels per output token along one side (32 for the published variants)."""
        stride = 1
        for s in self.strides:
            stride *= s
        return stride

    def stage_grids(self, image_size: int | tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Output (height, width) of every stage for an input of ``image_size`` (default: the config's)."""
        size = self.image_size if image_size is None else image_size
        h, w = (size, size) if isinstance(size, int) else size
        grids = []
        for s in self.strides:
            h, w = h // s, w // s
            grids.append((h, w))
        return grids

    def _validate(self) -> None:
        """Reject bad values with a message naming the field; called once, at construction."""
        n = len(self.depths)
        for key in ("dims", "block_types", "strides"):
            if len(getattr(self, key)) != n:
                raise ValueError(
                    f"CoAtNetConfig '{self.name}': '{key}' has {len(getattr(self, key))} entries but 'depths' "
                    f"has {n}; depths, dims, block_types and strides are parallel lists over the stages"
                )
        for key in ("depths", "dims", "strides"):
            values = getattr(self, key)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise ValueError(
                    f"CoAtNetConfig '{self.name}': '{key}' must be positive integers, got {values}"
                )
        if n < 2 or self.block_types[0] != "stem" or "stem" in self.block_types[1:]:
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'block_types' must start with 'stem' followed by at least one "
                f"'mbconv'/'transformer' stage, got {self.block_types}"
            )
        unknown = sorted(set(self.block_types) - set(BLOCK_TYPES))
        if unknown:
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'block_types' has unknown {unknown}; use {BLOCK_TYPES}"
            )
        kinds = self.block_types[1:]
        if "transformer" in kinds and "mbconv" in kinds[kinds.index("transformer") :]:
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'block_types' must put every 'mbconv' stage before the first "
                f"'transformer' stage (layout C-C-T-T), got {self.block_types}"
            )
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"CoAtNetConfig '{self.name}': 'strides' must be 1 or 2, got {self.strides}")
        if self.strides[0] != 2:
            raise ValueError(f"CoAtNetConfig '{self.name}': the stem ('strides'[0]) must have stride 2")
        for key in ("head_dim", "expand_ratio", "mlp_ratio", "in_chans", "image_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"CoAtNetConfig '{self.name}': '{key}' must be a positive integer, got {value!r}"
                )
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'num_classes' must be an integer >= 0 (0: no classifier)"
            )
        for stage, (kind, dim) in enumerate(zip(self.block_types, self.dims)):
            if kind == "transformer" and dim % self.head_dim:
                raise ValueError(
                    f"CoAtNetConfig '{self.name}': stage {stage} width {dim} is not divisible by 'head_dim' "
                    f"{self.head_dim}"
                )
        if int(self.se_ratio * min(self.dims)) < 1 or not 0 < self.se_ratio <= 1:
            raise ValueError(f"CoAtNetConfig '{self.name}': 'se_ratio' {self.se_ratio} leaves no SE channels")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'downsample' must be one of {DOWNSAMPLE_MODES}, got {self.downsample!r}"
            )
        if not isinstance(self.pre_logits, bool):
            raise ValueError(f"CoAtNetConfig '{self.name}': 'pre_logits' must be true or false")
        if (
            isinstance(self.bn_momentum, bool)
            or not isinstance(self.bn_momentum, (int, float))
            or not (0.0 < self.bn_momentum <= 1.0)
        ):
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'bn_momentum' must be a number in (0, 1] (PyTorch convention: "
                f"1 - TensorFlow's decay), got {self.bn_momentum!r}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"CoAtNetConfig '{self.name}': 'drop_path_rate' must be in [0, 1)")
        if self.image_size % self.total_stride:
            raise ValueError(
                f"CoAtNetConfig '{self.name}': 'image_size' {self.image_size} is not divisible by the total "
                f"stride {self.total_stride}"
            )


def _variant(name: str, depths: list[int], dims: list[int], head_dim: int, notes: str = "") -> CoAtNetConfig:
    """One table row: five stages C-C-T-T, or six when S3 is split into MBConv then Transformer."""
    if len(depths) == 5:
        block_types = ["stem", "mbconv", "mbconv", "transformer", "transformer"]
        strides = [2, 2, 2, 2, 2]
    else:
        block_types = ["stem", "mbconv", "mbconv", "mbconv", "transformer", "transformer"]
        # The Transformer half of the split S3 runs at the MBConv half's resolution: stride 1.
        strides = [2, 2, 2, 2, 1, 2]
    return CoAtNetConfig(
        name=name,
        depths=depths,
        dims=dims,
        block_types=block_types,
        strides=strides,
        head_dim=head_dim,
        notes=notes,
    )


# Published parameters / MACs (docs/coatnet.md section 1) are checked against these rows in the tests.
VARIANTS: dict[str, CoAtNetConfig] = {
    "coatnet_0": _variant("coatnet_0", [2, 2, 3, 5, 2], [64, 96, 192, 384, 768], 32),
    "coatnet_1": _variant("coatnet_1", [2, 2, 6, 14, 2], [64, 96, 192, 384, 768], 32),
    "coatnet_2": _variant("coatnet_2", [2, 2, 6, 14, 2], [128, 128, 256, 512, 1024], 32),
    "coatnet_3": _variant("coatnet_3", [2, 2, 6, 14, 2], [192, 192, 384, 768, 1536], 32),
    "coatnet_4": _variant("coatnet_4", [2, 2, 12, 28, 2], [192, 192, 384, 768, 1536], 32),
    "coatnet_5": _variant("coatnet_5", [2, 2, 12, 28, 2], [192, 256, 512, 1280, 2048], 64),
    "coatnet_6": _variant(
        "coatnet_6",
        [2, 2, 4, 8, 42, 2],
        [192, 192, 384, 768, 1536, 3072],
        128,
        notes="S4 width 3072, not Table 12's 2048: only 3072 gives the published 1.47B parameters and 1521B "
        "MACs at 512 (docs/coatnet.md 1.1).",
    ),
    "coatnet_7": _variant("coatnet_7", [2, 2, 4, 8, 42, 2], [192, 256, 512, 1024, 2048, 3072], 128),
}


def resolve_config(name: str, **overrides: Any) -> CoAtNetConfig:
    """The variant ``name`` with ``overrides`` applied; unknown names/fields raise ValueError naming them."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CoAtNet variant '{name}'; available: {sorted(VARIANTS)}")
    return config_from_dict({**dataclasses.asdict(VARIANTS[name]), **overrides})


def config_from_dict(values: dict[str, Any]) -> CoAtNetConfig:
    """Build a config from a plain dict (e.g. an export's JSON sidecar), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(CoAtNetConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown CoAtNet config field(s) {unknown}; known fields: {sorted(known)}")
    values = dict(values)
    for key in ("depths", "dims", "block_types", "strides"):
        if key in values:
            # JSON gives lists, the table gives lists, a caller may pass tuples: store lists.
            values[key] = list(values[key])
    return CoAtNetConfig(**values)
