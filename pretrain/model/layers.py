"""Leaf layers shared by the CoAtNet blocks.

``Linear`` and ``Conv2d`` initialise themselves (truncated normal, std 0.02, zero bias: docs/coatnet.md
section 2) inside their own ``reset_parameters``, which torch calls at the end of their ``__init__``. That
matters under ``deepspeed.zero.Init``: a module's parameters are partitioned as soon as its own
``__init__`` returns, so a parent that initialised its children afterwards would only touch an empty shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    """Normal(0, std) truncated at +-2 std (TensorFlow's ``truncated_normal``), in place.

    Draws a normal and redraws only the ~4.6% outside the bounds until none is left: the same
    distribution as ``nn.init.trunc_normal_``, whose erfinv path takes ~7 s for CoAtNet-0 on 2 CPU cores.
    """
    tensor.normal_(0.0, std)
    if tensor.is_meta:
        return tensor
    flat = tensor.view(-1)
    bound = 2.0 * std
    outside = (flat.abs() > bound).nonzero().squeeze(1)
    while outside.numel():  # about five rounds for 25M values; host sync per round, init only
        redraw = flat.new_empty(outside.numel()).normal_(0.0, std)
        flat[outside] = redraw
        outside = outside[redraw.abs() > bound]
    return tensor


class Linear(nn.Linear):
    """``nn.Linear`` with the paper's initialisation."""

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with the paper's initialisation."""

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


# True while an eager torch.utils.checkpoint recomputes a block in backward (set by
# ``coatnet.checkpoint_block`` through ``recomputing``).
_RECOMPUTING = False


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the code inside as the recomputation of an already-run forward (activation checkpointing)."""
    global _RECOMPUTING
    before, _RECOMPUTING = _RECOMPUTING, True
    try:
        yield
    finally:  # also when checkpoint stops the recomputation early by raising
        _RECOMPUTING = before


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with two guarantees the trainer relies on.

    - Running statistics stay fp32 when the rest of the model is bf16. Building under
      ``deepspeed.zero.Init`` creates the buffers in bf16 (8 bits of mantissa: a running variance then
      moves in steps of ~0.4%), so they are made fp32 again right here. The forward normalises bf16
      activations with the fp32 statistics and fp32 copies of the affine weights (the mixed-dtype
      batch-norm kernel of the CPU and of cuDNN); the output keeps the input's dtype.
    - They are updated once per forward, even with checkpointing. A checkpointed block runs its forward
      twice: once in the forward pass, once more in backward to recompute activations. Inside
      ``recomputing()`` this layer normalises with the batch statistics as before (bit-identical output,
      same kernel) but sends the running-statistics update to throw-away copies (a few KB) and leaves
      ``num_batches_tracked`` alone. Both are plain tensor code that dynamo traces.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.training and self.track_running_stats and _RECOMPUTING
        mixed = (
            self.running_mean is not None
            and self.weight is not None
            and self.weight.dtype != self.running_mean.dtype
        )
        if not (recompute or mixed):
            return super().forward(x)
        self._check_input_dim(x)
        weight, bias = (self.weight.float(), self.bias.float()) if mixed else (self.weight, self.bias)
        if recompute:
            mean, var = self.running_mean.clone(), self.running_var.clone()
            return F.batch_norm(x, mean, var, weight, bias, True, 0.0, self.eps)
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as nn.BatchNorm2d (a host sync; unused here)
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight, bias, self.training, momentum or 0.0, self.eps
        )


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``rate``, rescale the rest."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        # One draw per sample, broadcast over (H, W, C) whatever the layout of the 4-D tensor.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: GAP -> 1x1 to ``hidden`` -> SiLU -> 1x1 back -> sigmoid gate on the input."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = Conv2d(channels, hidden, 1)
        self.expand = Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> gate: (B, C, 1, 1)
        gate = x.mean((2, 3), keepdim=True)
        gate = self.expand(F.silu(self.reduce(gate)))
        return x * gate.sigmoid()


def max_pool_nhwc(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pool, stride 2, on a (B, H, W, C) tensor without changing its layout -> (B, H/2, W/2, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4))
