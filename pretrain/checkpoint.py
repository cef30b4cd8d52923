"""Sharded checkpoints that are either complete and verified, or never loaded.

Layout under the checkpoint folder:

    step_000001000/            one DeepSpeed tag: every rank's ZeRO-3 shards + client state
        MANIFEST.json          written last, atomically: every file with its size and sha256
    step_000002000/ ...
    LATEST                     name of the newest committed tag (atomic rename; for people and tools)

Save protocol (all ranks): DeepSpeed writes every rank's shards (ending with a barrier); each rank
hashes a share of the files; rank 0 gathers the entries, writes MANIFEST.json to a temporary name,
fsyncs it and renames it into place (the commit point), then replaces LATEST the same way, then prunes.
A rank killed anywhere before the rename leaves a folder without a manifest, which resume ignores.

Resume: the newest folder whose manifest exists and whose files all have the recorded sizes; with
`verify=True` the checksums are recomputed too (each rank hashes a share; all must agree).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import dist
from pretrain.config import CheckpointConfig

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
POINTER = "LATEST"
TAG_RE = re.compile(r"^step_(\d{9})$")


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _files_of(tag_dir: Path) -> list[Path]:
    return sorted(
        p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


@dataclass(frozen=True)
class Committed:
    step: int
    path: Path


class CheckpointManager:
    """Saves, finds and loads committed checkpoints; every rank calls every method (they are collective)."""

    def __init__(self, cfg: CheckpointConfig, root: Path, info: dist.RankInfo):
        self.cfg = cfg
        self.root = root
        self.info = info

    # ------------------------------------------------------------------------------------------ save

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Write, hash, commit and prune. Returns the committed folder."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists() and not (tag_dir / MANIFEST).exists():
                shutil.rmtree(tag_dir)  # debris of a save that died: never mixed with fresh files
        dist.barrier()
        if (tag_dir / MANIFEST).exists():
            return tag_dir  # already committed at this step (e.g. a preemption right after a periodic save)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        entries = self._hash_share(tag_dir)
        gathered = dist.all_gather_object(entries)
        if self.info.is_main:
            files = {name: meta for part in gathered for name, meta in part.items()}
            manifest = {"step": step, "world_size": self.info.world_size, "files": files}
            _atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            _atomic_write(self.root / POINTER, tag + "\n")
            self._prune(keep=step)
        dist.barrier()
        return tag_dir

    def _hash_share(self, tag_dir: Path) -> dict[str, dict]:
        """This rank's share of the files (every world_size-th), hashed in parallel with the other ranks."""
        files = _files_of(tag_dir)
        mine = files[self.info.rank :: self.info.world_size]
        return {
            str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in mine
        }

    def _prune(self, keep: int) -> None:
        committed = self.committed()
        keep_steps = {c.step for c in committed[: self.cfg.keep_last]} | {keep}
        if self.cfg.keep_every:
            keep_steps |= {c.step for c in committed if c.step % self.cfg.keep_every == 0}
        for c in committed:
            if c.step not in keep_steps:
                shutil.rmtree(c.path, ignore_errors=True)
        newest = committed[0].step if committed else keep
        for path in self.root.iterdir():  # abandoned partial saves older than the newest commit
            match = TAG_RE.match(path.name)
            if match and int(match.group(1)) < newest and not (path / MANIFEST).exists():
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ find

    def committed(self) -> list[Committed]:
        """Committed checkpoints, newest first (manifest present and every file at its recorded size)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir(), reverse=True):
            match = TAG_RE.match(path.name)
            if not match:
                continue
            problem = self._structural_problem(path)
            if problem:
                log.warning("ignoring incomplete checkpoint %s: %s", path, problem)
                continue
            found.append(Committed(int(match.group(1)), path))
        return found

    @staticmethod
    def _structural_problem(path: Path) -> str | None:
        manifest = path / MANIFEST
        if not manifest.exists():
            return "no MANIFEST.json (the save did not finish)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as exc:
            return f"unreadable manifest ({exc})"
        for name, meta in files.items():
            f = path / name
            if not f.exists():
                return f"{name} is missing"
            if f.stat().st_size != meta["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        return None

    def find_resume(self) -> Committed | None:
        """What `checkpoint.resume` selects: None for a fresh start."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            problem = self._structural_problem(path)
            if problem:
                raise ValueError(f"checkpoint.resume={path}: not a committed checkpoint ({problem})")
            match = TAG_RE.match(path.name)
            return Committed(int(match.group(1)) if match else -1, path)
        committed = self.committed()
        return committed[0] if committed else None

    def verify(self, ckpt: Committed) -> None:
        """Recompute every checksum (shared among ranks); raise if any file differs from the manifest."""
        files = json.loads((ckpt.path / MANIFEST).read_text())["files"]
        names = sorted(files)[self.info.rank :: self.info.world_size]
        bad = [n for n in names if sha256_file(ckpt.path / n) != files[n]["sha256"]]
        flag = dist.all_reduce_sum(torch.tensor([float(len(bad))]))
        if flag.item() > 0:
            raise ValueError(
                f"checkpoint {ckpt.path} fails its checksums ({', '.join(bad) or 'on another rank'}); "
                "move it aside to resume from the previous one"
            )

    def saved_world_size(self, ckpt: Committed) -> int:
        return int(json.loads((ckpt.path / MANIFEST).read_text())["world_size"])
