"""Training and evaluation loaders: DALI pipelines over webdataset shards, as iterators of device batches.

Order and state (decision, measured):
- The sample order is ours (`order.py`: a pure function of (seed, epoch)); DALI only plays an explicit
  list of samples (`segment.py`). State = (epoch, origin, cursor) where `cursor` is the global number of
  positions of the epoch consumed, plus DALI's own checkpoint of the current pipeline segment (about
  7 KB, 0.4 ms to take, measured) which holds the random state of every augmentation.
- Same world size and batch size: the segment pipeline is rebuilt with the same index files and seed and
  restored from DALI's checkpoint, so the batches after a resume are bit-identical to an uninterrupted
  run. Without DALI's checkpoint we would have to replay the segment up to the cursor (one full batch of
  decoding per skipped step); DALI's own checkpointing alone (with its reader's sharding and shuffle
  buffer) cannot move to another world size. Hence both: our cursor for the order, DALI for the RNG.
- Another world size (or batch size): the new plan starts at the cursor, so the rest of the epoch is
  read exactly once across the new ranks (sample granularity); augmentation randomness restarts from a
  seed derived from (seed, epoch, cursor, rank). Any rank's state may be loaded: they agree on the cursor.

Corrupt samples at run time (decision): the audit's blocklist removes known-bad samples before any
pipeline exists. If a pipeline still fails, the loader decodes the samples in flight one by one with
the same decoder to find the culprit. on_corrupt="error" raises ValueError naming shard and key;
on_corrupt="skip" replaces the sample by its predecessor in the segment (batches stay full, ranks stay in
step), counts it in `skipped`, rebuilds the pipeline and restores it from the checkpoint of the last good
batch. The skipped keys are part of the state, so a resumed run skips them too.

Segment switches (decision): a rank's pipeline covers `segment_shards` shards, then the next part of the
epoch needs a new one (index files, DALI build, a cold first batch): seconds on every rank at once. With
`segment_ahead` the next segment is prepared on a background thread while the current one plays, up to
its first batch (`_Ahead`); the switch then costs a hand-over. The prepared segment is exactly the one
the synchronous path would open (same positions, seed and skipped set; used only if all three still
match), so the stream and the state are the same with and without it, and a state taken at any point
resumes as before: a prepared segment that was not handed over yet is not part of the state.

No host-device sync on the way to the trainer: see pipeline.py (streams, pinned memory).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.dataset import ShardedDataset
from data_pipeline.decode_probe import DecodeProbe, find_undecodable
from data_pipeline.manifest import label_ids
from data_pipeline.mixup import mix_batch
from data_pipeline.order import (
    EpochOrder,
    derive_seed,
    eval_positions,
    rank_positions,
    segment_steps,
    steps_in_plan,
)
from data_pipeline.pipeline import (
    Placement,
    TrainAugment,
    byte_samples,
    eval_pipeline,
    placement,
    sample_ids,
    to_device,
    to_torch,
    train_pipeline,
)
from data_pipeline.segment import Segment, make_segment, natural_locate

log = logging.getLogger(__name__)
STATE_VERSION = 1
OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_labels(
    raw: list[bytes], kind: str, num_classes: int, where: str, encoding: str = "ascii"
) -> torch.Tensor:
    """Label components ("ascii" ids or "json", see manifest.label_ids) -> int64 [N] (single) or multi-hot
    float32 [N, C] (multi)."""
    try:
        ids = [label_ids(blob, encoding) for blob in raw]
    except ValueError as exc:
        raise ValueError(f"{where}: a label component is not {encoding} class ids ({exc})") from exc
    if any(not row or max(row) >= num_classes or min(row) < 0 for row in ids):
        raise ValueError(f"{where}: a label is empty or outside [0, {num_classes})")
    if kind == "single":
        return torch.tensor([row[0] for row in ids], dtype=torch.int64)
    hot = torch.zeros(len(ids), num_classes, dtype=torch.float32)
    for i, row in enumerate(ids):
        hot[i, row] = 1.0
    return hot


INDEX_PREFIX = "coatnet-"
OWNER_FILE = "owner"  # "<host> <pid>" of the process whose loader writes the folder


def _index_dir(cfg: DataConfig, tag: str) -> Path:
    """A fresh folder for one loader's index files, with its owner written in it. A rank killed with
    SIGKILL never runs `close`: its folder is removed by the next loader on the same host (and parent)."""
    parent = Path(cfg.index_cache) if cfg.index_cache else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_index_dirs(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{INDEX_PREFIX}{tag}-", dir=parent))
    (folder / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphan_index_dirs(parent: Path) -> list[Path]:
    """Delete this user's index folders under `parent` whose owner process, on this host, is gone.
    Folders of other hosts (a shared index_cache), of live processes or without an owner file stay."""
    host, removed = socket.gethostname(), []
    for folder in parent.glob(f"{INDEX_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            owner_host, pid = (folder / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def model_input(images: torch.Tensor, output_dtype: str | None) -> torch.Tensor:
    """The one cast of the image batch to the model's dtype, on the training device (DALI has no bf16)."""
    return images.to(OUTPUT_DTYPES[output_dtype or "fp32"])


