"""The CoAtNet network: a stem, a list of MBConv/Transformer stages and a classification head.

Resolution. Relative-bias tables are stored at the configured ``image_size``. Two paths change that:
- On load (persistent): ``load_state_dict`` bilinearly resizes every incoming table whose grid differs
  to this model's grid, so a 224 checkpoint loads into a 384 model (S3 27x27 -> 47x47, S4 13x13 -> 23x23).
  ``resize_relative_bias_tables`` does the same on a bare state dict for callers that cannot use the
  model's own load (ZeRO-3 sharded targets). Fine-tuning at 384 builds a 384 model and loads: tables are
  resized once and then trained at their new size.
- On the fly (transient): a forward at any other size divisible by the total stride (32) interpolates the
  tables to that grid inside each attention forward; nothing is stored. This costs one small
  interpolation per layer per step, and gives the same outputs as resizing on load.

Distribution. Nothing here knows about ranks or DeepSpeed. Parameters are created and initialised in the
``__init__`` of the module that owns them, so building inside ``deepspeed.zero.Init`` partitions
already-initialised weights, and no forward reads a parameter of another module.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import MBConv, RelativeAttention, Stem, TransformerBlock
from .config import CoAtNetConfig
from .layers import Linear, recomputing
from .relative_bias import TABLE_SUFFIX


class Stage(nn.Module):
    """A run of blocks at one width; optionally checkpoints each block during training."""

    def __init__(self, kind: str, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_block(block, x)
            else:
                x = block(x)
        return x


def checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` under non-reentrant torch.utils.checkpoint, BatchNorm statistics updated once.

    Eager: checkpoint calls ``run`` in the forward and again in backward to recompute; every call after
    the first runs under ``recomputing()``, where ``layers.BatchNorm2d`` skips its running-stat update.

    Compiled (torch.compile of the model): dynamo traces the checkpoint into a region of the graph; the
    partitioner recomputes it in the backward graph, and the running-stat updates stay in the forward,
    applied once. ``run`` then only calls the block: counting calls would be a side effect, which
    dynamo refuses inside a checkpoint region. The count is still there whenever ``run`` really runs
    eagerly, including when dynamo cannot trace the region (a graph break in the block, e.g. ZeRO-3's
    compiler-disabled parameter hooks) and falls back to calling this checkpoint eagerly.
    """
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        if torch.compiler.is_compiling():
            return block(inp)
        calls += 1
        with recomputing() if calls > 1 else contextlib.nullcontext():
            return block(inp)

    return checkpoint(run, x, use_reentrant=False)


class Head(nn.Module):
    """GAP -> LayerNorm -> [Linear(D, D) + tanh] -> Linear(D, classes) (Identity when classes == 0)."""

    def __init__(self, dim: int, num_classes: int, pre_logits: bool, ln_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.pre_logits = Linear(dim, dim) if pre_logits else None
        self.fc = Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, D) -> (B, D)
        x = self.norm(x.mean((1, 2)))
        return torch.tanh(self.pre_logits(x)) if self.pre_logits is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_pre_logits(x))


