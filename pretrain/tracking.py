"""MLflow tracking that never stops or stalls training.

Only rank 0 gets an `MlflowTracker`; every other rank gets a `NullTracker` with the same methods
(chosen in `build_tracker`, from the rank information, so no caller checks ranks). All MLflow calls run
on one background thread fed by a bounded queue: a slow or unreachable server costs the training loop
nothing; when the queue is full the oldest records are dropped, and the user is told once.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pretrain.config import TrackingConfig
from pretrain.dist import RankInfo

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


class Tracker(Protocol):
    """What the trainer calls; MlflowTracker on rank 0, NullTracker elsewhere."""

    run_id: str | None

    def start(
        self, *, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> None: ...
    def wait_started(self, timeout_s: float) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What ranks other than 0 (and runs with tracking disabled) use."""

    run_id: str | None = None
    uri: str | None = None

    def start(
        self, *, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> None:
        pass

    def wait_started(self, timeout_s: float) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def local_store_uri(run_dir: Path) -> str:
    """The default store: an sqlite file inside the run folder, so a bare machine needs no server."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def resolve_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(run_dir)


class MlflowTracker:
    """Rank 0's tracker. `start` creates or resumes the run in the background; `run_id` is set once known."""

    def __init__(self, uri: str, experiment: str, artifact_dir: Path, *, timeout_s: float, queue_size: int):
        # A dead server otherwise costs ~250 s of MLflow's own retries per call (measured).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
        self.uri = uri
        self.run_id: str | None = None
        self._experiment = experiment
        self._artifact_dir = artifact_dir
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._failed = False
        self._dropped = 0
        self._started = threading.Event()  # set once the run exists, or creating it failed
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._client = None
        self._thread.start()

    # ----------------------------------------------------------------- called by the training loop

    def start(
        self, *, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> None:
        self._put(lambda: self._start(run_id, run_name, params, tags))

    def wait_started(self, timeout_s: float) -> None:
        """Wait (bounded) until the run exists, so that the first checkpoint already carries its id."""
        if not self._started.wait(timeout_s):
            log.warning(
                "MLflow: no run after %.0f s; training goes on, tracking continues when it can", timeout_s
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self._put(lambda: self._log_batch(metrics, step, stamp))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put(lambda: [self._client.set_tag(self.run_id, k, v) for k, v in tags.items()])

    def close(self, status: str = "FINISHED", wait_s: float = 30.0) -> None:
        """Flush what is queued (bounded wait), mark the run ended, stop the thread."""
        self._put(lambda: self.run_id and self._client.set_terminated(self.run_id, status))
        self._put(None)
        self._thread.join(timeout=wait_s)
        if self._thread.is_alive():
            log.warning(
                "MLflow: %d records not flushed after %.0f s; giving up on them", self._queue.qsize(), wait_s
            )

    # ----------------------------------------------------------------- background thread

    def _put(self, job: Callable[[], Any] | None) -> None:
        while True:
            try:
                self._queue.put_nowait(job)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest record, never block the caller
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("MLflow is slow or down: dropping the oldest queued records")
                except queue.Empty:
                    pass

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._failed:
                continue
            try:
                job()
            except Exception as exc:  # any failure of the tracking server must not reach training
                self._failed = True
                self._started.set()
                log.warning(
                    "MLflow at %s failed (%s: %s); training goes on without tracking",
                    self.uri,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )

    def _start(self, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:  # a resumed job continues its run; params were logged the first time
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            for key, value in tags.items():
                self._client.set_tag(run_id, key, value)
            log.info("MLflow: resumed run %s at %s", run_id, self.uri)
            self._started.set()
            return
        exp = self._client.get_experiment_by_name(self._experiment)
        if exp is None:
            location = self._artifact_dir.resolve().as_uri() if self.uri.startswith("sqlite:") else None
            exp_id = self._client.create_experiment(self._experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self._client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])
        self._started.set()
        log.info("MLflow: run %s at %s", self.run_id, self.uri)

    def _log_batch(self, metrics: dict[str, float], step: int, stamp: int) -> None:
        from mlflow.entities import Metric

        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        )


def build_tracker(cfg: TrackingConfig, info: RankInfo, run_dir: Path) -> MlflowTracker | NullTracker:
    """Rank 0 with tracking enabled talks to MLflow; everyone else gets the no-op tracker."""
    if not (cfg.enabled and info.is_main):
        return NullTracker()
    return MlflowTracker(
        resolve_uri(cfg, run_dir),
        cfg.experiment,
        run_dir / "mlartifacts",
        timeout_s=cfg.timeout_s,
        queue_size=cfg.queue_size,
    )


def git_commit() -> str:
    """The commit of the code that runs (a tag of every run), or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