def gpu_decoder_args(cfg: DataConfig) -> dict[str, Any]:
    """nvJPEG sizing for the mixed decoder (pipeline.placement drops it on the CPU path)."""
    return {
        "device_memory_padding": cfg.device_memory_padding,
        "host_memory_padding": cfg.host_memory_padding,
        "hw_decoder_load": cfg.hw_decoder_load,
    }


class _LiveSegment:
    """A training segment being played: its sample list, pipeline, place in the plan and progress."""

    def __init__(
        self,
        segment: Segment,
        order: EpochOrder,
        origin: int,
        first_step: int,
        num_steps: int,
        seed: int,
        skipped: frozenset[tuple[str, str]],
    ) -> None:
        self.segment, self.order, self.origin = segment, order, origin
        self.first_step, self.num_steps, self.seed, self.skipped = first_step, num_steps, seed, skipped
        self.done = 0
        self.pipe: Any = None
        self.last_checkpoint: bytes | None = None
        self.first_out: tuple[Any, ...] | None = None  # its first batch, when run ahead

    @property
    def key(self) -> tuple[int, int, int]:
        """(epoch, origin, first step): which part of which plan this segment plays."""
        return self.order.epoch, self.origin, self.first_step

    def release(self) -> None:
        """Drop the pipeline (its destructor waits for DALI's threads) and delete the index files."""
        self.pipe, self.first_out = None, None
        self.segment.remove()


class _Ahead:
    """A segment prepared on a background thread; `take()` waits for it (re-raising its error)."""

    def __init__(self, key: tuple[int, int, int], skipped: frozenset, prepare: Callable[[], _LiveSegment]):
        self.key, self.skipped = key, skipped
        self._live: _LiveSegment | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(prepare,), name="segment-ahead", daemon=True)
        self._thread.start()

    def _run(self, prepare: Callable[[], _LiveSegment]) -> None:
        try:
            self._live = prepare()
        except BaseException as exc:  # handed to the main thread by take()
            self._error = exc

    def take(self) -> _LiveSegment:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._live is not None
        return self._live

    def discard(self) -> None:
        self._thread.join()
        if self._live is not None:
            self._live.release()
            self._live = None


def _in_background(work: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=work, name="segment-release", daemon=True)
    thread.start()
    return thread


class _LabelSpace:
    """What both loaders tell the trainer about the labels, from the dataset's manifest."""

    dataset: ShardedDataset

    @property
    def num_classes(self) -> int:
        return self.dataset.manifest.num_classes

    @property
    def label_kind(self) -> str:
        return self.dataset.manifest.label_kind

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.manifest.class_names)


