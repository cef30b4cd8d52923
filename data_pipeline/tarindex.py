"""DALI index files (format "v1.2") for webdataset tar shards: create, read, write subsets, check.

DALI's `fn.readers.webdataset` reads the samples listed in an index file in the order they are listed and
seeks to each component's offset; it does not require the lines to follow the tar's order, and the same
tar may be listed several times with different index files. The loader relies on this to play an exact,
pre-computed sample order (see `plan.py`).

DALI only checks that an offset starts inside the file: a tar truncated in the middle of a member makes it
read past the end of the mapping and crash the process (SIGSEGV, measured with DALI 2.4). `check_bounds`
must therefore run on every index before DALI sees it.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

INDEX_VERSION = "v1.2"
TAR_BLOCK = 512


@dataclass(frozen=True)
class IndexedSample:
    """One sample of a shard: its key and the components' (ext, offset, size, member name)."""

    key: str
    components: tuple[tuple[str, int, int, str], ...]

    @property
    def end(self) -> int:
        """Byte offset one past the last byte of this sample's data in the tar."""
        return max(offset + size for _, offset, size, _ in self.components)

    def component(self, ext: str) -> tuple[str, int, int, str] | None:
        """The component whose extension is `ext` (case-insensitive; "jpg;jpeg" accepts either), or None."""
        wanted = {e.lower() for e in ext.split(";")}
        for comp in self.components:
            if comp[0].lower() in wanted:
                return comp
        return None

    def line(self) -> str:
        """This sample as one line of a v1.2 index file."""
        return " ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in self.components)


def split_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) at the first dot of the file name, as DALI does."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def unsafe_member_name(name: str) -> bool:
    """True for a member name that would land outside the extraction folder: absolute, or with a `..` part.

    Nothing here extracts tars, but shards travel to tools that do; such a shard is refused, not indexed.
    """
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts


def scan_tar(tar_path: Path) -> list[IndexedSample]:
    """Read a tar's member headers (GNU, ustar or PAX) and group consecutive members into samples.

    Raises ValueError naming the file when the tar is unreadable, truncated inside a header, or holds a
    member whose name is absolute or contains `..` (naming that member).
    """
    samples: list[IndexedSample] = []
    current_key: str | None = None
    current: list[tuple[str, int, int, str]] = []
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if unsafe_member_name(member.name):
                    raise ValueError(
                        f"{tar_path}: unsafe member name {member.name!r} (absolute or with '..'); "
                        "refusing this shard"
                    )
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not key or key.endswith("/") or not ext:
                    continue
                if key != current_key and current:
                    samples.append(IndexedSample(current_key, tuple(current)))  # type: ignore[arg-type]
                    current = []
                current_key = key
                current.append((ext, member.offset_data, member.size, member.name))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{tar_path}: not a readable tar archive ({exc})") from exc
    if current:
        samples.append(IndexedSample(current_key, tuple(current)))  # type: ignore[arg-type]
    return samples


def write_index(index_path: Path, samples: list[IndexedSample]) -> None:
    """Write `samples` (in this order) as a DALI v1.2 index file, atomically."""
    if not samples:
        raise ValueError(f"{index_path}: refusing to write an index with no samples (DALI rejects it)")
    for sample in samples:
        if any(len(name.split()) != 1 for _, _, _, name in sample.components):
            raise ValueError(
                f"{index_path}: member names of sample {sample.key!r} contain whitespace, "
                "which DALI's index format cannot represent; rename the members"
            )
    tmp = index_path.with_name(index_path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(f"{INDEX_VERSION} {len(samples)}\n")
            for sample in samples:
                f.write(sample.line() + "\n")
        tmp.replace(index_path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when writing failed


def read_index(index_path: Path) -> list[IndexedSample]:
    """Parse a DALI index file (v1.2, with member names) into samples.

    Raises FileNotFoundError when it is missing and ValueError naming the file and line when malformed.
    """
    if not index_path.is_file():
        raise FileNotFoundError(
            f"DALI index file {index_path} is missing; run `coatnet-data index` on the shards"
        )
    lines = index_path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"{index_path}: expected a '{INDEX_VERSION} <count>' header, got {lines[:1]}")
    count = int(head[1])
    if count != len(lines) - 1:
        raise ValueError(f"{index_path}: header says {count} samples but the file lists {len(lines) - 1}")
    samples = []
    for number, line in enumerate(lines[1:], start=1):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{index_path} line {number}: expected groups of '<ext> <offset> <size> <name>'")
        comps = tuple(
            (fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
            for i in range(0, len(fields), 4)
        )
        samples.append(IndexedSample(split_member_name(comps[0][3])[0], comps))
    return samples


def check_bounds(samples: list[IndexedSample], tar_path: Path) -> list[str]:
    """Keys of samples whose data does not lie inside `tar_path` (a truncated or replaced shard)."""
    size = tar_path.stat().st_size
    bad = []
    for sample in samples:
        if sample.end > size or any(off % TAR_BLOCK for _, off, _, _ in sample.components):
            bad.append(sample.key)
    return bad


def read_member(tar_path: Path, comp: tuple[str, int, int, str]) -> bytes:
    """The bytes of one component, read through its index entry."""
    _, offset, size, _ = comp
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{tar_path}: member {comp[3]} ends past the end of the file (truncated shard)")
    return data
