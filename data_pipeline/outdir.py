"""The output folder of `coatnet-data build`: checks before writing, undo, and an earlier build's leftovers.

A build writes only into `<out>/<split>/` and only files named `<split>-NNNNNN.tar`, `.idx`,
`.tar.done.json` (and their `.tmp` while writing), plus `manifest.json`, `skipped.json`; `blocklist.json`
is the audit's. Rebuilding into the same output removes, of those, what the new build does not list: the
shards of another --shard-size, a split no longer built (--val-fraction 0 after a build with a val split:
left in place it would overlap the new train split), and `blocklist.json` when the shards changed (the
audit must run again). Other files in the folder are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from data_pipeline.manifest import BLOCKLIST_NAME, MANIFEST_NAME, ShardInfo

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SKIPPED_NAME = "skipped.json"


def shard_file_pattern(split: str) -> re.Pattern[str]:
    """File names a build writes into a split folder for its shards (and their temporary files)."""
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.(tar|idx|tar\.done\.json|tar\.tmp|idx\.tmp)")


def check_output(src: Path, out: Path) -> None:
    """Refuse an output that cannot hold the split folders or that lies inside the source tree."""
    for path in (out, *(out / s for s in SPLITS)):
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {path} exists and is not a directory")
    if src.is_dir():
        src_abs, out_abs = src.resolve(), out.resolve()
        if out_abs == src_abs or src_abs in out_abs.parents:
            raise ValueError(f"output {out} is inside the source folder {src}; choose an output outside it")


class Undo:
    """Removes what a build created (folders, files in the split folders) when it fails after it started
    writing. Only the split folders are snapshot: nothing else under the output is ever written. A shard
    it rewrote in place (same name, other inputs) cannot be restored; the earlier manifest's checksum
    then tells it apart (`coatnet-data audit`)."""

    def __init__(self, out: Path) -> None:
        missing = [p for p in (out, *out.parents) if not p.exists()]
        self.top_created = missing[-1] if missing else None  # mkdir(parents=True) creates from here down
        self.before = {s: set(os.listdir(out / s)) for s in SPLITS if (out / s).is_dir()}
        self.out = out

    def __call__(self) -> None:
        if self.top_created is not None:
            shutil.rmtree(self.top_created, ignore_errors=True)
            return
        for split in SPLITS:
            split_dir = self.out / split
            if split not in self.before:
                shutil.rmtree(split_dir, ignore_errors=True)
                continue
            for name in set(os.listdir(split_dir)) - self.before[split]:
                (split_dir / name).unlink()


def remove_stale(split_dir: Path, split: str, keep: set[str]) -> list[str]:
    """Delete files named like this build's shards of `split` that `keep` does not hold; return them."""
    if not split_dir.is_dir():
        return []
    pattern = shard_file_pattern(split)
    stale = sorted(p.name for p in split_dir.iterdir() if pattern.fullmatch(p.name) and p.name not in keep)
    for name in stale:
        (split_dir / name).unlink()
    return stale


def old_shards(split_dir: Path) -> list[tuple[str, str]] | None:
    """(name, sha256) of the shards the manifest already in `split_dir` lists; None without one."""
    path = split_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return [(s["name"], s["sha256"]) for s in json.loads(path.read_text())["shards"]]
    except (ValueError, KeyError, TypeError):
        return []  # unreadable: treat as different from anything this build writes


def tidy_split(
    split_dir: Path, split: str, shards: list[ShardInfo], earlier: list[tuple[str, str]] | None
) -> None:
    """After a split's new manifest is written: drop the earlier build's blocklist when the shards changed
    (`earlier` as `old_shards` read it before), and its shards the new manifest does not list."""
    blocklist = split_dir / BLOCKLIST_NAME
    if earlier is not None and earlier != [(s.name, s.sha256) for s in shards] and blocklist.is_file():
        blocklist.unlink()
        log.info(
            "%s: removed %s of the earlier build; run `coatnet-data audit` again", split_dir, BLOCKLIST_NAME
        )
    keep = {s.name for s in shards} | {s.index for s in shards} | {s.name + ".done.json" for s in shards}
    stale = remove_stale(split_dir, split, keep)
    tars = [name for name in stale if name.endswith(".tar")]
    if stale:
        shown = ", ".join((tars or stale)[:3]) + (", ..." if len(tars or stale) > 3 else "")
        log.info(
            "%s: removed %d stale shards of an earlier build, %d files in all (%s)",
            split_dir,
            len(tars),
            len(stale),
            shown,
        )


def remove_split(split_dir: Path, split: str) -> None:
    """Remove a split an earlier build wrote and this one does not (e.g. --val-fraction is now 0)."""
    if not split_dir.is_dir():
        return
    removed = remove_stale(split_dir, split, keep=set())
    old = old_shards(split_dir)
    pattern = shard_file_pattern(split)
    if old is not None and all(pattern.fullmatch(name) for name, _ in old):
        for name in (MANIFEST_NAME, BLOCKLIST_NAME, SKIPPED_NAME):
            if (split_dir / name).is_file():
                (split_dir / name).unlink()
                removed.append(name)
    if removed:
        log.info("%s: removed the %s split of an earlier build (%d files)", split_dir, split, len(removed))
    if not any(split_dir.iterdir()):
        split_dir.rmdir()
