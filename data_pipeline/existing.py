"""`coatnet-data index`: make published webdataset shards usable without rebuilding them.

Shards made by GNU tar, Python's tarfile or webdataset's writer (ustar, GNU or PAX headers) are scanned
with Python's tarfile; one DALI index per shard and a manifest are written next to them, or into a separate
folder (`--out`) when the shards are read-only, in which case the manifest records where the shards are.
Labels are read from, in this order of preference: `<key>.labels` (ids separated by spaces: multi-label),
`<key>.cls` (one id: single-label), or `<key>.json` (an id, a list of ids, or an object with a
"label"/"labels"/"cls" key, see `manifest.label_ids`; single-label when every sample has exactly one id).
Images may use any of the extensions in IMAGE_EXTS (the manifest records the set found, DALI accepts
"jpg;jpeg" lists).

Every shard is checked before anything is final: a shard that is not a readable tar, holds a member named
with `..` or an absolute path, or has a sample without an image or a valid label stops the command with
a message naming the shard and the sample, and the indexes written so far are removed again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from data_pipeline.manifest import Manifest, ShardInfo, label_ids, save_manifest, sha256_file
from data_pipeline.tarindex import IndexedSample, read_member, scan_tar, write_index

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# label component -> (encoding, label kind or None when the ids decide); first found wins
LABEL_SOURCES = {"labels": ("ascii", "multi"), "cls": ("ascii", "single"), "json": ("json", None)}
STAGED = ".idx.partial"  # indexes are written under this suffix until every shard passed


def _label_source(tar: Path, samples: list[IndexedSample]) -> str:
    found = {c[0].lower() for s in samples for c in s.components}
    for ext in LABEL_SOURCES:
        if ext in found:
            return ext
    raise ValueError(
        f"{tar}: no label components (.{', .'.join(LABEL_SOURCES)}) found; components: {sorted(found)}"
    )


def _labels_of(tar: Path, samples: list[IndexedSample], label_ext: str) -> list[list[int]]:
    encoding, kind = LABEL_SOURCES[label_ext]
    rows = []
    for sample in samples:
        if sample.component(";".join(IMAGE_EXTS)) is None:
            raise ValueError(f"{tar}: sample {sample.key} has no image ({', '.join(IMAGE_EXTS)})")
        comp = sample.component(label_ext)
        if comp is None:
            raise ValueError(f"{tar}: sample {sample.key} has no .{label_ext} component")
        blob = read_member(tar, comp)
        try:
            ids = label_ids(blob, encoding)
        except ValueError as exc:
            raise ValueError(f"{tar}: sample {sample.key}: .{label_ext} is not class ids ({exc})") from None
        if not ids or min(ids) < 0 or (kind == "single" and len(ids) != 1):
            want = "one class id" if kind == "single" else "class ids >= 0"
            raise ValueError(f"{tar}: sample {sample.key}: .{label_ext} must hold {want}, got {blob[:40]!r}")
        rows.append(ids)
    return rows


def index_existing(shard_dir: str | Path, out: str | Path | None = None) -> Path:
    """Index every `*.tar` of `shard_dir`; write the indexes and manifest to `out` (default: shard_dir).

    Raises FileNotFoundError / ValueError naming the folder, shard and sample; nothing is left written then.
    """
    src = Path(shard_dir)
    dest = Path(out) if out else src
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--out {dest} exists and is not a directory")
    tars = sorted(src.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {src}")
    missing = [p for p in (dest, *dest.parents) if not p.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    try:
        manifest = _index_all(src, dest, tars, staged)
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise
    for path in staged:
        path.replace(path.with_name(path.name.removesuffix(STAGED) + ".idx"))
    return save_manifest(manifest, dest)


def _index_all(src: Path, dest: Path, tars: list[Path], staged: list[Path]) -> Manifest:
    """Scan and check every shard, staging its index; return the manifest to write."""
    shards, exts, label_ext, top, widest = [], set(), None, -1, 1
    for tar in tqdm(tars, desc="index", unit="shard", disable=None):
        samples = scan_tar(tar)
        if not samples:
            raise ValueError(f"{tar}: no samples found (no members named <key>.<ext>)")
        shard_label_ext = _label_source(tar, samples)
        if label_ext and shard_label_ext != label_ext:
            raise ValueError(f"{tar}: labels are .{shard_label_ext} but earlier shards use .{label_ext}")
        label_ext = shard_label_ext
        exts |= {c[0].lower() for s in samples for c in s.components} & set(IMAGE_EXTS)
        rows = _labels_of(tar, samples, label_ext)
        top = max(top, *(max(r) for r in rows))
        widest = max(widest, *(len(r) for r in rows))
        index = dest / (tar.stem + STAGED)
        staged.append(index)
        write_index(index, samples)
        shards.append(
            ShardInfo(tar.name, len(samples), tar.stat().st_size, sha256_file(tar), tar.stem + ".idx")
        )
    encoding, kind = LABEL_SOURCES[label_ext]  # type: ignore[index]
    return Manifest(
        label_kind=kind or ("single" if widest == 1 else "multi"),  # type: ignore[arg-type]
        num_classes=top + 1,
        class_names=[str(i) for i in range(top + 1)],
        shards=shards,
        image_ext=";".join(sorted(exts)),
        shard_dir=None if dest.resolve() == src.resolve() else str(src.resolve()),
        label_encoding=encoding,  # type: ignore[arg-type]
    )
