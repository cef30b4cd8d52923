"""What `coatnet-data build` reads: an image folder tree or a list file, as items with labels and keys.

- Folder: ImageNet layout, one subfolder per class (sorted names are the class ids).
- List file: `<path> <label> [<label> ...]` per line, paths relative to the list file, each path once.
- A sample's key is its source file's stem, with every character other than letters, digits, `_` and `-`
  replaced by `_` (webdataset splits member names at the first dot, DALI's index at whitespace); stems
  that occur more than once get `_<8 hex of the path's hash>` appended. Keys are a pure function of the
  set of paths, so a key in an audit report or an error leads back to its file whatever the split or
  shard size.
- The train/validation split is a pure function of each image's relative path (a hash).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Item:
    """One input image: absolute path, path relative to the source (for the split hash), class ids, and
    the sample key it gets (see `assign_keys`)."""

    path: str
    rel: str
    labels: tuple[int, ...]
    key: str = ""


def _images_hint() -> str:
    return f"{', '.join(sorted(IMAGE_SUFFIXES))}, any case"


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
    if not items:
        shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
        raise ValueError(f"{src}: the class folders ({shown}) hold no images ({_images_hint()})")
    return items, classes


def scan_list_file(list_file: Path) -> tuple[list[Item], list[str]]:
    """`path label [label ...]` per line, paths relative to the list file; labels are names or integers.

    Each path may appear once. Paths that do not exist are not an error here: the build skips and lists
    them, as it does unreadable images.
    """
    try:
        text = list_file.read_text()
    except UnicodeDecodeError:
        raise ValueError(
            f"{list_file}: not a text list file (expected a folder SRC/<class>/<image> or lines "
            "'<path> <label> [<label> ...]')"
        ) from None
    rows, first_line = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or line.lstrip().startswith("#"):
            continue
        if len(fields) < 2:
            raise ValueError(f"{list_file} line {number}: expected '<path> <label> [<label> ...]'")
        if fields[0] in first_line:
            raise ValueError(
                f"{list_file} line {number}: {fields[0]} is already listed on line {first_line[fields[0]]}"
            )
        first_line[fields[0]] = number
        rows.append((fields[0], fields[1:]))
    if not rows:
        raise ValueError(f"{list_file}: no '<path> <label> [<label> ...]' lines")
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


def assign_keys(items: list[Item]) -> list[Item]:
    """Give every item its sample key: the sanitized stem, made unique by a path hash where stems repeat.

    A pure function of the set of relative paths, so keys do not depend on the split or the shard size.
    """
    stems = [KEY_UNSAFE.sub("_", PurePosixPath(i.rel.replace("\\", "/")).stem) or "_" for i in items]
    counts = Counter(stems)
    keyed = [
        replace(i, key=s if counts[s] == 1 else f"{s}_{hashlib.sha256(i.rel.encode()).hexdigest()[:8]}")
        for i, s in zip(items, stems)
    ]
    assert len({i.key for i in keyed}) == len(keyed), "sample keys must be unique"
    return keyed


def split_fraction(rel: str) -> float:
    """A number in [0, 1) that depends only on the relative path: the deterministic split key."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:12], 16) / float(1 << 48)