class CoAtNet(nn.Module):
    """CoAtNet (Dai et al. 2021) built from a ``CoAtNetConfig``; see ``pretrain.model.create_model``.

    ``forward_features`` returns the last stage's (B, H/32, W/32, D) token map; ``forward_head`` pools
    and classifies it. Input: (B, C, H, W) with H and W divisible by the total stride.

    The convolutional stages use BatchNorm as in the paper (``layers.BatchNorm2d``, which keeps its
    statistics right under checkpointing): each data-parallel rank keeps its own running statistics (not
    synchronised), so an export must make them consistent.
    """

    def __init__(self, config: CoAtNetConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.image_size = config.image_size
        self.stages = nn.ModuleList(_build_stages(config))
        self.head = Head(config.dims[-1], config.num_classes, config.pre_logits, config.ln_eps)

    # --- forward ---------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H/32, W/32, D) features of the last stage."""
        self._check_input(x)
        # Channels-last lets the CPU (oneDNN) and GPU (cuDNN) convs run without layout reorders, and
        # makes the hand-over to the token layout below a free view.
        x = x.contiguous(memory_format=torch.channels_last)
        tokens = False  # conv stages: (B, C, H, W); Transformer stages: (B, H, W, C)
        for stage in self.stages:
            if stage.kind == "transformer" and not tokens:
                x, tokens = x.permute(0, 2, 3, 1), True
            x = stage(x)
        return x if tokens else x.permute(0, 2, 3, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, D) features -> (B, classes) logits, or the (B, D) pre-logits when asked."""
        return self.head.forward_pre_logits(x) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _check_input(self, x: torch.Tensor) -> None:
        stride = self.config.total_stride
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected (B, {self.config.in_chans}, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[2] % stride or x.shape[3] % stride:
            raise ValueError(
                f"image height and width must be divisible by {stride}, got {tuple(x.shape[2:])}"
            )

    # --- training conveniences -------------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        for stage in self.stages:
            stage.grad_checkpointing = enabled

    def no_weight_decay(self) -> set[str]:
        """Names of parameters exempt from weight decay: biases, norm weights and relative-bias tables.

        Decided by module type and name, not by shape, so it is right on ZeRO-3 partitioned parameters.
        """
        names = set()
        norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if isinstance(module, norm_types) or param_name == "bias" or param_name == TABLE_SUFFIX:
                    names.add(full)
        return names

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: none)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        dim = self.config.dims[-1]
        self.head.fc = Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def relative_bias_table_shapes(self) -> dict[str, torch.Size]:
        """Parameter name -> (heads, 2H-1, 2W-1) of every bias table at this model's resolution.

        Derived from the config, not the parameters, so it is valid for a ZeRO-3 sharded model too.
        """
        return {
            f"{name}.{TABLE_SUFFIX}": module.table_shape
            for name, module in self.named_modules()
            if isinstance(module, RelativeAttention)
        }

    def init_non_persistent_buffers(self) -> None:
        """Recompute index buffers, e.g. after ``to_empty(device=...)`` of a model built on meta."""
        for module in self.modules():
            if isinstance(module, RelativeAttention):
                module.init_non_persistent_buffers()


def _build_stages(config: CoAtNetConfig) -> list[Stage]:
    """Instantiate every stage; drop-path rates grow linearly over the residual blocks (stem excluded)."""
    residual_blocks = sum(config.depths[1:])
    rates = [config.drop_path_rate * i / max(residual_blocks - 1, 1) for i in range(residual_blocks)]
    grids = config.stage_grids()
    stem = Stem(config.in_chans, config.dims[0], config.depths[0], config.bn_eps, config.bn_momentum)
    stages = [Stage("stem", [stem])]
    block_index = 0
    for s in range(1, len(config.depths)):
        blocks: list[nn.Module] = []
        for i in range(config.depths[s]):
            dim_in = config.dims[s - 1] if i == 0 else config.dims[s]
            stride = config.strides[s] if i == 0 else 1
            blocks.append(_build_block(config, s, dim_in, stride, grids[s], rates[block_index]))
            block_index += 1
        stages.append(Stage(config.block_types[s], blocks))
    return stages


def _build_block(
    config: CoAtNetConfig, stage: int, dim_in: int, stride: int, grid: tuple[int, int], drop_path: float
) -> nn.Module:
    dim_out = config.dims[stage]
    if config.block_types[stage] == "mbconv":
        return MBConv(
            dim_in,
            dim_out,
            stride=stride,
            downsample=config.downsample,
            expand_ratio=config.expand_ratio,
            se_ratio=config.se_ratio,
            drop_path=drop_path,
            bn_eps=config.bn_eps,
            bn_momentum=config.bn_momentum,
        )
    return TransformerBlock(
        dim_in,
        dim_out,
        stride=stride,
        head_dim=config.head_dim,
        grid=grid,
        mlp_ratio=config.mlp_ratio,
        drop_path=drop_path,
        ln_eps=config.ln_eps,
    )
