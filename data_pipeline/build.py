"""`coatnet-data build`: an image folder tree or a list file -> webdataset shards + DALI indexes + manifest.

Decisions:
- Samples are shuffled once at build time (a fixed seed), so that every shard is a random sample of the
  whole corpus; the loader then only needs to permute shards and the samples within a shard each epoch.
- The train/validation split and the sample keys (the source files' stems) are pure functions of the
  image paths (see `sources.py`): rerunning or resuming a build does not change them.
- Every image is decoded once with Pillow. RGB JPEGs are stored byte for byte; anything else (PNG, CMYK
  or grayscale JPEG, a PNG named .JPEG as in ImageNet, palette/alpha images) is converted to RGB JPEG
  (quality 95) and counted by reason. Files that do not exist ("missing", e.g. a stale list file) or that
  cannot be read or decoded ("unreadable") are left out, counted, and listed in `<split>/skipped.json`.
- Everything a user can get wrong (arguments, source, output, split sizes) is checked before the first
  file is written. Should a split still end up empty (every image in it unreadable), what this run wrote
  is removed again.
- Resumable: a shard is written to `<name>.tmp` (removed again if writing fails), indexed, then renamed,
  and a `<name>.done.json` records which inputs it holds. A rerun keeps every finished shard whose inputs
  are unchanged. Inputs are only ever read. The manifest is written last; then what an earlier build
  left and this one does not list is removed (see `outdir.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_pipeline.manifest import LABEL_EXT, Manifest, ShardInfo, save_manifest, sha256_file
from data_pipeline.outdir import (
    SKIPPED_NAME,
    SPLITS,
    Undo,
    check_output,
    old_shards,
    remove_split,
    tidy_split,
)
from data_pipeline.sources import Item, assign_keys, scan_folder, scan_list_file, split_fraction
from data_pipeline.tarindex import scan_tar, write_index

JPEG_QUALITY = 95
BUILD_SEED = 20210609  # CoAtNet's arXiv date; any fixed value works, it only has to stay fixed


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to write one shard."""

    out_dir: str
    name: str
    items: tuple[Item, ...]
    label_ext: str

    def fingerprint(self) -> str:
        """Hash of the inputs this shard holds, to recognise a finished shard on a rerun."""
        text = json.dumps([[i.rel, i.key, list(i.labels)] for i in self.items])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_rgb_jpeg(data: bytes, suffix: str) -> tuple[bytes, str | None]:
    """Return RGB JPEG bytes and the conversion reason (None when the input was stored as is).

    Raises ValueError (a reason without the file name) when Pillow cannot decode the image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode fully: a truncated file fails here, not in the training loader
            fmt, mode = im.format, im.mode
            if fmt == "JPEG" and mode == "RGB":
                return data, None
            if fmt == "PNG" and suffix in {".jpg", ".jpeg"}:
                reason = "png_named_jpeg"
            elif fmt == "JPEG":
                reason = {"CMYK": "cmyk_jpeg", "L": "grayscale_jpeg"}.get(mode, f"jpeg_{mode.lower()}")
            else:
                reason = f"{fmt or 'unknown'}".lower()
            if mode in {"RGBA", "LA", "P", "PA"}:
                im = im.convert("RGBA")
                canvas = Image.new("RGB", im.size, (255, 255, 255))
                canvas.paste(im, mask=im.getchannel("A"))
                rgb = canvas
            else:
                rgb = im.convert("RGB")
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), reason
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO object, which tells the user nothing
        raise ValueError("not an image format Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode image ({exc})") from exc


def label_bytes(labels: tuple[int, ...]) -> bytes:
    """ASCII label component: one id (`.cls`) or ids separated by spaces (`.labels`)."""
    return " ".join(str(i) for i in labels).encode()


def read_image(item: Item) -> tuple[bytes | None, str, str]:
    """(RGB JPEG bytes, stats reason, message) of one input; bytes is None when it is skipped."""
    try:
        data = Path(item.path).read_bytes()
    except FileNotFoundError:
        return None, "missing", "no such file"
    except OSError as exc:
        return None, "unreadable", f"cannot read it ({exc.strerror or exc})"
    try:
        jpeg, reason = to_rgb_jpeg(data, Path(item.path).suffix.lower())
    except ValueError as exc:
        return None, "unreadable", str(exc)
    return jpeg, f"converted_{reason}" if reason else "stored", ""


def write_sample(tar: tarfile.TarFile, key: str, components: dict[str, bytes]) -> None:
    """Append one sample's members exactly as webdataset's TarWriter(mtime=0.0) does (same bytes), without
    importing webdataset, which imports torch: seconds and ~300 MB in every worker process."""
    for ext in sorted(components):
        data = components[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0.0, 0o444  # a float mtime, as webdataset's
        info.uname = info.gname = "bigdata"
        tar.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask) -> dict:
    """Write one shard (tar + index + done-record); return its record. Runs in a worker process.

    The record's "shard" is None when none of the task's images could be read (nothing is written then).
    """
    out = Path(task.out_dir)
    tar_path, tmp_path = out / task.name, out / (task.name + ".tmp")
    stats: Counter[str] = Counter()
    skipped: list[tuple[str, str]] = []
    try:
        with open(tmp_path, "wb") as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
            for item in task.items:
                jpeg, reason, message = read_image(item)
                stats[reason] += 1
                if jpeg is None:
                    skipped.append((item.rel, f"{reason}: {message}"))
                    continue
                write_sample(tar, item.key, {"jpg": jpeg, task.label_ext: label_bytes(item.labels)})
        record = {"fingerprint": task.fingerprint(), "shard": None, "stats": dict(stats), "skipped": skipped}
        samples = scan_tar(tmp_path)
        if not samples:
            return record
        index_path = out / (Path(task.name).stem + ".idx")
        write_index(index_path, samples)
        tmp_path.replace(tar_path)
    finally:
        tmp_path.unlink(missing_ok=True)  # only still there when the shard was not finished
    info = ShardInfo(task.name, len(samples), tar_path.stat().st_size, sha256_file(tar_path), index_path.name)
    record["shard"] = info.__dict__
    (out / (task.name + ".done.json")).write_text(json.dumps(record))
    return record


def finished_record(task: ShardTask) -> dict | None:
    """The done-record of a shard finished by an earlier run with the same inputs, else None."""
    out = Path(task.out_dir)
    done = out / (task.name + ".done.json")
    if not done.is_file() or not (out / task.name).is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged record: write the shard again
    if record.get("fingerprint") != task.fingerprint() or "skipped" not in record:
        return None
    if not (out / record["shard"]["index"]).is_file():
        return None
    return record


def plan_shards(
    items: list[Item], out_dir: Path, prefix: str, shard_size: int, label_ext: str
) -> list[ShardTask]:
    """Cut the (already shuffled) items into shards of `shard_size` samples."""
    return [
        ShardTask(
            str(out_dir), f"{prefix}-{i // shard_size:06d}.tar", tuple(items[i : i + shard_size]), label_ext
        )
        for i in range(0, len(items), shard_size)
    ]


def run_tasks(tasks: list[ShardTask], workers: int, desc: str) -> list[dict]:
    """Write the shards not finished yet, in parallel; records in shard order.

    The progress bar shows on a terminal only (`disable=None`): batch logs and error output stay clean.
    """
    from tqdm import tqdm

    records: dict[str, dict] = {}
    todo = []
    for task in tasks:
        record = finished_record(task)
        if record is None:
            todo.append(task)
        else:
            records[task.name] = record
    try:
        if todo and workers > 1:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
                done = pool.imap(write_shard, todo)
                for task, record in tqdm(
                    zip(todo, done), total=len(todo), desc=desc, unit="shard", disable=None
                ):
                    records[task.name] = record
        else:
            for task in tqdm(todo, desc=desc, unit="shard", disable=None):
                records[task.name] = write_shard(task)
    finally:
        # a worker terminated by the pool (an error elsewhere, Ctrl-C) cannot clean up after itself
        for task in todo:
            Path(task.out_dir, task.name + ".tmp").unlink(missing_ok=True)
    return [records[t.name] for t in tasks]


@dataclass(frozen=True)
class BuildPlan:
    """A checked build: the items of each split and the label format. Making it writes nothing."""

    src: Path
    out: Path
    splits: dict[str, list[Item]]
    classes: list[str]
    label_kind: str


def plan_build(src: Path, out: Path, *, shard_size: int, workers: int, val_fraction: float) -> BuildPlan:
    """Every check a build can make before writing: arguments, source, output, split sizes."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not src.exists():
        raise FileNotFoundError(f"build source {src} does not exist")
    check_output(src, out)
    items, classes = scan_folder(src) if src.is_dir() else scan_list_file(src)
    items = assign_keys(items)
    label_kind = "multi" if any(len(i.labels) != 1 for i in items) else "single"
    random.Random(BUILD_SEED).shuffle(items)
    splits = {"train": [i for i in items if split_fraction(i.rel) >= val_fraction]}
    if val_fraction > 0:
        splits["val"] = [i for i in items if split_fraction(i.rel) < val_fraction]
    for split, split_items in splits.items():
        if not split_items:
            raise ValueError(
                f"--val-fraction {val_fraction} leaves the {split} split of the {len(items)} images in "
                f"{src} empty; choose a {'larger' if split == 'val' else 'smaller'} fraction"
            )
    return BuildPlan(src, out, splits, classes, label_kind)


