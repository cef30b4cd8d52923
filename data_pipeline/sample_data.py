"""Small real-image corpora made without network access, for the demo and the tests.

- Handwritten digits: scikit-learn's 1797 scans (8x8, 17 grey levels, 10 classes), upscaled with a
  random ink/paper colour and a random offset so that the classes are not separable by a single pixel.
- Photographs: random crops of the two photographs shipped in scikit-learn (china.jpg, flower.jpg).
- The image quirks seen in real corpora (PNG, CMYK and grayscale JPEG, a PNG named .JPEG, RGBA).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("china", "flower")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def photograph(name: str) -> Image.Image:
    """One of scikit-learn's bundled photographs ("china" 427x640 or "flower" 427x640) as RGB."""
    from sklearn.datasets import load_sample_image

    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; choose from {PHOTOS}")
    return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")


def render_digit(grey: np.ndarray, image_size: int, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit scan as an RGB image: dark tinted ink on light tinted paper, at a random size and place.

    The variation (colour, scale 70-95%, position) keeps the task from being a lookup, while a tiny CoAtNet
    still learns it in a few hundred steps on a CPU: what the smoke config, the demo and the tests need.
    """
    inner = int(image_size * rng.uniform(0.7, 0.95))
    scan = Image.fromarray((grey * 255).astype(np.uint8)).resize((inner, inner), Image.BICUBIC)
    alpha = np.asarray(scan, dtype=np.float32)[..., None] / 255.0  # [inner, inner, 1]
    ink, paper = rng.uniform(0, 100, 3), rng.uniform(150, 255, 3)
    canvas = np.empty((image_size, image_size, 3), np.float32)
    canvas[:] = paper
    top, left = rng.integers(0, image_size - inner + 1, size=2)
    patch = canvas[top : top + inner, left : left + inner]
    canvas[top : top + inner, left : left + inner] = patch * (1 - alpha) + ink * alpha
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def write_digits_folder(
    out_dir: str | Path,
    *,
    image_size: int = 64,
    label_set: str = "digits",
    limit: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the digits as `out_dir/<class>/<n>.jpg` (ImageNet layout); return `out_dir`.

    label_set "digits" gives 10 classes ("0".."9"); "parity" gives 2 ("even", "odd"), the second label
    set used by fine-tuning tests. `limit` keeps the first N scans.
    """
    if label_set not in {"digits", "parity"}:
        raise ValueError(f"label_set must be 'digits' or 'parity', got {label_set!r}")
    out = Path(out_dir)
    images, targets = _digits()
    count = len(images) if limit is None else min(limit, len(images))
    rng = np.random.default_rng(seed)
    for n in range(count):
        target = int(targets[n])
        name = str(target) if label_set == "digits" else ("even", "odd")[target % 2]
        (out / name).mkdir(parents=True, exist_ok=True)
        render_digit(images[n], image_size, rng).save(out / name / f"{n:05d}.jpg", quality=92)
    return out


def digit_shards(root: str | Path, *, image_size: int = 32, label_set: str = "digits") -> Path:
    """The digits as webdataset shards: `root/shards/train` (80%) and `root/shards/val` (20%), 256 per
    shard, through the build that `coatnet-data build` runs; reused when both manifests exist."""
    from data_pipeline.build import build  # the build reads images with PIL, like this module

    shards = Path(root) / "shards"
    if all((shards / split / "manifest.json").exists() for split in ("train", "val")):
        return shards
    images = write_digits_folder(Path(root) / "images", image_size=image_size, label_set=label_set)
    build(images, shards, shard_size=256, val_fraction=0.2)
    return shards


def write_digits_list(
    out_dir: str | Path, *, image_size: int = 64, limit: int | None = None, seed: int = 0
) -> Path:
    """A multi-label corpus: digit images plus `labels.txt` lines `<path> digit_<d> <even|odd> [small]`.

    "small" marks digits 0-4, so samples carry 2 or 3 labels. Returns the list file path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, targets = _digits()
    count = len(images) if limit is None else min(limit, len(images))
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(count):
        d = int(targets[n])
        render_digit(images[n], image_size, rng).save(out / f"{n:05d}.jpg", quality=92)
        labels = [f"digit_{d}", ("even", "odd")[d % 2]] + (["small"] if d < 5 else [])
        lines.append(f"{n:05d}.jpg " + " ".join(labels))
    path = out / "labels.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_photo_crops_folder(
    out_dir: str | Path, *, per_class: int = 16, image_size: int = 96, seed: int = 0
) -> Path:
    """Random square crops of the two photographs as `out_dir/{china,flower}/<n>.jpg`; return `out_dir`."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = photograph(name)
        (out / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            side = int(rng.integers(min(photo.size) // 3, min(photo.size)))
            left = int(rng.integers(0, photo.width - side + 1))
            top = int(rng.integers(0, photo.height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((image_size, image_size))
            crop.save(out / name / f"{n:04d}.jpg", quality=90)
    return out


def write_quirk_images(class_dir: str | Path, *, size: int = 160) -> dict[str, Path]:
    """Write one photograph crop in every awkward encoding into `class_dir`; return them by quirk name.

    Quirks: png, cmyk_jpeg, grayscale_jpeg, png_named_jpeg (ImageNet has such files, named .JPEG),
    rgba_png, and truncated_jpeg (cut in half: undecodable).
    """
    out = Path(class_dir)
    out.mkdir(parents=True, exist_ok=True)
    photo = photograph("flower").resize((size * 3 // 2, size))
    files = {
        "png": out / "quirk_png.png",
        "cmyk_jpeg": out / "quirk_cmyk.jpg",
        "grayscale_jpeg": out / "quirk_grey.jpeg",
        "png_named_jpeg": out / "quirk_png_named.JPEG",
        "rgba_png": out / "quirk_rgba.png",
        "truncated_jpeg": out / "quirk_truncated.jpg",
    }
    photo.save(files["png"], format="PNG")
    photo.convert("CMYK").save(files["cmyk_jpeg"], format="JPEG", quality=90)
    photo.convert("L").save(files["grayscale_jpeg"], format="JPEG", quality=90)
    photo.save(files["png_named_jpeg"], format="PNG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(files["rgba_png"], format="PNG")
    photo.save(files["truncated_jpeg"], format="JPEG", quality=90)
    data = files["truncated_jpeg"].read_bytes()
    files["truncated_jpeg"].write_bytes(data[: len(data) // 2])
    return files
