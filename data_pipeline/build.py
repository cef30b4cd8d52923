"""`coatnet-data build`: an image folder tree or a list file -> webdataset shards + DALI indexes + manifest.

Decisions:
- Samples are shuffled once at build time (a fixed seed), so that every shard is a random sample of the
  whole corpus; the loader then only needs to permute shards and the samples within a shard each epoch.
- The train/validation split is a pure function of each image's relative path (a hash), so it does not
  change when the build is re-run or resumed.
- Every image is decoded once with Pillow. RGB JPEGs are stored byte for byte; anything else (PNG, CMYK
  or grayscale JPEG, a PNG named .JPEG as in ImageNet, palette/alpha images) is converted to RGB JPEG
  (quality 95) and counted by reason. Files Pillow cannot decode are left out and counted as "unreadable".
- Resumable: a shard is written to `<name>.tmp`, indexed, then renamed, and a `<name>.done.json` records
  which inputs it holds. A rerun keeps every finished shard whose inputs are unchanged. Inputs are only
  ever read. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_pipeline.manifest import LABEL_EXT, Manifest, ShardInfo, save_manifest, sha256_file
from data_pipeline.tarindex import scan_tar, write_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
JPEG_QUALITY = 95
BUILD_SEED = 20210609  # CoAtNet's arXiv date; any fixed value works, it only has to stay fixed


@dataclass(frozen=True)
class Item:
    """One input image: absolute path, path relative to the source (for the split hash), class ids."""

    path: str
    rel: str
    labels: tuple[int, ...]


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to write one shard."""

    out_dir: str
    name: str
    first_key: int
    items: tuple[Item, ...]
    label_ext: str

    def fingerprint(self) -> str:
        """Hash of the inputs this shard holds, to recognise a finished shard on a rerun."""
        text = json.dumps([[i.rel, list(i.labels)] for i in self.items])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def scan_folder(src: Path) -> tuple[list[Item], list[str]]:
    """ImageNet layout: one subfolder per class (sorted names are the class ids)."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{src}: no class subfolders found (expected SRC/<class>/<image>)")
    items = []
    for cid, name in enumerate(classes):
        for path in sorted((src / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(str(path), str(path.relative_to(src)), (cid,)))
    return items, classes


def scan_list_file(list_file: Path) -> tuple[list[Item], list[str]]:
    """`path label [label ...]` per line, paths relative to the list file; labels are names or integers."""
    rows = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or line.lstrip().startswith("#"):
            continue
        if len(fields) < 2:
            raise ValueError(f"{list_file} line {number}: expected '<path> <label> [<label> ...]'")
        rows.append((fields[0], fields[1:]))
    names = sorted({lab for _, labs in rows for lab in labs})
    if all(n.isdigit() for n in names):
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
    else:
        classes = names
    lookup = {n: i for i, n in enumerate(classes)}
    base = list_file.parent
    items = [
        Item(str((base / p).resolve()), p, tuple(sorted({lookup[lab] for lab in labs}))) for p, labs in rows
    ]
    return items, classes


def split_fraction(rel: str) -> float:
    """A number in [0, 1) that depends only on the relative path: the deterministic split key."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:12], 16) / float(1 << 48)


