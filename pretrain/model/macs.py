"""Parameters and multiply-accumulates per stage, counted on the meta device (no memory, no compute).

MACs follow the paper's "FLOPs" convention: one multiply-add per weight use in convs and linear layers,
plus the two attention products (q.k^T and attn.v). Element-wise work (norms, activations, softmax,
pooling) is not counted. The count uses forward hooks with explicit per-layer formulas, which keeps it
independent of torch's own FLOP counter that the tests compare it with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import RelativeAttention
from .coatnet import CoAtNet
from .factory import create_model, create_model_from_config


@dataclass
class StageCount:
    """One row of the summary: a stage (or the head) with its parameters and MACs for one image."""

    label: str
    kind: str
    blocks: int
    width: int
    grid: tuple[int, int]
    params: int
    macs: int


@dataclass
class MacCount:
    """Per-stage and total counts of one model at one input size (batch of one image)."""

    name: str
    image_size: int
    stages: list[StageCount]

    @property
    def params(self) -> int:
        return sum(s.params for s in self.stages)

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.stages)


def count_macs(model_or_name: CoAtNet | str, image_size: int | None = None) -> MacCount:
    """Count parameters and MACs per stage for one ``image_size`` x ``image_size`` image.

    A name builds that variant; a model is rebuilt from its ``config``. Either way the counted copy lives
    on the meta device, so even CoAtNet-7 costs no memory. ``image_size`` defaults to the model's own.
    """
    with torch.device("meta"):
        if isinstance(model_or_name, str):
            model = create_model(model_or_name, image_size=image_size or 224)
        else:
            model = create_model_from_config(model_or_name.config)
    size = image_size or model.image_size
    config = model.config
    grids = config.stage_grids(size)
    macs = {name: 0 for name in _row_names(model)}
    handles = []
    for row, module in _row_modules(model):
        for sub in module.modules():
            counter = _mac_formula(sub)
            if counter is not None:
                handles.append(sub.register_forward_hook(_accumulate(macs, row, counter)))
    try:
        with torch.no_grad():
            model(torch.empty(1, config.in_chans, size, size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for s, stage in enumerate(model.stages):
        rows.append(
            StageCount(
                label=_stage_label(config.strides, s),
                kind=stage.kind,
                blocks=config.depths[s],
                width=config.dims[s],
                grid=grids[s],
                params=_numel(stage),
                macs=macs[f"stages.{s}"],
            )
        )
    rows.append(StageCount("head", "head", 1, config.dims[-1], (1, 1), _numel(model.head), macs["head"]))
    return MacCount(name=config.name, image_size=size, stages=rows)


def _row_names(model: CoAtNet) -> list[str]:
    return [f"stages.{s}" for s in range(len(model.stages))] + ["head"]


def _row_modules(model: CoAtNet) -> list[tuple[str, nn.Module]]:
    return [*((f"stages.{s}", stage) for s, stage in enumerate(model.stages)), ("head", model.head)]


def _stage_label(strides: list[int], index: int) -> str:
    """Paper name of stage ``index``: S0..S4; the stride-1 half of a split stage keeps its number."""
    return f"S{sum(1 for s in strides[: index + 1] if s == 2) - 1}"


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


MacFormula = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], int]


def _mac_formula(module: nn.Module) -> MacFormula | None:
    """The MAC count of one call of ``module``'s own forward, or None for modules counted elsewhere."""
    if isinstance(module, nn.Conv2d):
        return lambda m, inputs, out: (
            out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        )
    if isinstance(module, nn.Linear):
        return lambda m, inputs, out: out.numel() * m.in_features
    if isinstance(module, RelativeAttention):
        # q.k^T and attn.v: each B * heads * N * N * head_dim; the qkv/proj Linears count themselves.
        def attention(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
            b, h, w, _ = inputs[0].shape
            n = h * w
            return 2 * b * m.heads * n * n * m.head_dim

        return attention
    return None


def _accumulate(totals: dict[str, int], row: str, formula: MacFormula) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        totals[row] += formula(module, inputs, out)

    return hook
