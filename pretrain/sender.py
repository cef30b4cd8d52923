"""The one thread that talks to MLflow: it delivers a run's spool (`pretrain.spool`) in order.

`Sender` reads records from the spool's cursor, groups consecutive metrics and tags into MLflow's
`log_batch` (within its limits), and acknowledges what MLflow accepted. A failure that repeating can
cure (no connection, a 5xx answer, a locked sqlite file) pauses the sender with exponential backoff
(1 s doubling up to `retry_max_s`) and the same records are tried again; one that cannot (MLflow's
INVALID_PARAMETER_VALUE and the like, e.g. a param whose value changed) skips the records MLflow
refuses on their own, with a warning. A run start is never skipped: until it succeeds, everything
after it waits.

`RunState` (run.json in the spool) names the run the records go to. Run creation is find-or-create by
a run key tag, so a create whose answer was lost in an outage finds its run instead of making another.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pretrain.config import redact_userinfo
from pretrain.spool import Position, Spool, write_json_atomic

log = logging.getLogger(__name__)

RUN_STATE = "run.json"
RUN_KEY_TAG = "coatnet.run_key"  # find-or-create: a create whose answer was lost is found, not repeated
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3 UI: model training view
# Errors that repeating the same request cannot cure; anything else (no connection, 5xx, a locked
# sqlite file) is retried.
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "BAD_REQUEST",
}
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits
READ_RECORDS = 500
IDLE_POLL_S = 0.5


class RunState:
    """run.json in the spool: which MLflow run (in which store) the spooled records go to.

    Survives jobs: a requeued job continues this run even when its checkpoint predates the run id.
    """

    def __init__(self, root: Path, uri: str, experiment: str):
        self.path = root / RUN_STATE
        self._lock = threading.Lock()
        saved = self._read()
        self.uri = uri
        self.experiment = experiment
        self.run_key: str = saved.get("run_key") or uuid.uuid4().hex
        self.run_id: str | None = saved.get("run_id")
        self.experiment_id: str | None = saved.get("experiment_id")
        self.open: bool = bool(saved.get("open"))
        self.save()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def saved_uri(root: Path) -> str | None:
        try:
            return json.loads((root / RUN_STATE).read_text()).get("uri")
        except (OSError, ValueError):
            return None

    def save(self) -> None:
        with self._lock:
            write_json_atomic(
                self.path,
                {
                    "uri": redact_userinfo(self.uri),
                    "experiment": self.experiment,
                    "run_key": self.run_key,
                    "run_id": self.run_id,
                    "experiment_id": self.experiment_id,
                    "open": self.open,
                },
            )


# ==================================================================================================== sender


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact_userinfo(f"{type(exc).__name__}: {text[0][:200] if text else ''}")


def _is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


class _Transient(Exception):
    """A delivery failed in a way worth retrying (wraps the cause)."""


class Sender:
    """The one thread that talks to MLflow: delivers the spool in order, retries with backoff."""

    def __init__(
        self,
        spool: Spool,
        state: RunState,
        client_factory: Callable[[], Any],
        *,
        retry_max_s: float,
        current_step: Callable[[], int] = lambda: 0,
    ):
        self.spool, self.state, self._client_factory = spool, state, client_factory
        self.retry_max_s = retry_max_s
        self._current_step = current_step
        self._client = None
        self.contact = threading.Event()  # the run exists, or an attempt to reach the store failed
        self.phase = "opening the store"
        self.delivered = 0
        self.rejected = 0
        self._down_since: float | None = None
        self._reported_drops = spool.dropped
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._flush = threading.Event()
        self._flushed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drain(self, timeout_s: float) -> bool:
        """Deliver everything spooled so far, waiting at most `timeout_s`, then stop. True if all went."""
        self._hurry.set()
        self._flush.set()
        self._wake.set()
        done = self._flushed.wait(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        return done

    # ----------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            batch = self.spool.read(READ_RECORDS)
            self._report_drops()
            if not batch:
                if self._flush.is_set():
                    self._flushed.set()
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()
                continue
            try:
                self._deliver(batch)
            except _Transient as exc:
                self._went_down(exc.__cause__ or exc)
                pause = min(backoff, self.retry_max_s, 1.0 if self._hurry.is_set() else float("inf"))
                backoff = min(2 * backoff, self.retry_max_s)
                self._wake.wait(pause)
                self._wake.clear()
                continue
            except Exception:  # a bug here must not take training down: log it, keep the records
                log.exception("MLflow: the sender failed; the records stay in %s", self.spool.root)
                self._wake.wait(self.retry_max_s)
                continue
            backoff = 1.0

    def _deliver(self, batch: list[tuple[Position, dict]]) -> None:
        i = 0
        while i < len(batch):
            group = self._group(batch, i)
            records = [rec for _, rec in group]
            try:
                self._send(records)
            except _Transient:
                raise
            except Exception as exc:
                if not _is_permanent(exc):
                    raise _Transient() from exc
                self._send_one_by_one(records)
            self.spool.ack(group[-1][0])
            self.delivered += len(group)
            i += len(group)
            self._came_back()

    def _send_one_by_one(self, records: list[dict]) -> None:
        """A batch MLflow refused: send its records one at a time and skip (with a warning) only those
        that it refuses on their own, e.g. a param whose value changed."""
        for rec in records:
            try:
                self._send([rec])
            except _Transient:
                raise
            except Exception as exc:
                if not _is_permanent(exc):
                    raise _Transient() from exc
                self.rejected += 1
                if self.rejected <= 5 or self.rejected % 1000 == 0:  # a deleted run refuses everything
                    log.warning(
                        "MLflow refused a %s record, skipped (%d so far): %s",
                        rec.get("kind"),
                        self.rejected,
                        first_line(exc),
                    )

    @staticmethod
    def _group(batch: list[tuple[Position, dict]], i: int) -> list[tuple[Position, dict]]:
        """Consecutive metrics/tags records that fit into one log_batch; any other record alone."""
        if batch[i][1].get("kind") not in ("metrics", "tags"):
            return [batch[i]]
        counts = {"metrics": 0, "tags": 0}
        j = i
        while j < len(batch) and batch[j][1].get("kind") in counts:
            rec = batch[j][1]
            size = len(rec.get("m", {})) if rec["kind"] == "metrics" else len(rec.get("tags", {}))
            if j > i and counts[rec["kind"]] + size > BATCH_LIMITS[rec["kind"]]:
                break
            counts[rec["kind"]] += size
            j += 1
        return batch[i:j]

    # ----------------------------------------------------------------------------------- requests

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _send(self, records: list[dict]) -> None:
        kind = records[0].get("kind")
        try:
            if kind == "start":
                self._start_run(records[0])
                return
            if self.state.run_id is None:
                log.warning("MLflow: a %s record precedes any run start; skipped", kind)
                return
            if kind in ("metrics", "tags"):
                self._log_batch(records)
            elif kind == "artifact":
                self._log_artifact(records[0])
            elif kind == "status":
                self.client.set_terminated(self.state.run_id, records[0]["status"], end_time=records[0]["t"])
                log.info("MLflow: run %s ended %s", self.state.run_id, records[0]["status"])
            else:
                log.warning("MLflow: unknown record kind %r skipped", kind)
        except _Transient:
            raise
        except Exception as exc:
            if kind == "start" or not _is_permanent(exc):
                raise _Transient() from exc  # a run that cannot start yet waits, with all that follows
            raise

    def _log_batch(self, records: list[dict]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics, tags = [], []
        for rec in records:
            if rec["kind"] == "metrics":
                metrics += [Metric(k, float(v), rec["t"], rec["step"]) for k, v in rec["m"].items()]
            else:
                tags += [RunTag(k, v) for k, v in rec["tags"].items()]
        self.client.log_batch(self.state.run_id, metrics=metrics, tags=tags, synchronous=True)

    def _log_artifact(self, rec: dict) -> None:
        if not Path(rec["path"]).exists():
            log.warning("MLflow: artifact %s is gone; skipped", rec["path"])
            return
        self.client.log_artifact(self.state.run_id, rec["path"], rec.get("dir"))

    def _experiment_id(self, name: str, location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        self.phase = "looking up the experiment"
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            self.phase = "creating the experiment"
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except MlflowException as exc:  # another run of this store created it just now
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
        if not any(k in exp.tags for k in EXPERIMENT_KIND):
            for key, value in EXPERIMENT_KIND.items():
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def _start_run(self, rec: dict) -> None:
        """Create the run (or find the one an earlier, unanswered attempt created), or mark an existing one
        RUNNING again; then params and datasets of a new run, or the new job's tags of an existing one."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        state, client = self.state, self.client
        if state.run_id is not None:
            self.phase = "resuming the run"
            try:
                client.update_run(state.run_id, status="RUNNING")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow: run %s is not in %s; starting a new run", state.run_id, state.uri)
                state.run_id = None
            else:
                tags = [RunTag(k, v) for k, v in rec["tags"].items()]
                for i in range(0, len(tags), BATCH_LIMITS["tags"]):
                    client.log_batch(state.run_id, tags=tags[i : i + BATCH_LIMITS["tags"]], synchronous=True)
                log.info("MLflow: run %s at %s (resumed, RUNNING)", state.run_id, redact_userinfo(state.uri))
                self.contact.set()
                return
        exp_id = self._experiment_id(rec["experiment"], rec.get("artifact_location"))
        self.phase = "creating the run"
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{state.run_key}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {**rec["tags"], RUN_KEY_TAG: state.run_key}
            run_id = client.create_run(
                exp_id, start_time=rec["t"], tags=tags, run_name=rec["run_name"]
            ).info.run_id
        state.run_id, state.experiment_id = run_id, exp_id
        state.save()
        self.contact.set()
        self.phase = "logging params and datasets"
        params = [Param(k, v) for k, v in rec["params"].items()]
        for i in range(0, len(params), BATCH_LIMITS["params"]):
            client.log_batch(run_id, params=params[i : i + BATCH_LIMITS["params"]], synchronous=True)
        if rec.get("datasets"):
            client.log_inputs(run_id, datasets=[_dataset_input(d) for d in rec["datasets"]])
        log.info("MLflow: run %s at %s", run_id, redact_userinfo(state.uri))

    # ----------------------------------------------------------------------------------- reporting

    def _went_down(self, exc: BaseException) -> None:
        self.contact.set()
        if self._down_since is None:
            self._down_since = time.time()
            log.warning(
                "MLflow at %s is unreachable (%s); training goes on, records are kept in %s and "
                "delivered when it answers",
                redact_userinfo(self.state.uri),
                first_line(exc),
                self.spool.root,
            )

    def _came_back(self) -> None:
        if self._down_since is not None:
            log.info(
                "MLflow at %s answers again after %.0f s; delivering the spooled records",
                redact_userinfo(self.state.uri),
                time.time() - self._down_since,
            )
            self._down_since = None

    def _report_drops(self) -> None:
        if self.spool.dropped > self._reported_drops:
            log.warning(
                "MLflow spool %s is full (tracking.spool_mb): %d oldest metric records dropped so far",
                self.spool.root,
                self.spool.dropped,
            )
            self._reported_drops = self.spool.dropped
            self.spool.append(
                metrics_record({"tracking/dropped_records": self.spool.dropped}, self._current_step())
            )


def _dataset_input(d: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d["schema"], d["profile"])
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", d["context"])])


def now_ms() -> int:
    return int(time.time() * 1000)


def metrics_record(metrics: Mapping[str, float], step: int) -> dict:
    return {
        "kind": "metrics",
        "t": now_ms(),
        "step": int(step),
        "m": {k: float(v) for k, v in metrics.items()},
    }