def finish_split(plan: BuildPlan, split: str, records: list[dict]) -> Path:
    """Write a split's skipped list and manifest, then remove what an earlier build left that it lacks."""
    split_dir = plan.out / split
    shards = [ShardInfo(**r["shard"]) for r in records if r["shard"] is not None]
    stats: Counter[str] = Counter()
    skipped: dict[str, str] = {}
    for record in records:
        stats.update(record["stats"])
        skipped.update(dict(record["skipped"]))
    earlier = old_shards(split_dir)
    if skipped:
        (split_dir / SKIPPED_NAME).write_text(json.dumps(dict(sorted(skipped.items())), indent=1) + "\n")
    else:
        (split_dir / SKIPPED_NAME).unlink(missing_ok=True)
    manifest = Manifest(
        label_kind=plan.label_kind,  # type: ignore[arg-type]
        num_classes=len(plan.classes),
        class_names=plan.classes,
        shards=shards,
        stats=dict(sorted(stats.items())),
    )
    save_manifest(manifest, split_dir)
    tidy_split(split_dir, split, shards, earlier)
    return split_dir


def build(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1000,
    workers: int = 1,
    val_fraction: float = 0.0,
) -> dict[str, Path]:
    """Build `out/train` (and `out/val` when `val_fraction` > 0) from a folder tree or a list file.

    Returns the dataset directories by split name. Conversion and skip counts are in each manifest's
    `stats`; the skipped files, with the reason, in `<split>/skipped.json`. Raises ValueError /
    FileNotFoundError naming the argument or file for a bad source, output or split, before writing.
    """
    plan = plan_build(Path(src), Path(out), shard_size=shard_size, workers=workers, val_fraction=val_fraction)
    undo = Undo(plan.out)
    records = {}
    try:
        for split, items in plan.splits.items():
            split_dir = plan.out / split
            split_dir.mkdir(parents=True, exist_ok=True)
            tasks = plan_shards(items, split_dir, split, shard_size, LABEL_EXT[plan.label_kind])
            records[split] = run_tasks(tasks, workers, desc=f"build {split}")
            if all(r["shard"] is None for r in records[split]):
                path, why = records[split][0]["skipped"][0]
                raise ValueError(
                    f"{plan.src}: none of the {len(items)} images of the {split} split could be read "
                    f"(e.g. {path}: {why})"
                )
    except ValueError:
        undo()
        raise
    result = {split: finish_split(plan, split, split_records) for split, split_records in records.items()}
    for split in SPLITS:
        if split not in result:
            remove_split(plan.out / split, split)
    return result
