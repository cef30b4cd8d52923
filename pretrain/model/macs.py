"""Parameters and multiply-accumulates per stage, counted on the meta device (no memory, no compute).

MACs follow the paper's "FLOPs" convention: one multiply-add per weight use in convs and linear layers,
plus the two attention products (q.k^T and attn.v: 2 * head_dim MACs per attention logit). Element-wise
work (norms, activations, the bias add and softmax, pooling) is not counted. The count uses forward hooks
with explicit per-layer formulas, which keeps it independent of torch's own FLOP counter that the tests
compare it with. Each row also reports ``attention_logits``, the attention scores computed: the sum over
attention layers of heads * N^2 for N tokens.

Why we are below the paper. ``PUBLISHED_MACS`` holds every figure the paper prints. Our totals are 0.9% to
3.5% lower at all 20 of them, more so at higher resolution (CoAtNet-2: -1.3% at 224, -2.1% at 384, -3.5%
at 512). The whole gap is one term this counter leaves out on purpose: about 13.5 MACs per attention logit
(least-squares fit over CoAtNet-0..5; 13.3 to 14.2 at every 384/512 point that the paper's rounding lets
one read). Adding 13.5 * attention_logits brings CoAtNet-0..5 within 0.9% of the paper at all 18 of their
points, about the paper's own rounding for the small models (4.2B is +-1.2%). docs/macs.md has the numbers.
- The gap grows with heads * N^2, not with D * N^2, so it is not the attention products: at 512,
  CoAtNet-5 (head size 64) misses 13.6 MACs per logit and CoAtNet-3 (head size 32) 13.9. As a share of
  the attention products that is 0.11 against 0.22. A larger token count, another stage layout or wider
  attention would scale with D * N^2.
- It does not grow with the grid side S: 14.2 and 13.9 per logit for CoAtNet-3 at 384 and 512. The
  paper's one-hot einsum lookup of the bias on TPU (its Appendix A.1) costs about 2S + 3 MACs per logit,
  51 at 384 and 67 at 512 in S3; fitted together with a flat per-logit term it gets weight 0. A gather,
  which is what this model does, costs no MACs.
- Bilinear resizing of the bias tables to 384/512 costs about heads * (2S - 1)^2 * 4 MACs per layer, 4M
  for CoAtNet-2 at 512 (0.1% of its 3.35B gap), once per forward at most. A larger table changes nothing:
  a lookup costs the same whatever the table's size.
- A per-pixel term (element-wise work in norms and activations) fits to zero, under 0.1% of our MACs.
What the model does per logit besides the two products is element-wise: the bias add and the softmax
(max, subtract, exp, sum, divide). The paper's counter evidently charges about 13.5 for that. This counter
counts no element-wise work anywhere, so it is not changed to match.
CoAtNet-6/7 stay 1.2% and 1.5% low even with that term added. Their layout is our reading of the paper's
Table 12 (docs/coatnet.md 1.1); that question is not about attention.
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
    # Attention scores computed: sum over the stage's attention layers of heads * N^2 (0 for convs).
    attention_logits: int = 0


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

    @property
    def attention_logits(self) -> int:
        return sum(s.attention_logits for s in self.stages)


@dataclass(frozen=True)
class PublishedMacs:
    """One "#FLOPs" figure of the paper: MACs for one image of a variant at one size, and where it is."""

    name: str
    image_size: int
    macs: float
    source: str
    # The paper's Tables 5 and 9 also count the variant with the stride on the depthwise conv.
    downsample: str = "conv1x1"


# The paper's parameter counts (docs/coatnet.md section 1), with its 1000-class head.
PUBLISHED_PARAMS = {
    "coatnet_0": 25e6,
    "coatnet_1": 42e6,
    "coatnet_2": 75e6,
    "coatnet_3": 168e6,
    "coatnet_4": 275e6,
    "coatnet_5": 688e6,
    "coatnet_6": 1.47e9,
    "coatnet_7": 2.44e9,
}

# Every "#FLOPs" figure Dai et al. 2021 (arXiv 2106.04803v2) publish for CoAtNet-0..7, each (variant,
# size, downsampling) once. Table 4 (ImageNet-1K and 21K+1K fine-tunes) and Table 5 (JFT) list the
# same model at the same size with the same figure (CoAtNet-4 at 512: 360.9B and 361B); the more precise
# one is kept. Table 4/9 round to 0.1B, Table 5 to 1B.
PUBLISHED_MACS: tuple[PublishedMacs, ...] = (
    PublishedMacs("coatnet_0", 224, 4.2e9, "Table 4, Table 9"),
    PublishedMacs("coatnet_0", 384, 13.4e9, "Table 4"),
    PublishedMacs("coatnet_1", 224, 8.4e9, "Table 4, Table 9"),
    PublishedMacs("coatnet_1", 384, 27.4e9, "Table 4"),
    PublishedMacs("coatnet_2", 224, 15.7e9, "Table 4, Table 9"),
    PublishedMacs("coatnet_2", 384, 49.8e9, "Table 4"),
    PublishedMacs("coatnet_2", 512, 96.7e9, "Table 4"),
    PublishedMacs("coatnet_3", 224, 34.7e9, "Table 4"),
    PublishedMacs("coatnet_3", 384, 107.4e9, "Table 4"),
    PublishedMacs("coatnet_3", 512, 203.1e9, "Table 4"),
    PublishedMacs("coatnet_4", 384, 189.5e9, "Table 4"),
    PublishedMacs("coatnet_4", 512, 360.9e9, "Table 4, Table 5 (361B)"),
    PublishedMacs("coatnet_5", 512, 812e9, "Table 5"),
    PublishedMacs("coatnet_6", 512, 1521e9, "Table 5"),
    PublishedMacs("coatnet_7", 512, 2586e9, "Table 5"),
    PublishedMacs("coatnet_0", 224, 4.6e9, "Table 9, strided DConv", "depthwise"),
    PublishedMacs("coatnet_1", 224, 8.8e9, "Table 9, strided DConv", "depthwise"),
    PublishedMacs("coatnet_2", 224, 16.6e9, "Table 9, strided DConv", "depthwise"),
    PublishedMacs("coatnet_3", 384, 114e9, "Table 5, CoAtNet-3 dagger", "depthwise"),
    PublishedMacs("coatnet_3", 512, 214e9, "Table 5, CoAtNet-3 dagger", "depthwise"),
)


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
    logits = {name: 0 for name in _row_names(model)}
    handles = []
    for row, module in _row_modules(model):
        for sub in module.modules():
            counter = _mac_formula(sub)
            if counter is not None:
                handles.append(sub.register_forward_hook(_accumulate(macs, row, counter)))
            if isinstance(sub, RelativeAttention):
                handles.append(sub.register_forward_hook(_accumulate(logits, row, _attention_logits)))
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
                attention_logits=logits[f"stages.{s}"],
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
        # q.k^T and attn.v: each head_dim MACs per logit; the qkv/proj Linears count themselves. The
        # bias lookup is a gather, and a table resize (forward at another size) is O(heads * N): neither
        # is counted (module docstring).
        return lambda m, inputs, out: 2 * m.head_dim * _attention_logits(m, inputs, out)
    return None


def _attention_logits(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
    """B * heads * N^2 scores of one RelativeAttention call on (B, H, W, C) tokens, N = H * W."""
    b, h, w, _ = inputs[0].shape
    return b * module.heads * (h * w) ** 2


def _accumulate(totals: dict[str, int], row: str, formula: MacFormula) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        totals[row] += formula(module, inputs, out)

    return hook
