"""Mixup (Zhang et al. 2018) on an output batch, as in the IN-1K recipe of CoAtNet.

Each sample is mixed with the sample at the mirrored position of the same batch (x.flip(0)), one lambda
per batch; lambda comes from the loader, drawn from Beta(alpha, alpha) with a generator keyed by the
batch's position in the epoch, so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch


def mix_batch(images: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return lam * x + (1 - lam) * x.flip(0) for images [N, 3, H, W] and float targets [N, C]."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup lambda must be in [0, 1], got {lam}")
    mixed = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    return mixed, targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
