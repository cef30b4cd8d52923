"""Sharded checkpoints that are either complete and verified, or never loaded.

Layout under the checkpoint folder:

    step_000001000/            one DeepSpeed tag: every rank's ZeRO-3 shards + client state
        MANIFEST.json          written last, atomically: every file with its size and digest, the saving
                               world size and `meta` (resume hash, model section, export metadata)
    step_000001000_universal/  DeepSpeed universal form of that tag, made on demand when a run resumes
                               at another world size (atomic rename of a finished conversion)
    step_000002000/ ...
    LATEST                     name of the newest committed tag (atomic rename; for people and tools)

Save protocol (all ranks): DeepSpeed writes every rank's shards (ending with a barrier); each rank
fsyncs and hashes the files it wrote (in parallel threads); rank 0 gathers the entries, fsyncs the
folder, writes MANIFEST.json to a temporary name, fsyncs it and renames it into place (the commit
point), then replaces LATEST the same way, then prunes. A committed checkpoint is on stable storage.
A rank killed anywhere before the rename leaves a folder without a manifest, which resume ignores.
The source of truth is the set of folders with a manifest, not LATEST: a kill between the manifest
rename and the LATEST rename leaves a committed checkpoint that resume finds.

Resume: the newest folder whose manifest exists and whose files all have the recorded sizes; `verify`
recomputes the checksums too (each rank hashes a share; all must agree).

Resume at another world size (the manifest's world_size differs from the run's): rank 0 converts the tag
with DeepSpeed's `ds_to_universal` (once; kept next to the tag until it is pruned) and every rank loads
it with `load_universal`. What carries over, and how exactly (tests/test_checkpoint_resume.py):
- fp32 master weights, Adam moments and step, LR schedule position, step/sample counters: exactly (the
  conversion regroups the fp32 shards without rounding; the resume canary must match).
- BatchNorm running statistics: they are averaged over ranks before every save and restored on every
  new rank from the client state (a universal load restores parameters only).
- Data position, at sample granularity: the sample order is a pure function of (seed, epoch), whatever
  the world size, and the saved global cursor (samples of the epoch consumed, a multiple of the global
  batch) is where the new ranks start; the rest of the epoch is read once, nothing repeated or skipped.
  With `engine.global_batch_size` set, each optimizer step gets the same samples as it would have at
  the old world size. Not carried: augmentation randomness (reseeded from (seed, epoch, cursor, rank))
  and torch/numpy/python RNG (reseeded from (seed, step, rank)), so the run is not bitwise identical.
- The loss: the first resumed step matches the old world size's to float precision; afterwards the
  gradient reduction order differs and bf16 rounding makes trajectories drift apart slowly (measured
  <1e-3 per step over the first 8 steps on the smoke model).
Conversion runs on rank 0 while the others wait in a collective: for the largest models make sure
`engine.timeout_minutes` covers it.

Fault injection for tests: COATNET_CHECKPOINT_FAULT="<point>:<rank>" makes that rank SIGKILL itself
at that point of its first save (points: FAULT_POINTS). Only a test sets it; it stands for a node dying.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import dist
from pretrain.config import CheckpointConfig

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
POINTER = "LATEST"
TAG_RE = re.compile(r"^step_(\d{9})$")
UNIVERSAL_SUFFIX = "_universal"
# Per-file digest in the manifest (see file_digest).
HASH_KEY, HASH_CHUNK = "crc32_16mib_chunks", 16 << 20
RANK_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_")

FAULT_ENV = "COATNET_CHECKPOINT_FAULT"
# Points inside `CheckpointManager.save`, in the order they are reached:
#   written      every rank's DeepSpeed files are on disk, nothing hashed, no manifest
#   hashed       this rank fsynced and digested the files it wrote; rank 0 waits for it in the gather
#   manifest_tmp rank 0 wrote and fsynced the manifest under a temporary name, not yet renamed
#   committed    rank 0 renamed the manifest into place (committed), LATEST still names the previous one
FAULT_POINTS = ("written", "hashed", "manifest_tmp", "committed")


def tag_for(step: int) -> str:
    """Folder name of the checkpoint of `step` (sorts by step)."""
    return f"step_{step:09d}"


def _fault_point(point: str, rank: int) -> None:
    """SIGKILL this process if COATNET_CHECKPOINT_FAULT names this point and rank (tests only)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    name, _, who = wanted.partition(":")
    if name not in FAULT_POINTS or not who.isdigit():
        raise ValueError(f"{FAULT_ENV}={wanted!r}: expected <point>:<rank> with point one of {FAULT_POINTS}")
    if name == point and int(who) == rank:
        log.warning("%s: killing rank %d at checkpoint point %r", FAULT_ENV, rank, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def file_digest(path: Path, pool: ThreadPoolExecutor | None = None) -> str:
    """CRC-32 of each HASH_CHUNK-byte chunk of the file, combined by a CRC-32 over them (8 hex digits).

    A checksum against torn, truncated or rotted files, not against tampering: CRC-32 misses a
    corrupted chunk with probability 2^-32 and runs at 2x sha256's speed on these CPUs (1.5 vs 0.75
    GB/s per core, measured), which matters because every save reads its files back once to digest
    them. Chunks are digested in parallel threads (zlib and file reads release the GIL).
    """
    size = path.stat().st_size

    def one(offset: int) -> bytes:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            return zlib.crc32(fh.read(HASH_CHUNK)).to_bytes(4, "big")

    offsets = range(0, max(size, 1), HASH_CHUNK)
    chunks = pool.map(one, offsets) if pool is not None else map(one, offsets)
    return f"{zlib.crc32(b''.join(chunks)):08x}"


def _hash_pool(io_threads: int = 0) -> ThreadPoolExecutor:
    """Threads for digesting (one per core, up to 8) plus `io_threads` that only wait on the device."""
    return ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1)) + io_threads)


