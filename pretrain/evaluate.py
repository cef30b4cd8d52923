"""Evaluation on a held-out split, exact across ranks: every sample is counted once, padding never."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pretrain import dist


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable,
    *,
    label_kind: str,
    device: torch.device,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """Top-1/top-5 (single-label) or precision@1 (multi-label) over the whole split.

    `batches` yields (images, labels, valid) where `valid` masks out the padding that gives every rank
    the same number of batches (ZeRO-3 forwards are collective: all ranks must run the same count).
    Counts are summed over ranks, so the result is the same on every rank.

    `stop` (collective, e.g. PreemptionHandler.poll) is asked before every batch, so that a stop request
    is not held up by a long evaluation; when it says True (on every rank at the same batch) the
    evaluation is abandoned and None returned.
    """
    # [correct@1, correct@5, samples]; kept on the device, synchronised once at the end.
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels, valid in batches:
        if stop is not None and stop():
            return None
        logits = forward(images).float()
        valid = valid.to(logits.device, torch.bool)
        labels = labels.to(logits.device)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # [N, k]
        if label_kind == "multi":  # labels: multi-hot [N, C]; precision@1 = top prediction is a true label
            hit1 = labels.gather(1, top[:, :1]).squeeze(1) > 0
            hit5 = (labels.gather(1, top) > 0).any(dim=1)
        else:  # labels: class indices [N]
            hits = top == labels[:, None]
            hit1, hit5 = hits[:, 0], hits.any(dim=1)
        counts += torch.stack([(hit1 & valid).sum(), (hit5 & valid).sum(), valid.sum()]).to(counts)
    dist.all_reduce_sum(counts)
    correct1, correct5, total = counts.tolist()
    if total == 0:
        raise ValueError("the evaluation split is empty")
    if label_kind == "multi":
        return {"precision_at_1": correct1 / total, "samples": total}
    return {"top1": correct1 / total, "top5": correct5 / total, "samples": total}