class TrainLoader(_LabelSpace):
    """Endless iterator of (images NCHW on `device`, targets); see the module docstring for the state."""

    def __init__(
        self,
        cfg: DataConfig,
        dataset: ShardedDataset,
        *,
        image_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ) -> None:
        assert 0 <= rank < world_size, (rank, world_size)  # from the launcher, never from a user
        if len(cfg.scale) != 2 or len(cfg.ratio) != 2:
            raise ValueError("data.scale and data.ratio must be [low, high] pairs")
        self.cfg, self.dataset, self.rank, self.world_size, self.seed = cfg, dataset, rank, world_size, seed
        self.device = device
        self.place: Placement = placement(cfg.decode, device, gpu_decoder_args(cfg))
        self.aug = TrainAugment(
            image_size,
            tuple(cfg.scale),
            tuple(cfg.ratio),
            cfg.hflip,
            cfg.randaugment_layers,
            cfg.randaugment_magnitude,
        )
        self.micro_step_samples = cfg.batch_size * world_size
        self.seg_steps = segment_steps(dataset.counts, cfg.segment_shards, self.micro_step_samples)
        self._dir = _index_dir(cfg, f"train-r{rank}")
        self._epoch, self._origin, self._cursor = 0, 0, 0
        self._live: _LiveSegment | None = None
        self._ahead: _Ahead | None = None
        self._releasing: list[threading.Thread] = []
        self._pending_checkpoint: bytes | None = None
        self._skipped: set[tuple[str, str]] = set()
        self._probe: DecodeProbe | None = None
        self.last_ids: list[str] = []  # "<shard>/<key>" of the last batch, as DALI read them

    # -- what the trainer reads -------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        """Samples of one epoch over all ranks (padding excluded)."""
        return self.dataset.num_samples

    @property
    def micro_steps_per_epoch(self) -> int:
        """Micro-batch steps (one batch on every rank) of a full epoch, identical on every rank (the last padded)."""
        return math.ceil(self.samples_per_epoch / self.micro_step_samples)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(shard, key) of samples that failed to decode at run time and were replaced (on_corrupt=skip)."""
        return sorted(self._skipped)

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._live is None:
            self._live = self._take_ahead() or self._open_segment()
            self._start_ahead(self._live)
        live = self._live
        images_tl, labels_tl, info_tl = self._run(live)
        self.last_ids = sample_ids(info_tl)
        where = f"shards of segment {live.segment.directory}"
        labels = parse_labels(
            byte_samples(labels_tl),
            self.label_kind,
            self.num_classes,
            where,
            self.dataset.manifest.label_encoding,
        )
        images = to_torch(images_tl, self.device, self.place.consumer_stream())  # [B, 3, S, S] float32
        batch_position = (
            self._origin
            + (live.first_step + live.done) * self.micro_step_samples
            + self.rank * self.cfg.batch_size
        )
        live.done += 1
        images, targets = self._targets(images, labels, batch_position)
        self._advance(live)
        return model_input(images, self.cfg.output_dtype), targets

    def _targets(
        self, images: torch.Tensor, labels: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets on the device (labels are built on the host, moved without a sync); Mixup there."""
        if self.cfg.mixup_alpha <= 0:
            return images, to_device(labels, self.device)
        if self.label_kind == "single":
            labels = torch.nn.functional.one_hot(labels, self.num_classes).float()
        lam = float(
            np.random.default_rng([self.seed, self._epoch, position]).beta(
                self.cfg.mixup_alpha, self.cfg.mixup_alpha
            )
        )
        return mix_batch(images, to_device(labels, self.device), lam)

    def _advance(self, live: _LiveSegment) -> None:
        self._cursor += self.micro_step_samples
        if live.done < live.num_steps:
            return
        self._close_segment()
        if self._cursor >= self.dataset.num_samples:
            self._epoch, self._origin, self._cursor = self._epoch + 1, 0, 0

    def _open_segment(self) -> _LiveSegment:
        """The segment holding the cursor, built here (start, resume, or no usable segment ahead)."""
        step = (self._cursor - self._origin) // self.micro_step_samples
        first = (step // self.seg_steps) * self.seg_steps
        checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
        if step > first and checkpoint is None:
            raise ValueError("internal: resuming inside a segment needs its DALI checkpoint")
        order = EpochOrder(self.dataset.counts, self.seed, self._epoch)
        live = self._prepare(order, self._origin, first, frozenset(self._skipped), checkpoint)
        live.done = step - first
        return live

    def _prepare(
        self,
        order: EpochOrder,
        origin: int,
        first: int,
        skipped: frozenset[tuple[str, str]],
        checkpoint: bytes | None = None,
    ) -> _LiveSegment:
        """Index files and a built pipeline for the segment of plan (order.epoch, origin) at step `first`.

        Reads only its arguments and immutable loader settings: it also runs on the background thread.
        """
        total = steps_in_plan(self.dataset.num_samples, origin, self.micro_step_samples)
        count = min(self.seg_steps, total - first)
        positions = rank_positions(origin, first, count, self.cfg.batch_size, self.world_size, self.rank)
        shards, samples = order.locate(positions)
        directory = self._dir / f"segment-e{order.epoch}-o{origin}-s{first}"
        segment = make_segment(self.dataset, shards, samples, directory)
        if segment.substitute(set(skipped), self.dataset):
            segment.write(self.dataset)
        seed = derive_seed(self.seed, order.epoch, origin, first, self.rank)
        live = _LiveSegment(segment, order, origin, first, count, seed, skipped)
        self._build(live, checkpoint)
        return live

    def _next_key(self, live: _LiveSegment) -> tuple[int, int, int]:
        """(epoch, origin, first step) of the segment played after `live` (see `_advance`)."""
        epoch, origin, first = live.key
        following = first + live.num_steps
        if following < steps_in_plan(self.dataset.num_samples, origin, self.micro_step_samples):
            return epoch, origin, following
        return epoch + 1, 0, 0

    def _start_ahead(self, live: _LiveSegment) -> None:
        """Prepare the segment after `live` on a background thread, up to its first batch."""
        if not self.cfg.segment_ahead:
            return
        key = self._next_key(live)
        epoch, origin, first = key
        order = live.order if epoch == live.order.epoch else EpochOrder(self.dataset.counts, self.seed, epoch)
        skipped = frozenset(self._skipped)
        stream = self.place.consumer_stream()  # read here: torch's current stream is per thread

        def prepare() -> _LiveSegment:
            ahead = self._prepare(order, origin, first, skipped)
            # Bound to the consumer's stream like every other batch: DALI then frees its buffers in that
            # stream's order, after the copy the main thread enqueues on it.
            ahead.first_out = ahead.pipe.run(stream)
            return ahead

        self._ahead = _Ahead(key, skipped, prepare)

    def _take_ahead(self) -> _LiveSegment | None:
        """The segment prepared ahead, if it is the one to open now; else None (and it is dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        step = (self._cursor - self._origin) // self.micro_step_samples
        wanted = (self._epoch, self._origin, step)
        if ahead.key != wanted or ahead.skipped != frozenset(self._skipped) or self._pending_checkpoint:
            ahead.discard()  # e.g. a sample was skipped meanwhile: the synchronous path substitutes it
            return None
        try:
            return ahead.take()
        except Exception as exc:  # e.g. a corrupt JPEG in its first batch: the synchronous path handles it
            log.info("rank %d: segment prepared ahead failed (%s); opening it in place", self.rank, exc)
            ahead.discard()
            return None

    def _build(self, live: _LiveSegment, checkpoint: bytes | None) -> None:
        manifest = self.dataset.manifest
        live.pipe = train_pipeline(
            self.aug,
            self.place,
            paths=live.segment.paths,
            index_paths=live.segment.index_paths,
            exts=[manifest.image_ext, manifest.label_ext],
            batch_size=self.cfg.batch_size,
            num_threads=self.cfg.num_threads,
            prefetch=self.cfg.prefetch_queue,
            seed=live.seed,
            checkpoint=checkpoint,
        )
        live.last_checkpoint = checkpoint

    def _run(self, live: _LiveSegment) -> tuple[Any, Any]:
        while True:
            try:
                out, live.first_out = live.first_out or live.pipe.run(self.place.consumer_stream()), None
            except RuntimeError as exc:
                self._recover(live, exc)
                continue
            if self.cfg.on_corrupt == "skip":
                live.last_checkpoint = live.pipe.checkpoint()  # the point to rebuild from on a failure
            return out

    def _recover(self, live: _LiveSegment, exc: RuntimeError) -> None:
        """A pipeline failed: find the undecodable sample(s) in flight; raise, or replace and rebuild."""
        batch = self.cfg.batch_size
        lo = live.done * batch
        hi = min(len(live.segment.entries), lo + (self.cfg.prefetch_queue + 1) * batch)
        in_flight = live.segment.entries[lo:hi]
        self._probe = self._probe or DecodeProbe(self.place.decoder, self.place.device_id)
        bad = find_undecodable([self.dataset.read_image(s, x) for s, x in in_flight], self._probe)
        if not bad:
            raise RuntimeError(
                f"DALI training pipeline failed on shards of {self.dataset.root}: {exc}"
            ) from exc
        culprits = [(self.dataset.shard_name(in_flight[i][0]), in_flight[i][1].key) for i in bad]
        names = ", ".join(f"shard {s} key {k}" for s, k in culprits)
        if self.cfg.on_corrupt == "error":
            raise ValueError(
                f"undecodable image(s) in {self.dataset.root}: {names}; run `coatnet-data audit "
                f"{self.dataset.root}` to blocklist them, or set data.on_corrupt=skip"
            ) from exc
        log.warning("rank %d: skipping undecodable image(s) %s (replaced by a neighbour)", self.rank, names)
        self._skipped.update(culprits)
        live.segment.substitute(self._skipped, self.dataset)
        live.segment.write(self.dataset)
        self._build(live, live.last_checkpoint)

    def _close_segment(self) -> None:
        """Release the played segment off the step's path: DALI's pipeline teardown joins its threads."""
        live, self._live = self._live, None
        if live is not None:
            self._releasing = [t for t in self._releasing if t.is_alive()]
            self._releasing.append(_in_background(live.release))

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.discard()
            self._ahead = None

    def _settle(self) -> None:
        """Wait for background releases: a segment reopened under the same name must not race its removal."""
        self._close_segment()
        self._drop_ahead()
        for thread in self._releasing:
            thread.join()
        self._releasing = []

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small picklable state: epoch, origin, cursor, layout, skipped samples, DALI segment checkpoint."""
        live = self._live
        return {
            "version": STATE_VERSION,
            "fingerprint": self.dataset.fingerprint,
            "seed": self.seed,
            "epoch": self._epoch,
            "origin": self._origin,
            "cursor": self._cursor,
            "world_size": self.world_size,
            "batch_size": self.cfg.batch_size,
            "rank": self.rank,
            "skipped": sorted(self._skipped),
            "dali": live.pipe.checkpoint() if live is not None else self._pending_checkpoint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: exactly the same stream at the same world size and batch size; at another
        one, the rest of the epoch from the global cursor (every remaining sample once)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state has version {state.get('version')}, expected {STATE_VERSION}"
            )
        if state["fingerprint"] != self.dataset.fingerprint:
            raise ValueError(
                f"data loader state was saved for another dataset (fingerprint {state['fingerprint']}, now "
                f"{self.dataset.fingerprint}): the shards or the blocklist of {self.dataset.root} changed"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"data loader state was saved with seed {state['seed']}, this run uses {self.seed}"
            )
        same_layout = state["world_size"] == self.world_size and state["batch_size"] == self.cfg.batch_size
        if same_layout and state["rank"] != self.rank:
            raise ValueError(f"data loader state of rank {state['rank']} loaded into rank {self.rank}")
        self._settle()
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self._skipped = {tuple(x) for x in state["skipped"]}
        if same_layout:
            self._origin, self._pending_checkpoint = int(state["origin"]), state["dali"]
        else:
            self._origin, self._pending_checkpoint = self._cursor, None

    def close(self) -> None:
        """Release the pipelines (played and prepared ahead), end the decode probe, delete the index files."""
        self._settle()
        if self._probe is not None:
            self._probe.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class EvalLoader(_LabelSpace):
    """One pass over the evaluation set per iteration: (images, labels, valid) with equal steps per rank."""

    def __init__(
        self,
        cfg: DataConfig,
        dataset: ShardedDataset,
        *,
        image_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        assert 0 <= rank < world_size, (rank, world_size)  # from the launcher, never from a user
        self.cfg, self.dataset, self.image_size, self.device = cfg, dataset, image_size, device
        self.place = placement(cfg.decode, device, gpu_decoder_args(cfg))
        self.positions, self.valid, self.steps = eval_positions(
            dataset.num_samples, cfg.eval_batch_size, world_size, rank
        )
        self._dir = _index_dir(cfg, f"eval-r{rank}")
        self.last_ids: list[str] = []  # "<shard>/<key>" of the last batch, as DALI read them

    @property
    def num_samples(self) -> int:
        """Samples of one pass over all ranks (padding excluded)."""
        return self.dataset.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        shards, samples = natural_locate(self.dataset.counts, self.positions)
        segment = make_segment(self.dataset, shards, samples, self._dir / "pass")
        manifest, batch = self.dataset.manifest, self.cfg.eval_batch_size
        pipe = eval_pipeline(
            self.image_size,
            self.cfg.eval_crop_ratio,
            self.place,
            paths=segment.paths,
            index_paths=segment.index_paths,
            exts=[manifest.image_ext, manifest.label_ext],
            batch_size=batch,
            num_threads=self.cfg.num_threads,
            prefetch=self.cfg.prefetch_queue,
        )
        try:
            for step in range(self.steps):
                images_tl, labels_tl, info_tl = pipe.run(self.place.consumer_stream())
                self.last_ids = sample_ids(info_tl)
                labels = parse_labels(
                    byte_samples(labels_tl),
                    self.label_kind,
                    self.num_classes,
                    str(self.dataset.root),
                    self.dataset.manifest.label_encoding,
                )
                valid = torch.from_numpy(self.valid[step * batch : (step + 1) * batch].copy())
                images = to_torch(images_tl, self.device, self.place.consumer_stream())
                yield (
                    model_input(images, self.cfg.output_dtype),
                    to_device(labels, self.device),
                    to_device(valid, self.device),
                )
        finally:
            del pipe
            segment.remove()

    def close(self) -> None:
        """Delete this loader's index files."""
        shutil.rmtree(self._dir, ignore_errors=True)


def build_train_loader(
    cfg: DataConfig, *, image_size: int, rank: int, world_size: int, seed: int, device: torch.device
) -> TrainLoader:
    """The training loader of one rank over `cfg.train`."""
    if not cfg.train:
        raise ValueError("data.train is empty: set it to a shard directory with a manifest.json")
    return TrainLoader(
        cfg,
        ShardedDataset(cfg.train),
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
    )


def build_eval_loader(
    cfg: DataConfig, *, image_size: int, rank: int, world_size: int, device: torch.device
) -> EvalLoader:
    """The evaluation loader of one rank over `cfg.val`."""
    if not cfg.val:
        raise ValueError("data.val is not set: there is no evaluation set to load")
    return EvalLoader(
        cfg, ShardedDataset(cfg.val), image_size=image_size, rank=rank, world_size=world_size, device=device
    )
