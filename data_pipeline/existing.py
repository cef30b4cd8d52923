"""`coatnet-data index`: make published webdataset shards usable without rebuilding them.

Shards made by GNU tar, Python's tarfile or webdataset's writer (ustar, GNU or PAX headers) are scanned
with Python's tarfile; one DALI index per shard and a manifest are written next to them, or into a separate
folder (`--out`) when the shards are read-only, in which case the manifest records where the shards are.
Labels must be `<key>.cls` (one class id) or `<key>.labels` (ids separated by spaces); images may use any
of the extensions in IMAGE_EXTS (the manifest records the set found, DALI accepts "jpg;jpeg" lists).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from data_pipeline.manifest import LABEL_EXT, Manifest, ShardInfo, save_manifest, sha256_file
from data_pipeline.tarindex import read_member, scan_tar, write_index

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _labels_of(tar: Path, samples: list, label_ext: str) -> list[list[int]]:
    rows = []
    for sample in samples:
        comp = sample.component(label_ext)
        if comp is None:
            raise ValueError(f"{tar}: sample {sample.key} has no .{label_ext} component")
        text = read_member(tar, comp).decode("ascii", errors="replace")
        try:
            rows.append([int(tok) for tok in text.split()])
        except ValueError as exc:
            raise ValueError(
                f"{tar}: sample {sample.key}: .{label_ext} is not class ids ({text[:40]!r})"
            ) from exc
    return rows


def index_existing(shard_dir: str | Path, out: str | Path | None = None) -> Path:
    """Index every `*.tar` of `shard_dir`; write the indexes and manifest to `out` (default: shard_dir)."""
    src = Path(shard_dir)
    dest = Path(out) if out else src
    tars = sorted(src.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {src}")
    dest.mkdir(parents=True, exist_ok=True)
    shards, exts, kind, top = [], set(), None, -1
    for tar in tqdm(tars, desc="index", unit="shard"):
        samples = scan_tar(tar)
        if not samples:
            raise ValueError(f"{tar}: no samples found")
        found = {c[0].lower() for s in samples for c in s.components}
        shard_kind = "multi" if "labels" in found else "single" if "cls" in found else None
        if shard_kind is None or (kind and shard_kind != kind):
            raise ValueError(
                f"{tar}: expected .cls or .labels label components consistently (found {sorted(found)})"
            )
        kind = shard_kind
        exts |= found & set(IMAGE_EXTS)
        rows = _labels_of(tar, samples, LABEL_EXT[kind])
        top = max(top, *(max(r) for r in rows if r))
        index = dest / (tar.stem + ".idx")
        write_index(index, samples)
        shards.append(ShardInfo(tar.name, len(samples), tar.stat().st_size, sha256_file(tar), index.name))
    if not exts:
        raise ValueError(f"{src}: no image components with an extension in {IMAGE_EXTS}")
    manifest = Manifest(
        label_kind=kind,  # type: ignore[arg-type]
        num_classes=top + 1,
        class_names=[str(i) for i in range(top + 1)],
        shards=shards,
        image_ext=";".join(sorted(exts)),
        shard_dir=None if dest.resolve() == src.resolve() else str(src.resolve()),
    )
    return save_manifest(manifest, dest)
