"""AdamW with the paper's parameter groups, and the warm-up + decay learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pretrain.config import OptimConfig, ScheduleConfig


def param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], no_decay: set[str], weight_decay: float
) -> list[dict]:
    """Two groups: decayed weights, and biases/norms/relative-bias tables (named by the model) undecayed."""
    decay, skip = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (skip if name in no_decay else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": skip, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW (not DeepSpeed's CPU Adam: that one does not resume bit-exactly, see platform notes)."""
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups(model.named_parameters(), no_decay, cfg.weight_decay)
    # fused: one pass over each tensor, on GPUs and CPUs alike. The foreach path builds temporaries of the
    # size of what it updates, and under ZeRO-3 that is a rank's whole flat fp32 partition: measured on
    # CoAtNet-5's widths (benchmarks/full_size.py), the step's peak drops by 1.3x the fp32 shard.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


class WarmupDecay:
    """lr(step) / peak: linear warm-up from 0, then cosine, linear or no decay down to min_lr.

    A callable object (not a lambda) so that LambdaLR's state dict, saved in every checkpoint, holds it.
    """

    def __init__(self, *, peak: float, floor: float, warmup: int, total: int, decay: str):
        if warmup > total:
            raise ValueError(f"warm-up ({warmup} steps) is longer than the whole schedule ({total} steps)")
        self.peak, self.floor, self.warmup, self.total, self.decay = peak, floor, warmup, total, decay

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.peak
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.decay == "cosine" else 1.0 - t
        return self.floor + (self.peak - self.floor) * shape

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak if self.peak > 0 else 0.0


def total_and_warmup_steps(cfg: ScheduleConfig, steps_per_epoch: float) -> tuple[int, int]:
    """Resolve epochs into optimizer steps (steps_per_epoch counts optimizer steps, accumulation included)."""
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch)
    return total, warmup


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, schedule: ScheduleConfig, steps_per_epoch: float
) -> torch.optim.lr_scheduler.LambdaLR:
    total, warmup = total_and_warmup_steps(schedule, steps_per_epoch)
    fn = WarmupDecay(peak=optim.lr, floor=optim.min_lr, warmup=warmup, total=total, decay=schedule.decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
