"""Preemption and time limits: all ranks agree on a step to stop at, then save, exit and get requeued.

How a stop request reaches the training processes (cluster/launch.sh):
- Slurm sends its warning signal (``#SBATCH --signal=B:USR1@...``) to the batch shell only. The shell
  touches a stop file on the shared filesystem, which every rank on every node can see. A file, not a
  signal, because the ``deepspeed`` launcher between srun and the ranks forwards only SIGINT/SIGTERM (and
  SIGKILLs its workers 30 s later) and NCCL has been known to use SIGUSR1 itself.
- A signal sent to a rank directly (SIGUSR2, or SIGTERM from a preempting scheduler) sets a local flag.

The training loop calls ``should_stop(step)`` every step, and evaluation calls ``poll()`` every batch.
Each call combines the ranks' local flags with one all_reduce(MAX) of one element, so a request seen by
one rank reaches all of them at the same step (or evaluation batch), however long a step takes: the
check is as frequent in seconds as the steps are. Measured on 2 CPU ranks (gloo, 2 heavily loaded
cores): 0.8 ms per call next to 200-1000 ms smoke-model steps, under 0.5%; under NCCL it is one
host-device sync point per step. Each rank looks for the stop
file at most every ``file_every_s`` seconds of its own clock (a stat on the shared filesystem); the
agreement, not the clocks, makes the ranks stop at one step. The stop itself happens at the first step
that is a multiple of ``align`` (the trainer's log interval, so that every logged mean loss covers the
same steps as in an uninterrupted run) at or after the agreement: keep log_every x step time well under
the 30 s the deepspeed launcher leaves between SIGTERM and SIGKILL.

The trainer then saves a checkpoint, records a ``stop`` event and exits with EXIT_REQUEUE. The launchers
between the ranks and the batch shell do not pass that status on when they were signalled themselves
(the deepspeed runner exits 143, its per-node launcher 1), so cluster/launch.sh requeues when srun
exits with EXIT_REQUEUE or when the event log holds a ``stop`` after this job run's ``start``; the
requeued job (same job id, same run directory) resumes from that checkpoint.

The batch shell and rank 0 append the job's lifecycle to one event log (EventLog) so that the time lost
to each interruption can be measured (``downtimes``) and logged.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pretrain import dist

log = logging.getLogger(__name__)

# Exit status meaning "a checkpoint was saved because a stop was requested: requeue me".
# cluster/launch.sh mirrors this value; keep them equal.
EXIT_REQUEUE = 3

# Set by cluster/launch.sh for every training process.
STOP_FILE_ENV = "COATNET_STOP_FILE"
EVENTS_FILE_ENV = "COATNET_EVENTS_FILE"

DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@dataclass(frozen=True)
class JobContext:
    """What the launch script tells the trainer about the job it runs in (empty outside Slurm)."""

    stop_file: Path | None = None
    events_file: Path | None = None
    job_id: str | None = None
    restart_count: int = 0  # how many times Slurm has requeued this job

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobContext:
        """Read COATNET_STOP_FILE, COATNET_EVENTS_FILE, SLURM_JOB_ID, SLURM_RESTART_COUNT."""
        env = os.environ if env is None else env
        stop, events = env.get(STOP_FILE_ENV), env.get(EVENTS_FILE_ENV)
        restarts = env.get("SLURM_RESTART_COUNT", "0") or "0"
        if not restarts.isdigit():
            raise ValueError(f"SLURM_RESTART_COUNT must be a non-negative integer, got {restarts!r}")
        return cls(
            stop_file=Path(stop) if stop else None,
            events_file=Path(events) if events else None,
            job_id=env.get("SLURM_JOB_ID") or None,
            restart_count=int(restarts),
        )


class PreemptionHandler:
    """Turns signals and a stop file into one stop decision that all ranks share.

    Use as a context manager (or call ``close``) so that the previous signal handlers come back.
    Must be created in the main thread (Python installs signal handlers only there).
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
        stop_file: Path | None = None,
        check_every: int = 1,
        file_every_s: float = 0.0,
        align: int = 1,
    ) -> None:
        if check_every < 1 or align < 1:
            raise ValueError(f"check_every and align must be >= 1, got {check_every} and {align}")
        self.stop_file = stop_file
        self.check_every = check_every
        self.file_every_s = file_every_s
        self.align = align
        self._signal: int | None = None  # set from the signal handler: the only thing it does
        self._reason: str | None = None
        self._agreed = False  # every rank knows a stop was requested (sticky)
        self._stop_step: int | None = None
        self._file_seen = False
        self._file_checked = -float("inf")  # time.monotonic() of the last stat of the stop file
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, possibly inside a collective or a save:
        # only record, never act here.
        self._signal = signum

    @property
    def requested_locally(self) -> bool:
        """True once this process got a signal or saw the stop file (other ranks may not know yet)."""
        return self._signal is not None or (self.stop_file is not None and self.stop_file.exists())

    @property
    def reason(self) -> str | None:
        """Why the ranks decided to stop ('signal SIGUSR2', 'stop file ...', 'another rank'); None before."""
        return self._reason

    @property
    def stop_step(self) -> int | None:
        """The step at which all ranks decided to stop, or None."""
        return self._stop_step

    def should_stop(self, step: int) -> bool:
        """True when all ranks must stop after ``step``. Call it with the same step on every rank.

        Every ``check_every``-th step talks to the other ranks (one all_reduce of one element) until
        they agree on a stop; the stop is then at the first multiple of ``align``. Once True, stays True.
        """
        if self._stop_step is not None:
            return True
        if not self._agreed and step % self.check_every == 0:
            self.poll()
        if self._agreed and step % self.align == 0:
            self._stop_step = step
            return True
        return False

    def poll(self) -> bool:
        """Whether any rank has been asked to stop (collective: every rank calls it at the same point).

        For loops inside a step's work (evaluation): True means abandon it; the next ``should_stop``
        on an aligned step then stops. Sticky; no communication once True.
        """
        if not self._agreed:
            local = self._local_reason()
            if self._agree(local is not None):
                self._agreed = True
                self._reason = local or "another rank"
        return self._agreed

    def close(self) -> None:
        """Restore the signal handlers that were installed before this one."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _local_reason(self) -> str | None:
        if self._signal is not None:
            return f"signal {signal.Signals(self._signal).name}"
        if self.stop_file is not None and not self._file_seen:
            now = time.monotonic()
            if now - self._file_checked >= self.file_every_s:
                self._file_checked = now
                self._file_seen = self.stop_file.exists()  # one stat on the shared FS
        if self._file_seen:
            return f"stop file {self.stop_file}"
        return None

    def _agree(self, local: bool) -> bool:
        return dist.any_rank(local)  # on the backend's device: NCCL reduces only GPU tensors


# ---------------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Event:
    """One line of the event log: ``<unix time> <name> key=value ...``."""

    time: float
    name: str
    fields: dict[str, str] = field(default_factory=dict)


class EventLog:
    """Append-only log of a job's lifecycle on the shared filesystem, written by the batch shell and rank 0.

    Shell events (cluster/launch.sh): ``start`` (each time the job starts, restart=N), ``signal`` (Slurm's
    warning arrived), ``end`` (rc=N), ``requeue``. Trainer events (rank 0): ``checkpoint`` (step=N, once a
    checkpoint is committed), ``stop`` (step=N, checkpoint saved on a stop request), ``resumed`` (step=N,
    the first step completed after loading a checkpoint). The trainer reaches it through its RunDir, which
    records on rank 0 only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, name: str, **fields: object) -> None:
        """Append one event stamped with the current wall-clock time."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"event name must be one word, got {name!r}")
        parts = [f"{time.time():.6f}", name] + [f"{k}={_one_word(k, v)}" for k, v in fields.items()]
        # one short write with O_APPEND: lines from the shell and from rank 0 do not interleave
        with open(self.path, "a") as f:
            f.write(" ".join(parts) + "\n")

    def read(self) -> list[Event]:
        """All events in file order; [] when there is no file yet. A line that does not parse (a writer
        killed mid-line) is skipped with a warning naming file and line: the log is bookkeeping, and a
        resume must not fail over it."""
        if not self.path.exists():
            return []
        events = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(_parse_event(self.path, n, line))
            except ValueError as exc:
                log.warning("skipping an event: %s", exc)
        return events


def _one_word(key: str, value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"event field {key} must be one non-empty word, got {text!r}")
    return text


def _parse_event(path: Path, lineno: int, line: str) -> Event:
    parts = line.split()
    try:
        when = float(parts[0])
        name = parts[1]
    except (ValueError, IndexError):
        raise ValueError(
            f"{path}:{lineno}: expected '<unix time> <event> key=value...', got {line!r}"
        ) from None
    fields = dict(item.split("=", 1) for item in parts[2:] if "=" in item)
    return Event(when, name, fields)


@dataclass(frozen=True)
class Downtime:
    """Wall-clock time an interruption cost, from when training was last safe to when it resumed.

    ``cause`` is 'signal' (a warning signal: measured from its arrival, no work lost) or 'failure'
    (the job restarted without one, e.g. a dead node: measured from the last committed checkpoint,
    so it includes the work that has to be redone).
    """

    cause: str
    begin: float
    end: float
    restart: int

    @property
    def seconds(self) -> float:
        return self.end - self.begin


def downtimes(events: Sequence[Event]) -> list[Downtime]:
    """One Downtime per interruption that training has resumed from, in order.

    A signal counts as a graceful stop only when the trainer's ``stop`` (its stop checkpoint) followed
    it. Slurm also SIGTERMs the batch shell of a job whose node died, and that shell logs the signal;
    the ranks cannot save then, so the interruption is a failure, counted from the last safe point.
    """
    out: list[Downtime] = []
    begin: float | None = None
    cause = ""
    last_safe: float | None = None  # last committed checkpoint, or the first job start if none yet
    signal_at: float | None = None  # first signal of the job run that is going on
    stopped = False  # the trainer saved on a stop request after that signal
    restart = 0  # of the job run that is going on (from the shell's 'start' events)
    for e in sorted(events, key=lambda e: e.time):
        if e.name in ("checkpoint", "stop"):
            last_safe = e.time
            stopped = stopped or (e.name == "stop" and signal_at is not None)
        elif e.name == "signal" and signal_at is None:
            signal_at = e.time
        elif e.name == "start":
            restart = int(e.fields.get("restart", "0"))
            if last_safe is None:
                last_safe = e.time
            elif restart > 0 and begin is None:
                if stopped:
                    begin, cause = signal_at, "signal"
                else:
                    begin, cause = last_safe, "failure"
            signal_at, stopped = None, False
        elif e.name == "resumed" and begin is not None:
            out.append(Downtime(cause, begin, e.time, restart))
            begin = None
    return out
