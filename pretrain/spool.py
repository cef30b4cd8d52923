"""The tracker's outbox on disk: an append-only, size-bounded record log and a delivered cursor.

    <run folder>/mlflow-spool/
        seg-00000001.jsonl ...  records in the order they were made, one JSON object per line
        cursor.json             {"segment": N, "offset": bytes of segment N delivered, "dropped": count}
        run.json                the MLflow run these records go to (written by pretrain.tracking)

The training thread appends (a local file write, never the network); one sender thread reads from the
cursor, delivers, and acknowledges. What is acknowledged is never sent again; what is not survives the
process: the next job of the run (a requeue) opens the same spool and delivers it first. Delivery is
at least once: a job killed between a delivery and its acknowledgement re-sends that batch, which
MLflow absorbs (identical metric points are deduplicated; params, tags and statuses are idempotent).

Bounded: appends go to the newest segment until it holds `max_bytes / SEGMENTS` bytes, then a new one
starts. When the undelivered segments together exceed `max_bytes`, the oldest one loses its metric
records (the rest, a few lines of params, tags and statuses, is kept in order); `dropped` counts them.
Fully delivered segments are deleted.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

SEGMENTS = 8  # a full spool holds about this many segments: the unit of dropping is 1/8 of the bound
CURSOR = "cursor.json"
DROPPABLE = "metrics"  # the only record kind that may be dropped when the spool is full


@dataclass(frozen=True)
class Position:
    """Just after one record: acknowledge it to mark it and everything before it delivered."""

    segment: int
    offset: int


def _segment_name(n: int) -> str:
    return f"seg-{n:08d}.jsonl"


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


class Spool:
    """Records on disk in order, with a cursor of what was delivered (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max(1, int(max_bytes))
        self.segment_bytes = max(1, self.max_bytes // SEGMENTS)
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # appends (training, sampler) against reads, drops and deletes (sender)
        cursor = self._read_cursor()
        self._cursor = Position(cursor["segment"], cursor["offset"])
        self.dropped = int(cursor.get("dropped", 0))
        segments = self._segments()
        self._current = max(segments, default=max(self._cursor.segment, 1))
        self._fh = None  # opened lazily: a spool that is only read (deliver) writes nothing

    # ------------------------------------------------------------------------------- writer side

    def append(self, record: dict) -> None:
        """Add one record at the end. Raises OSError (disk full...) for the caller to count."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fh is None:
                self._fh = open(self.root / _segment_name(self._current), "ab")  # noqa: SIM115 - kept open
            elif self._fh.tell() >= self.segment_bytes:
                self._fh.close()
                self._current += 1
                self._fh = open(self.root / _segment_name(self._current), "ab")  # noqa: SIM115
            self._fh.write(line)
            self._fh.flush()  # into the page cache: a killed process loses nothing it appended

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    # ------------------------------------------------------------------------------- sender side

    def read(self, max_records: int) -> list[tuple[Position, dict]]:
        """Up to `max_records` undelivered records from the cursor on, oldest first (drops first when full)."""
        out: list[tuple[Position, dict]] = []
        with self._lock:
            self._enforce_bound()
            seg, offset = self._cursor.segment, self._cursor.offset
            for n in [s for s in self._segments() if s >= seg]:
                start = offset if n == seg else 0
                with open(self.root / _segment_name(n), "rb") as fh:
                    fh.seek(start)
                    pos = start
                    for line in fh:
                        if not line.endswith(b"\n"):
                            break  # being written right now: next time
                        pos += len(line)
                        try:
                            out.append((Position(n, pos), json.loads(line)))
                        except ValueError:
                            continue  # a torn line (disk full, node crash): nothing to deliver
                        if len(out) >= max_records:
                            return out
        return out

    def ack(self, position: Position) -> None:
        """Everything up to `position` is delivered: move the cursor, delete finished segments."""
        with self._lock:
            if (position.segment, position.offset) <= (self._cursor.segment, self._cursor.offset):
                return
            self._cursor = position
            self._write_cursor()
            for n in self._segments():
                if n < position.segment and n != self._current:
                    (self.root / _segment_name(n)).unlink(missing_ok=True)

    def undelivered_bytes(self) -> int:
        with self._lock:
            return self._undelivered_bytes()

    # ------------------------------------------------------------------------------- internals

    def _segments(self) -> list[int]:
        return sorted(int(p.name[4:12]) for p in self.root.glob("seg-*.jsonl"))

    def _undelivered_bytes(self) -> int:
        total = 0
        for n in self._segments():
            if n >= self._cursor.segment:
                size = (self.root / _segment_name(n)).stat().st_size
                total += size - (self._cursor.offset if n == self._cursor.segment else 0)
        return total

    def _enforce_bound(self) -> None:
        """While over the bound, strip the metric records out of the oldest undelivered segments.

        Runs only inside `read`, on the sender thread, so no batch is in flight with positions that
        the rewrite invalidates.
        """
        for n in [s for s in self._segments() if s >= self._cursor.segment and s != self._current]:
            if self._undelivered_bytes() <= self.max_bytes:
                return
            path = self.root / _segment_name(n)
            start = self._cursor.offset if n == self._cursor.segment else 0
            kept, dropped = [], 0
            for line in path.read_bytes()[start:].splitlines(keepends=True):
                try:
                    kind = json.loads(line).get("kind")
                except ValueError:
                    continue
                if kind == DROPPABLE:
                    dropped += 1
                else:
                    kept.append(line)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(b"".join(kept))  # params, tags, statuses stay, in order, in the same segment
            os.replace(tmp, path)
            if n == self._cursor.segment:
                self._cursor = Position(n, 0)
            self.dropped += dropped
            self._write_cursor()

    def _read_cursor(self) -> dict:
        try:
            cursor = json.loads((self.root / CURSOR).read_text())
            return {"segment": int(cursor["segment"]), "offset": int(cursor["offset"]), **cursor}
        except (OSError, ValueError, KeyError, TypeError):
            return {"segment": 1, "offset": 0, "dropped": 0}

    def _write_cursor(self) -> None:
        write_json_atomic(
            self.root / CURSOR,
            {"segment": self._cursor.segment, "offset": self._cursor.offset, "dropped": self.dropped},
        )
