"""Which encoded images the loader's decoder rejects, asked of a child process that may crash.

DALI does not always fail cleanly on a corrupt image: with DALI 2.4's CPU decoder (nvImageCodec), a batch
of 32 or more JPEGs of which one has no valid header can kill the process with SIGSEGV, where a smaller
batch raises "Critical error in pipeline" (measured on this project's digits shards, one header zeroed:
every process that decoded such a 32-64 image batch with up to 20 fresh pipelines crashed; 30 batches of
27 images and 200 of the bad image alone did not). The probe runs
where such a crash costs nothing: a child process (`python -m data_pipeline.decode_probe`) that decodes
the batches the parent sends and answers one byte per batch. A child that dies answers
"not decodable" for that batch and is restarted for the next, so bisection still ends at the culprits.

Protocol on the child's stdin/stdout (no pickle: only byte counts and the bytes themselves):
the child writes b"R" when its pipeline is built; then per batch the parent writes the number of blobs
(uint32), their lengths (uint64 each) and their bytes, and the child answers b"\\x01" (all decode) or
b"\\x00" (a decoding error; it rebuilds its pipeline). A child that does not answer in time is killed:
not ready within READY_TIMEOUT_S is ProbeUnavailable, a batch not answered within BATCH_TIMEOUT_S counts
as a crash (a hung decoder must not hang the error path that called the probe).
"""

from __future__ import annotations

import select
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

PROBE_BATCH = 64  # blobs per pipeline run; the bisection's first split
# Seconds: building the child's pipeline takes 1-3 s here (imports included), a 64-image batch well
# under one; both limits only end a child that hangs.
READY_TIMEOUT_S, BATCH_TIMEOUT_S = 300.0, 300.0


class ProbeUnavailable(RuntimeError):
    """The probe's child process could not start (DALI missing or broken): nothing about the images."""


class DecodeProbe:
    """Decode batches of encoded images with DALI's `decoder` (cpu or mixed) in a child process."""

    def __init__(self, decoder: str = "cpu", device_id: int | None = None, num_threads: int = 1) -> None:
        self.decoder, self.device_id, self.num_threads = decoder, device_id, num_threads
        self._child: subprocess.Popen | None = None
        self.crashes = 0  # batches whose decoding killed the child (or hung it: then it is killed)

    def _start(self) -> subprocess.Popen:
        device = "none" if self.device_id is None else str(self.device_id)
        cmd = [
            sys.executable,
            "-m",
            "data_pipeline.decode_probe",
            self.decoder,
            device,
            str(self.num_threads),
        ]
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = read_byte(child, READY_TIMEOUT_S)
        if ready is None:
            raise ProbeUnavailable(
                f"the decode probe ({' '.join(cmd)}) did not build its pipeline within {READY_TIMEOUT_S:.0f} s; "
                "it was killed"
            )
        if ready != b"R":
            child.wait()
            raise ProbeUnavailable(
                f"the decode probe ({' '.join(cmd)}) exited with status {child.returncode} before its "
                "pipeline was built; its error is printed above"
            )
        return child

    def decodes(self, blobs: list[bytes]) -> bool:
        """True when every blob decodes; False when one does not (or its decoding crashed the child)."""
        if any(len(b) == 0 for b in blobs):
            return False
        if len(blobs) > PROBE_BATCH:
            raise ValueError(f"at most {PROBE_BATCH} blobs per probe, got {len(blobs)}")
        if self._child is None:
            self._child = self._start()
        child = self._child
        request = struct.pack(f"<I{len(blobs)}Q", len(blobs), *(len(b) for b in blobs)) + b"".join(blobs)
        # Written from a thread: a child that stops reading would block a write larger than the pipe's
        # buffer; the deadline below then kills it, which ends that write (BrokenPipeError, swallowed).
        writer = threading.Thread(
            target=_send, args=(child.stdin, request), name="decode-probe-send", daemon=True
        )
        writer.start()
        answer = read_byte(child, BATCH_TIMEOUT_S)
        writer.join()
        if not answer:  # the child died on this batch (or hung on it and was killed)
            child.wait()
            self._child = None
            self.crashes += 1
            return False
        return answer == b"\x01"

    def close(self) -> None:
        """End the child (it exits when its stdin closes)."""
        child, self._child = self._child, None
        if child is not None:
            child.stdin.close()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def __enter__(self) -> DecodeProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send(stream: BinaryIO, data: bytes) -> None:
    try:
        stream.write(data)
        stream.flush()
    except (BrokenPipeError, ValueError):  # the child died (or was killed): read_byte says so
        pass


def read_byte(child: subprocess.Popen, timeout_s: float) -> bytes | None:
    """One byte from `child`'s stdout (b"" once it exited); None when none came within `timeout_s`, after
    killing the child. The protocol sends one byte per request, so nothing is ever buffered ahead."""
    readable, _, _ = select.select([child.stdout], [], [], timeout_s)
    if not readable:
        child.kill()
        child.wait()
        return None
    return child.stdout.read(1)


def find_undecodable(blobs: list[bytes], probe: DecodeProbe) -> list[int]:
    """Indices of the blobs the decoder rejects, found by bisection (O(bad * log n) probes)."""
    bad: list[int] = []

    def visit(lo: int, hi: int) -> None:
        if lo >= hi or probe.decodes(blobs[lo:hi]):
            return
        if hi - lo == 1:
            bad.append(lo)
            return
        mid = (lo + hi) // 2
        visit(lo, mid)
        visit(mid, hi)

    for start in range(0, len(blobs), PROBE_BATCH):
        visit(start, min(start + PROBE_BATCH, len(blobs)))
    return bad


# ------------------------------------------------------------------------------------------------ the child


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def _build(decoder: str, device_id: int | None, num_threads: int) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def define() -> Any:
        jpegs = fn.external_source(name="jpegs", device="cpu", no_copy=False)
        return fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)

    pipe = define(
        batch_size=PROBE_BATCH, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1
    )
    pipe.build()
    return pipe


def _serve(decoder: str, device_id: int | None, num_threads: int) -> None:
    import os

    import numpy as np

    # The answers get their own descriptor; whatever a library prints goes to stderr, not into the protocol.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    pipe = _build(decoder, device_id, num_threads)
    answers.write(b"R")
    answers.flush()
    while (head := _read_exactly(requests, 4)) is not None:
        (count,) = struct.unpack("<I", head)
        sizes = struct.unpack(f"<{count}Q", _read_exactly(requests, 8 * count) or b"")
        blobs = [np.frombuffer(_read_exactly(requests, size) or b"", dtype=np.uint8) for size in sizes]
        if pipe is None:
            pipe = _build(decoder, device_id, num_threads)
        try:
            pipe.feed_input("jpegs", blobs)
            pipe.run()
            answers.write(b"\x01")
        except RuntimeError:  # DALI: "Current pipeline object is no longer valid"
            pipe = None
            answers.write(b"\x00")
        answers.flush()


if __name__ == "__main__":
    _decoder, _device, _threads = sys.argv[1:4]
    _serve(_decoder, None if _device == "none" else int(_device), int(_threads))
