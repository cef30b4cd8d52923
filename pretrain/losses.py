"""The paper's two losses: softmax cross-entropy (IN-1K) and sigmoid cross-entropy (JFT / IN-21K)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pretrain.config import LossConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def smooth(targets: torch.Tensor, num_classes: int, smoothing: float, off_value: float) -> torch.Tensor:
    """Class indices [N] or distributions/multi-hot [N, C] -> smoothed float targets [N, C]."""
    if targets.dtype == torch.long:
        targets = F.one_hot(targets, num_classes).float()
    return targets.float() * (1.0 - smoothing) + smoothing * off_value


def build_loss(cfg: LossConfig, num_classes: int) -> LossFn:
    """loss(logits [N, C], targets) -> scalar; computed in fp32 whatever the logits' dtype."""
    if cfg.kind == "softmax":

        def softmax_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = logits.float()
            if targets.dtype == torch.long:
                return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
            soft = smooth(targets, num_classes, cfg.label_smoothing, 1.0 / num_classes)  # mixup targets
            return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()

        return softmax_xent

    def sigmoid_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Summed over classes, averaged over images: with 18k-30k classes a per-class mean would make the
        # gradient of each positive label vanish.
        soft = smooth(targets, num_classes, cfg.label_smoothing, 0.5)
        per_class = F.binary_cross_entropy_with_logits(logits.float(), soft, reduction="none")
        return per_class.sum(dim=-1).mean()

    return sigmoid_xent
