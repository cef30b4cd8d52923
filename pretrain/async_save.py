"""Checkpoint files serialized into host memory during the save, written to disk by a background thread.

DeepSpeed hands every file of a save to its checkpoint engine (`engine.checkpoint_engine.save(state_dict,
path)`, then `commit`). `HostBufferedEngine`, which `CheckpointManager` installs when
`checkpoint.async_save` is on, serializes each state dict with torch.save into a host buffer of its own and
returns: from the next step on the training state changes, the buffer keeps the bytes of this step. That
copy is all the training thread waits for. The one device-specific part is torch.save's own copy of GPU
tensors to the host (synchronous, one per storage); nothing here touches a device otherwise.

`BackgroundWrite` then (once DeepSpeed's `save_checkpoint` returned) writes those buffers on a thread of
its own, digests every 16 MiB chunk from memory in parallel threads while it writes (no read-back),
fsyncs, and ends with the manifest entries of this
rank's files (or the error that stopped it). It runs no collective: a collective from a second thread
would interleave with the training thread's. The commit (every rank's entries gathered, the manifest
renamed into place) stays with `CheckpointManager`, on the training thread.

Memory: one buffer per file a rank writes, kept and reused from save to save (a fresh mapping would be
paid in page faults every time): about the rank's share of the checkpoint, 12-16 bytes per parameter
divided by the world size. A buffer is not touched again before the write that reads it has ended: the
manager waits for the save in flight before it starts the next one. A save that is waited for (stop,
final) and finds no buffers yet goes straight to disk, as DeepSpeed's own engine would: a run that only
saves when it stops needs no host memory for it.

The buffers hold zip archives torch.load reads as usual, written with torch's CRC-32 of each record turned
off: the manifest's BLAKE3 of every chunk, checked on every resume, is what guards these files, and
torch.load does not check the CRCs (Python's `zipfile.testzip` would report them as wrong).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from torch.utils.serialization import config as serialization_config

from pretrain import digest

_PAGE = mmap.PAGESIZE


class HostBuffer:
    """A growable anonymous memory mapping that torch.save writes into (file-like: `write`, `flush`)."""

    def __init__(self, capacity: int = 64 << 20) -> None:
        self._map = mmap.mmap(-1, max(capacity, _PAGE))
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        end = self.size + view.nbytes
        if end > len(self._map):
            self._grow(end)
        self._map[self.size : end] = view
        self.size = end
        return view.nbytes

    def flush(self) -> None:
        pass

    def view(self) -> memoryview:
        """The bytes written so far (release the view before the buffer is written to again)."""
        return memoryview(self._map)[: self.size]

    def _grow(self, needed: int) -> None:
        grown = mmap.mmap(-1, max(needed, 2 * len(self._map)))
        with memoryview(self._map) as old:
            grown[: self.size] = old[: self.size]
        self._map.close()
        self._map = grown


class HostBufferedEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, saving into host buffers (`pending`) instead of files."""

    def __init__(self, zipfile_serialization: bool) -> None:
        super().__init__(None)
        self.name = "HostBufferedEngine"
        self.zipfile_serialization = zipfile_serialization
        self._buffers: dict[str, HostBuffer] = {}  # by file name: every save writes the same names
        self.direct = False  # set: DeepSpeed's own behaviour, straight to disk
        self.sink: Callable[[Path, HostBuffer], None] | None = None  # hears of each file once serialized

    def save(self, state_dict, path: str) -> None:  # DeepSpeed passes both by keyword
        if self.direct or self.sink is None:
            super().save(state_dict, path)
            return
        buf = self._buffers.setdefault(Path(path).name, HostBuffer())
        buf.size = 0
        with serialization_config.patch({"save.compute_crc32": False}):
            torch.save(state_dict, buf, _use_new_zipfile_serialization=self.zipfile_serialization)
        self.sink(Path(path), buf)


def writer_for(
    engine, async_save: bool, wait: bool, sink: Callable[[Path, HostBuffer], None]
) -> HostBufferedEngine | None:
    """The host-buffered engine of `engine` set up for one save, or None to leave DeepSpeed's as it is.

    Installed at the first async save (loading is unchanged). A save that is waited for (stop, final)
    goes straight to disk unless earlier saves made the buffers: it would not return sooner, and a run
    that only saves when it stops needs no host memory for it.
    """
    current = engine.checkpoint_engine
    if not isinstance(current, HostBufferedEngine):
        if not async_save:
            return None
        if type(current) is not TorchCheckpointEngine:
            raise ValueError(
                f"checkpoint.async_save: DeepSpeed is configured with its {type(current).__name__}; "
                "async saves replace only the default TorchCheckpointEngine (set checkpoint.async_save=false)"
            )
        current = engine.checkpoint_engine = HostBufferedEngine(current.zipfile_serialization)
    current.direct = not async_save or (wait and not current._buffers)
    current.sink = sink
    return current


def write_file(path: Path, data: memoryview, chunk: int, pool: ThreadPoolExecutor) -> tuple[int, str]:
    """Write `data` to `path` and fsync it; (bytes, digest) with the digest of `checkpoint.file_digest`,
    computed from memory: each `chunk`-byte piece is hashed in `pool` while the next one is written."""
    pieces = [data[i : i + chunk] for i in range(0, max(data.nbytes, 1), chunk)]
    hashed = []
    with open(path, "wb") as fh:
        for piece in pieces:
            hashed.append(pool.submit(digest.chunk_digest, piece))
            fh.write(piece)  # buffered file object: writes the whole piece or raises
        fh.flush()
        os.fsync(fh.fileno())
    combined = digest.combine(h.result() for h in hashed)
    for piece in pieces:
        piece.release()
    return data.nbytes, combined


class BackgroundWrite:
    """One rank's part of one save. `work(files)` gets the files `add` handed over (until `close`) and
    returns the manifest entries of this rank's files; it runs on a daemon thread (`start`) or on the
    caller's (`run_here`, a synchronous save). `result()` waits: (entries, None) or (None, what it
    raised)."""

    def __init__(self, work: Callable[[Iterator[tuple[Path, HostBuffer]]], dict]) -> None:
        self._work = work
        self._files: queue.SimpleQueue = queue.SimpleQueue()
        self._entries: dict | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)

    def add(self, path: Path, buf: HostBuffer) -> None:
        self._files.put((path, buf))

    def close(self) -> None:
        """No more files."""
        self._files.put(None)

    def start(self) -> BackgroundWrite:
        self._thread.start()
        return self

    def run_here(self) -> BackgroundWrite:
        self._run()
        return self

    def _queued(self) -> Iterator[tuple[Path, HostBuffer]]:
        while (item := self._files.get()) is not None:
            yield item

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._entries = self._work(self._queued())
        except BaseException as exc:  # handed to the training thread, which decides with the other ranks
            self._error = exc
        self.seconds = time.perf_counter() - t0

    def done(self) -> bool:
        return not self._thread.is_alive() and (self._entries is not None or self._error is not None)

    def result(self) -> tuple[dict | None, BaseException | None]:
        if self._thread.ident is not None:
            self._thread.join()
        return self._entries, self._error