def _atomic_write(path: Path, text: str, before_rename: str | None = None, rank: int = 0) -> None:
    """Write to a hidden temporary name, fsync, rename into place, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if before_rename:
        _fault_point(before_rename, rank)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner_rank(name: str) -> int:
    """The data-parallel rank that wrote a DeepSpeed file (`..zero_pp_rank_<R>_mp_rank..`), else 0."""
    match = RANK_FILE_RE.search(name)
    return int(match.group(1)) if match else 0


def _files_of(tag_dir: Path) -> list[Path]:
    return sorted(
        p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint: its step and its tag folder."""

    step: int
    path: Path


class CheckpointManager:
    """Saves, finds and loads committed checkpoints; every rank calls every method (they are collective)."""

    def __init__(self, cfg: CheckpointConfig, root: Path, info: dist.RankInfo):
        self.cfg = cfg
        self.root = root
        self.info = info
        self.last_timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ save

    def is_committed(self, step: int) -> bool:
        """Whether the checkpoint of `step` has its manifest (same answer on every rank after a save)."""
        return (self.root / tag_for(step) / MANIFEST).exists()

    def save(self, engine, step: int, client_state: dict, meta: dict | None = None) -> Path:
        """Write, seal, commit and prune. `meta` (JSON) goes into the manifest. Returns the committed folder.

        `last_timings` then holds this rank's seconds per phase: write (DeepSpeed's files, all ranks),
        seal (fsync + digest of its own files), commit (gather, manifest, pointer, prune, final barrier).
        """
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists() and not (tag_dir / MANIFEST).exists():
                shutil.rmtree(tag_dir)  # debris of a save that died: never mixed with fresh files
        dist.barrier()
        self.last_timings = {}
        if (tag_dir / MANIFEST).exists():
            return tag_dir  # already committed at this step (e.g. a preemption right after a periodic save)
        t0 = time.perf_counter()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        _fault_point("written", self.info.rank)
        t1 = time.perf_counter()
        entries = self._seal_share(tag_dir)
        _fault_point("hashed", self.info.rank)
        t2 = time.perf_counter()
        gathered = dist.all_gather_object(entries)
        if self.info.is_main:
            _fsync_dir(tag_dir)  # the files' names are durable before the manifest that lists them
            files = {name: entry for part in gathered for name, entry in part.items()}
            manifest = {"step": step, "world_size": self.info.world_size, "files": files, "meta": meta or {}}
            text = json.dumps(manifest, indent=1, sort_keys=True)
            _atomic_write(tag_dir / MANIFEST, text, before_rename="manifest_tmp", rank=self.info.rank)
            _fault_point("committed", self.info.rank)
            _atomic_write(self.root / POINTER, tag + "\n")
            self._prune(keep=step)
        dist.barrier()
        self.last_timings = {"write": t1 - t0, "seal": t2 - t1, "commit": time.perf_counter() - t2}
        return tag_dir

    def _seal_share(self, tag_dir: Path) -> dict[str, dict]:
        """fsync and hash the files this rank wrote, in parallel threads; returns their manifest entries.

        The writer seals its own files: on a shared filesystem only the writing node can flush its cache,
        and the bytes are still in its page cache, so hashing reads memory while fsync writes to the
        device (both release the GIL: the slower of the two sets the time, not their sum). Files that
        belong to no rank (none under ZeRO-3) go to rank 0.
        """
        mine = [p for p in _files_of(tag_dir) if _owner_rank(p.name) == self.info.rank]
        with _hash_pool(io_threads=len(mine)) as pool:  # fsyncs must not queue the digests behind them
            synced = [pool.submit(_fsync_file, p) for p in mine]
            entries = {
                str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, HASH_KEY: file_digest(p, pool)}
                for p in mine
            }
            for future in synced:
                future.result()
        return entries

    def _prune(self, keep: int) -> None:
        committed = self.committed()
        keep_steps = {c.step for c in committed[: self.cfg.keep_last]} | {keep}
        if self.cfg.keep_every:
            keep_steps |= {c.step for c in committed if c.step % self.cfg.keep_every == 0}
        for c in committed:
            if c.step not in keep_steps:
                shutil.rmtree(c.path, ignore_errors=True)
        newest = committed[0].step if committed else keep
        for path in self.root.iterdir():
            if path.name.startswith(".") and UNIVERSAL_SUFFIX in path.name:
                shutil.rmtree(path, ignore_errors=True)  # a conversion that died half-way
                continue
            base = path.name.removesuffix(UNIVERSAL_SUFFIX)
            match = TAG_RE.match(base)
            if not match:
                continue
            if path.name != base and not (self.root / base).is_dir():
                shutil.rmtree(path, ignore_errors=True)  # universal form of a pruned checkpoint
            elif int(match.group(1)) < newest and not (path / MANIFEST).exists() and path.name == base:
                shutil.rmtree(path, ignore_errors=True)  # abandoned partial save older than the newest commit

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
            problem = structural_problem(path)
            if problem:
                log.warning("ignoring incomplete checkpoint %s: %s", path, problem)
                continue
            found.append(Committed(int(match.group(1)), path))
        return found

    def find_resume(self) -> Committed | None:
        """What `checkpoint.resume` selects: None for a fresh start."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            problem = structural_problem(path)
            if problem:
                raise ValueError(f"checkpoint.resume={path}: not a committed checkpoint ({problem})")
            return Committed(read_manifest(path)["step"], path)
        committed = self.committed()
        return committed[0] if committed else None

    def verify(self, ckpt: Committed) -> None:
        """Recompute every checksum (shared among ranks); raise if any file differs from the manifest."""
        names = sorted(read_manifest(ckpt.path)["files"])[self.info.rank :: self.info.world_size]
        bad = checksum_mismatches(ckpt.path, names)
        flag = dist.all_reduce_sum(torch.tensor([float(len(bad))]))
        if flag.item() > 0:
            raise ValueError(
                f"checkpoint {ckpt.path} fails its checksums ({', '.join(bad) or 'on another rank'}); "
                "move it aside to resume from the previous one"
            )

    def saved_world_size(self, ckpt: Committed) -> int:
        """World size of the run that wrote `ckpt` (its data-parallel degree)."""
        return int(read_manifest(ckpt.path)["world_size"])

    # ------------------------------------------------------------------------------------------ universal

    def universal(self, ckpt: Committed) -> Path:
        """The universal form of `ckpt` (next to it), converted once by rank 0 while the others wait.

        Collective. DeepSpeed's `ds_to_universal` runs in a subprocess into a hidden folder that is renamed
        into place when it finished, so a conversion killed half-way is redone, never loaded. Raises on
        every rank when the conversion fails.
        """
        target = ckpt.path.with_name(ckpt.path.name + UNIVERSAL_SUFFIX)
        error = None
        if self.info.is_main and not target.is_dir():
            error = _convert_to_universal(ckpt.path, target)
        error = dist.broadcast_object(error)
        if error:
            raise RuntimeError(error)
        return target


# ==================================================================================================== helpers


def read_manifest(tag_dir: Path) -> dict:
    """The parsed MANIFEST.json of a committed checkpoint folder."""
    return json.loads((tag_dir / MANIFEST).read_text())


def checksum_mismatches(tag_dir: Path, names: list[str] | None = None) -> list[str]:
    """Files of `tag_dir` (all, or `names`) whose digest differs from the manifest's."""
    files = read_manifest(tag_dir)["files"]
    with _hash_pool() as pool:
        return [
            n
            for n in (sorted(files) if names is None else names)
            if file_digest(tag_dir / n, pool) != files[n][HASH_KEY]
        ]


