"""The run folder: whether a run may start in it (decided once, on rank 0), and every run-level write.

    <output_dir>/<run.name>/
        LOCK             the live job holding the folder: host, pid, Slurm job id, heartbeat (JSON)
        config.yaml      the resolved config (an earlier, different one is kept as config.<time>.yaml)
        ds_config.json   the DeepSpeed config the engine got
        mlflow-spool/    MLflow records not yet delivered (pretrain.spool)
        metrics.jsonl    one JSON line per log step and per evaluation (rank 0)
        logs/rank<R>.log every rank's log
        checkpoints/     committed checkpoints (pretrain.checkpoint), unless checkpoint.dir says elsewhere
        init_report.json fine-tuning: what the initial weights loaded, resized, re-initialised
        ema.safetensors  fine-tuning with EMA: the final EMA weights, and ema.json (the model card)

One live job per folder. Rank 0 creates LOCK exclusively and refreshes its heartbeat from a background
thread; a second job finds a live lock and is refused with one line naming the holder. A lock whose job
is gone is taken over (logged): its process is dead (same host), or it belongs to this very Slurm job (a
requeued job is the same job id, and Slurm never runs a job twice at once), or its heartbeat is older
than STALE_AFTER_S (the holder's node died). A normal exit, a crash caught by Python and a stop for requeue
remove the lock; a SIGKILLed job leaves it to be taken over.

Every decision here is rank 0's and every rank receives it (`dist.leader_decides`): a refusal ends all
ranks at once, before anything is written. Every write method is a no-op on the other ranks, so callers
never check ranks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from pretrain import dist
from pretrain.preemption import Event, EventLog

log = logging.getLogger(__name__)

LOCK = "LOCK"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0


class RunRefused(Exception):
    """This run may not start in this folder (a user decision is needed; exit status 2)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class RunLock:
    """LOCK in the run folder, held by rank 0 of the live job (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _text(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()}) + "\n"

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead job's lock was taken over. Raises RunRefused."""
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._takeover_reason(holder)
                if reason is None:
                    raise RunRefused(
                        f"{self.path.parent} is in use by a live job: {_describe(holder)}; wait for it, stop it, "
                        f"or choose another run.name (remove {self.path} only if that job is really gone)"
                    ) from None
                note = f"took over the lock of a finished job ({_describe(holder)}: {reason})"
                aside = self.path.with_name(f".{LOCK}.taken-over.{os.getpid()}")
                try:
                    os.replace(self.path, aside)  # of two jobs taking over at once, only one finds it
                    aside.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(self._text())
            self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
            self._thread.start()
            return note
        raise RunRefused(f"{self.path}: another job keeps taking this lock; try again")

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # half-written by a job that died while creating it: treated as stale below

    def _takeover_reason(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over, or None when its job may still be alive."""
        if not holder:
            return "unreadable lock"
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"]:
            return "same Slurm job, requeued"
        if holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid", 0))):
            return "its process is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > STALE_AFTER_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._read().get("pid") != self.me["pid"]:
                log.error("%s is no longer ours (taken over?); stopping the heartbeat", self.path)
                return
            tmp = self.path.with_name(f".{LOCK}.tmp{os.getpid()}")
            tmp.write_text(self._text())
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            holder = self._read()
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)


def _describe(holder: dict) -> str:
    if not holder:
        return "unknown holder"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    beat = time.time() - float(holder.get("heartbeat", 0))
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, heartbeat {beat:.0f} s ago"


class RunDir:
    """One run's folder. Build it with `RunDir.open` on every rank (collective)."""

    def __init__(
        self,
        path: Path,
        *,
        writer: bool,
        existed: bool,
        lock: RunLock | None = None,
        events_file: Path | None = None,
    ):
        self.path = path
        self.writer = writer  # rank 0: the only rank that writes run-level files
        self.existed = existed  # the folder held an earlier job's files when this job started
        self._lock = lock
        # The job's event log (cluster/launch.sh appends to it too): rank 0 records, anyone may read.
        self._events = EventLog(events_file) if events_file is not None else None

    @classmethod
    def open(cls, path: Path, *, resume: str, events_file: Path | None = None) -> RunDir:
        """Decide on rank 0 whether a run may start in `path`, take its lock, tell every rank.

        Raises RunRefused on every rank when `resume` is "never" and the folder holds a run, or when a
        live job holds it.
        """
        lock = RunLock(path / LOCK) if dist.rank() == 0 else None

        def decide() -> bool:
            existed = path.is_dir() and any(p.name != LOCK for p in path.iterdir())
            if existed and resume == "never":
                raise RunRefused(
                    f"run.name: {path} already holds a run and checkpoint.resume=never; "
                    "choose another run.name or output_dir, or resume it (checkpoint.resume=auto)"
                )
            path.mkdir(parents=True, exist_ok=True)
            note = lock.acquire()
            if note:
                log.warning("%s: %s", path, note)
            return existed

        existed = dist.leader_decides(decide)
        return cls(path, writer=lock is not None, existed=existed, lock=lock, events_file=events_file)

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    # ------------------------------------------------------------------------------------ rank 0 writes

    def write_config(self, text: str) -> None:
        """config.yaml; an earlier one with other content is kept under a time-stamped name."""
        if not self.writer:
            return
        saved = self.path / "config.yaml"
        if saved.exists() and saved.read_text() != text:
            saved.rename(self.path / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        saved.write_text(text)

    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One line of metrics.jsonl (plain, grep-able, diff-able)."""
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def record_event(self, name: str, **fields: object) -> None:
        """Append to the job's event log (under Slurm; see pretrain.preemption.EventLog)."""
        if self.writer and self._events is not None:
            self._events.record(name, **fields)

    def events(self) -> list[Event]:
        return self._events.read() if self._events is not None else []

    def write_json(self, name: str, obj: object) -> Path:
        path = self.path / name
        if self.writer:
            path.write_text(json.dumps(obj, indent=1) + "\n")
        return path

    def write_safetensors(self, name: str, tensors: dict, sidecar: dict) -> Path:
        """`name` (.safetensors, written under a temporary name, then renamed) and its .json sidecar."""
        path = self.path / name
        if self.writer:
            from safetensors.torch import save_file

            tmp = path.with_name(f".{path.name}.tmp")
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
                os.chmod(tmp, 0o644)  # safetensors leaves 0600; the sidecar gets the umask's mode
                self.write_json(path.with_suffix(".json").name, sidecar)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def close(self) -> None:
        """Release the lock (rank 0)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
