"""`coatnet-data preview` and `coatnet-data bench`: look at and time what the training loader produces."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.pipeline import MEAN, STD


def _label_text(target: torch.Tensor, names: list[str]) -> str:
    if target.ndim == 0:
        return names[int(target)]
    top = torch.nonzero(target > 0.05).flatten().tolist()  # multi-hot or mixed soft targets
    return "+".join(f"{names[i]}:{float(target[i]):.2f}" for i in top)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: [N, 3, H, W] -> [N, H, W, 3] uint8."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = images.float().cpu() * std + mean
    return pixels.clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def preview(
    cfg: DataConfig, out: str | Path, *, image_size: int = 224, count: int = 16, seed: int = 0
) -> Path:
    """Write a grid of `count` augmented training samples with their labels to `out` (PNG)."""
    cfg.batch_size = count
    loader = build_train_loader(
        cfg, image_size=image_size, rank=0, world_size=1, seed=seed, device=torch.device("cpu")
    )
    try:
        images, targets = next(loader)
    finally:
        loader.close()
    tiles = to_uint8(images)
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    grid = Image.new("RGB", (cols * image_size, rows * (image_size + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x, y = (i % cols) * image_size, (i // cols) * (image_size + 14)
        grid.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 2, y + image_size + 1), _label_text(targets[i], loader.class_names)[:40], fill="black")
    grid.save(out)
    return Path(out)


def bench(cfg: DataConfig, *, image_size: int = 224, batches: int = 20, warmup: int = 3) -> float:
    """Training-loader images/s on this machine (CPU decoding unless a CUDA device is visible)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    loader = build_train_loader(cfg, image_size=image_size, rank=0, world_size=1, seed=0, device=device)
    try:
        for _ in range(warmup):
            next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    return batches * cfg.batch_size / elapsed