def structural_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (no manifest, a file missing or of another size), or None."""
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


def _convert_to_universal(source: Path, target: Path) -> str | None:
    """Run DeepSpeed's converter into a hidden folder, then rename it to `target`. Returns an error or None."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        str(max(1, min(4, os.cpu_count() or 1))),
    ]
    log.info("converting %s to DeepSpeed's universal checkpoint (another world size)", source)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"universal conversion of {source} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}"
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    # The converter also writes `latest_universal` naming its (temporary) output folder; we always pass
    # the tag explicitly, and a pointer to a folder that no longer exists would only mislead.
    (target.parent / "latest_universal").unlink(missing_ok=True)
    return None


def average_batchnorm_stats(module: torch.nn.Module) -> int:
    """Replace every BatchNorm running mean/var by its mean over ranks, in place. Returns how many layers.

    Collective (one all_reduce of all statistics). Each rank's running statistics come from its own
    batches, and DeepSpeed's consolidation keeps rank 0's buffers only; averaging before a save makes
    every rank's saved copy, the exported weights and the evaluation of every rank agree. The training
    loss does not depend on them (training mode normalises with the batch statistics).
    """
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    stats = [b for m in layers for b in (m.running_mean, m.running_var) if b is not None]
    if not stats or not dist.is_initialized() or torch.distributed.get_world_size() == 1:
        return len(layers)
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in stats])  # [sum of channels] x 2
    dist.all_reduce_sum(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for b in stats:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    return len(layers)


def canary_loss(logits: torch.Tensor, targets: torch.Tensor, label_kind: str) -> torch.Tensor:
    """Cross-entropy of the canary batch in fp32: logits [N, C]; targets class ids [N] or (multi-hot or
    mixed) probabilities [N, C]; multi-label: binary cross-entropy."""
    logits = logits.float()
    if label_kind == "multi":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    if targets.dtype == torch.int64:
        return torch.nn.functional.cross_entropy(logits, targets)
    return -(targets.float() * logits.log_softmax(-1)).sum(-1).mean()


def batchnorm_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> CPU copy of every BatchNorm buffer (running mean/var, batches tracked)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for key, buf in m.named_buffers(recurse=False):
                out[f"{name}.{key}"] = buf.detach().cpu().clone()
    return out


def load_batchnorm_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `batchnorm_state` output back (a universal checkpoint load restores parameters, not buffers)."""
    buffers = dict(module.named_buffers())
    missing = sorted(set(state) - set(buffers))
    if missing:
        raise ValueError(f"checkpoint BatchNorm buffers {missing[:3]} do not exist in this model")
    for name, value in state.items():
        buffers[name].copy_(value)