def to_rgb_jpeg(data: bytes, suffix: str) -> tuple[bytes, str | None]:
    """Return RGB JPEG bytes and the conversion reason (None when the input was stored as is).

    Raises ValueError when Pillow cannot decode the image.
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode image ({exc})") from exc


def label_bytes(labels: tuple[int, ...]) -> bytes:
    """ASCII label component: one id (`.cls`) or ids separated by spaces (`.labels`)."""
    return " ".join(str(i) for i in labels).encode()


def write_shard(task: ShardTask) -> dict:
    """Write one shard (tar + index + done-record); return its stats. Runs in a worker process."""
    import webdataset as wds  # imported here: only the workers need it

    out = Path(task.out_dir)
    tar_path, tmp_path = out / task.name, out / (task.name + ".tmp")
    stats: Counter[str] = Counter()
    with open(tmp_path, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as writer:
        for offset, item in enumerate(task.items):
            try:
                jpeg, reason = to_rgb_jpeg(Path(item.path).read_bytes(), Path(item.path).suffix.lower())
            except ValueError as exc:
                stats["unreadable"] += 1
                print(f"skipping {item.path}: {exc}", flush=True)
                continue
            stats[f"converted_{reason}" if reason else "stored"] += 1
            key = f"{task.first_key + offset:010d}"
            writer.write({"__key__": key, "jpg": jpeg, task.label_ext: label_bytes(item.labels)})
    samples = scan_tar(tmp_path)
    index_path = out / (Path(task.name).stem + ".idx")
    write_index(index_path, samples)
    tmp_path.replace(tar_path)
    info = ShardInfo(task.name, len(samples), tar_path.stat().st_size, sha256_file(tar_path), index_path.name)
    record = {"fingerprint": task.fingerprint(), "shard": info.__dict__, "stats": dict(stats)}
    (out / (task.name + ".done.json")).write_text(json.dumps(record))
    return record


def finished_record(task: ShardTask) -> dict | None:
    """The done-record of a shard finished by an earlier run with the same inputs, else None."""
    out = Path(task.out_dir)
    done = out / (task.name + ".done.json")
    if not done.is_file() or not (out / task.name).is_file():
        return None
    record = json.loads(done.read_text())
    if record.get("fingerprint") != task.fingerprint():
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
            str(out_dir),
            f"{prefix}-{i // shard_size:06d}.tar",
            i,
            tuple(items[i : i + shard_size]),
            label_ext,
        )
        for i in range(0, len(items), shard_size)
    ]


def run_tasks(tasks: list[ShardTask], workers: int, desc: str) -> list[dict]:
    """Write the shards not finished yet, in parallel, with a progress bar; records in shard order."""
    from tqdm import tqdm

    records: dict[str, dict] = {}
    todo = []
    for task in tasks:
        record = finished_record(task)
        if record is None:
            todo.append(task)
        else:
            records[task.name] = record
    if todo and workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for record in tqdm(
                pool.imap_unordered(write_shard, todo), total=len(todo), desc=desc, unit="shard"
            ):
                records[record["shard"]["name"]] = record
    else:
        for task in tqdm(todo, desc=desc, unit="shard"):
            records[task.name] = write_shard(task)
    return [records[t.name] for t in tasks]


def build(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1000,
    workers: int = 1,
    val_fraction: float = 0.0,
) -> dict[str, Path]:
    """Build `out/train` (and `out/val` when `val_fraction` > 0) from a folder tree or a list file.

    Returns the dataset directories by split name. Conversion counts are in each manifest's `stats`.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"build source {src} does not exist")
    if shard_size < 1 or not 0.0 <= val_fraction < 1.0:
        raise ValueError("--shard-size must be >= 1 and --val-fraction in [0, 1)")
    items, classes = scan_folder(src) if src.is_dir() else scan_list_file(src)
    if not items:
        raise ValueError(f"{src}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))}, any case)")
    label_kind = "multi" if any(len(i.labels) != 1 for i in items) else "single"
    random.Random(BUILD_SEED).shuffle(items)
    splits = {"train": [i for i in items if split_fraction(i.rel) >= val_fraction]}
    if val_fraction > 0:
        splits["val"] = [i for i in items if split_fraction(i.rel) < val_fraction]
    result = {}
    for split, split_items in splits.items():
        if not split_items:
            raise ValueError(f"{src}: the {split} split is empty; change --val-fraction")
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        tasks = plan_shards(split_items, split_dir, split, shard_size, LABEL_EXT[label_kind])
        records = run_tasks(tasks, workers, desc=f"build {split}")
        stats: Counter[str] = Counter()
        for record in records:
            stats.update(record["stats"])
        manifest = Manifest(
            label_kind=label_kind,
            num_classes=len(classes),
            class_names=classes,
            shards=[ShardInfo(**r["shard"]) for r in records],
            stats=dict(sorted(stats.items())),
        )
        save_manifest(manifest, split_dir)
        result[split] = split_dir
    return result
