"""The dataset manifest (`manifest.json`) and the audit blocklist (`blocklist.json`).

A dataset directory holds `manifest.json`; the shards (`*.tar`) live in the same directory unless the
manifest names another `shard_dir` (published shards on a read-only filesystem, indexed into a separate
folder by `coatnet-data index --out`). One DALI index file per shard sits next to the manifest.

Labels: single-label datasets carry `<key>.cls` (ASCII class id); multi-label datasets carry
`<key>.labels` (ASCII class ids separated by spaces). Published shards indexed by `coatnet-data index` may
instead carry `<key>.json` (`label_encoding: "json"`): a class id, a list of ids, or an object whose
"label"/"labels"/"cls" key holds one; `label_ids` reads both encodings. Images are `<key>.jpg`, RGB JPEG.

A build's output folder holds one dataset directory per split (`train/`, `val/`); `dataset_dirs` finds
them for commands that accept either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

MANIFEST_NAME = "manifest.json"
BLOCKLIST_NAME = "blocklist.json"
FORMAT = "coatnet-wds/1"
LABEL_EXT = {"single": "cls", "multi": "labels"}
JSON_LABEL_KEYS = ("label", "labels", "cls")


@dataclass
class ShardInfo:
    """One tar shard: file name (relative to the shard dir), sample count, size, checksum, index file."""

    name: str
    samples: int
    bytes: int
    sha256: str
    index: str


@dataclass
class Manifest:
    """What the loader needs to know about a dataset without opening its shards."""

    label_kind: Literal["single", "multi"]
    num_classes: int
    class_names: list[str]
    shards: list[ShardInfo]
    image_ext: str = "jpg"
    shard_dir: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    format: str = FORMAT
    label_encoding: Literal["ascii", "json"] = "ascii"

    @property
    def label_ext(self) -> str:
        """Extension of the label component in the tars."""
        return "json" if self.label_encoding == "json" else LABEL_EXT[self.label_kind]

    @property
    def num_samples(self) -> int:
        """Samples in all shards, blocklisted ones included."""
        return sum(s.samples for s in self.shards)


def label_ids(blob: bytes, encoding: str) -> list[int]:
    """The class ids in one label component.

    "ascii": ids separated by whitespace (`.cls`, `.labels`). "json": an id, a list of ids, or an object
    holding one of those under "label", "labels" or "cls". Raises ValueError for anything else.
    """
    if encoding == "ascii":
        return [int(tok) for tok in blob.split()]
    try:
        value = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if isinstance(value, dict):
        found = [k for k in JSON_LABEL_KEYS if k in value]
        if not found:
            raise ValueError(f"a JSON object without any of the keys {JSON_LABEL_KEYS}")
        value = value[found[0]]
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"the JSON label {json.dumps(value)[:40]} is not a class id or a list of ids")
    return ids


def load_manifest(dataset_dir: str | Path) -> tuple[Manifest, Path, Path]:
    """Load `dataset_dir/manifest.json`; return (manifest, directory of the tars, directory of the indexes).

    Raises FileNotFoundError / ValueError naming the file and key for a missing or malformed manifest.
    """
    root = Path(dataset_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `coatnet-data build` or `coatnet-data index` first")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: key 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    try:
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        manifest = Manifest(shards=shards, **raw)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed manifest ({exc})") from exc
    if manifest.label_kind not in LABEL_EXT:
        raise ValueError(f"{path}: key 'label_kind' must be 'single' or 'multi', got {manifest.label_kind!r}")
    if manifest.label_encoding not in {"ascii", "json"}:
        raise ValueError(
            f"{path}: key 'label_encoding' must be 'ascii' or 'json', got {manifest.label_encoding!r}"
        )
    if len(manifest.class_names) != manifest.num_classes:
        raise ValueError(
            f"{path}: 'class_names' has {len(manifest.class_names)} entries, 'num_classes' says {manifest.num_classes}"
        )
    if not manifest.shards:
        raise ValueError(f"{path}: key 'shards' is empty")
    shard_dir = root / manifest.shard_dir if manifest.shard_dir else root  # an absolute shard_dir wins
    return manifest, shard_dir, root


def dataset_dirs(path: str | Path) -> list[Path]:
    """The dataset directories at `path`: `[path]` when it holds a manifest, else its subfolders that do
    (a build's output folder: `train/`, `val/`).

    Raises FileNotFoundError naming `path` when there is neither.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    if (root / MANIFEST_NAME).is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())
    if not found:
        raise FileNotFoundError(
            f"{root / MANIFEST_NAME} not found (nor in a subfolder): run `coatnet-data build` or "
            "`coatnet-data index` first"
        )
    return found


def save_manifest(manifest: Manifest, dataset_dir: str | Path) -> Path:
    """Write `dataset_dir/manifest.json` atomically (the manifest is the last file a build writes)."""
    path = Path(dataset_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=1) + "\n")
    tmp.replace(path)
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Blocklist:
    """Samples the loader must never hand to the decoder, per shard name: {shard: {key: reason}}."""

    samples: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, shard: str, key: str, reason: str) -> None:
        """Block `key` of `shard`, remembering why."""
        self.samples.setdefault(shard, {})[key] = reason

    def blocked(self, shard: str) -> dict[str, str]:
        """The blocked keys of one shard (empty when none)."""
        return self.samples.get(shard, {})

    def __len__(self) -> int:
        return sum(len(v) for v in self.samples.values())

    def fingerprint(self) -> str:
        """A short hash of the blocked set: part of the dataset identity that loader states are tied to."""
        text = json.dumps({s: sorted(k) for s, k in sorted(self.samples.items())})
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_blocklist(dataset_dir: str | Path) -> Blocklist:
    """The audit's blocklist of a dataset directory; an empty one when the dataset was never audited."""
    path = Path(dataset_dir) / BLOCKLIST_NAME
    if not path.is_file():
        return Blocklist()
    raw = json.loads(path.read_text())
    if not isinstance(raw.get("samples"), dict):
        raise ValueError(f"{path}: key 'samples' must map shard names to {{key: reason}}")
    return Blocklist(samples={str(s): dict(v) for s, v in raw["samples"].items()})


def save_blocklist(blocklist: Blocklist, dataset_dir: str | Path) -> Path:
    """Write `dataset_dir/blocklist.json` atomically."""
    path = Path(dataset_dir) / BLOCKLIST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"samples": blocklist.samples}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def dataset_fingerprint(manifest: Manifest, blocklist: Blocklist) -> str:
    """Hash of the shard list (names, counts, checksums) and the blocklist: identifies the sample universe."""
    text = json.dumps([[s.name, s.samples, s.sha256] for s in manifest.shards]) + blocklist.fingerprint()
    return hashlib.sha256(text.encode()).hexdigest()[:16]
