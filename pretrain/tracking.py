"""MLflow tracking that survives outages, never stalls training, and tells the truth about the run.

Only rank 0 gets an `MlflowTracker`; every other rank gets a `NullTracker` with the same methods
(chosen in `build_tracker`, from the rank information, so no caller checks ranks).

Outage-proof: every record (run start, params, tags, metrics, artifacts, datasets, the final status)
is first appended to a bounded spool on disk in the run folder (`pretrain.spool`). One background
thread delivers the spool in order with MLflow's `log_batch`, retrying with exponential backoff while
the server is unreachable (MLflow's own per-request retries are switched off: they stall a call for
~250 s). Training only appends to a local file. A requeued job opens the same spool and first delivers
what the last job left; so does `python -m pretrain.tracking deliver <run folder>`. Run creation is
retried too, and made idempotent by a run key tag, so an unanswered create never makes two runs.

The truth: the run is FINISHED on success, FAILED on an exception, KILLED when stopped for requeue
(exit status 3) or interrupted; it is RUNNING again when a job resumes it. A job killed outright
(SIGKILL, node loss) cannot say anything: its run stays RUNNING until the next job of the run resumes
it (and then ends it truthfully). A run that is never resumed stays RUNNING; end it with
`python -m pretrain.tracking deliver <run folder> --status KILLED`.

Store: one per output folder (`sqlite:///<run.output_dir>/mlflow.db`, artifacts in
`<run.output_dir>/mlartifacts`), so pre-training and fine-tuning runs sit side by side in one UI,
unless `tracking.uri` or $MLFLOW_TRACKING_URI names another. Metric names are namespaced for MLflow
only (`MLFLOW_METRIC_NAMES`); metrics.jsonl keeps the trainer's plain keys.

Secrets: a tracking URI with a user name or password is refused at config load
(`TrackingConfig.credentials_problem`); credentials come from MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, which MLflow reads itself. Every param and tag value, and every URI this
module logs, also has the user-info part of any URI in it replaced (`redact_userinfo`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pretrain.config import TrackingConfig, redact_userinfo
from pretrain.dist import RankInfo
from pretrain.preemption import EXIT_REQUEUE
from pretrain.sender import RUN_STATE, RunState, Sender, first_line, metrics_record, now_ms
from pretrain.spool import Spool

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
SPOOL_DIR = "mlflow-spool"

# The trainer's metric keys (also metrics.jsonl's) -> MLflow names, in namespaces. Keys with a '/'
# (eval/top1, preemption/lost_s, system/...) are namespaced already and go as they are.
MLFLOW_METRIC_NAMES = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "samples_seen": "train/samples_seen",
    "images_per_s": "perf/images_per_s",
    "images_per_s_per_device": "perf/images_per_s_per_device",
    "step_time_s": "perf/step_time_s",
    "data_wait_fraction": "perf/data_wait_fraction",
    "tflops_per_device": "perf/tflops_per_device",
    "mfu": "perf/mfu",
    "memory_gb": "perf/memory_gb",
    "memory_rss_gb": "perf/memory_rss_gb",
    "memory_allocated_peak_gb": "perf/memory_allocated_peak_gb",
    "memory_reserved_peak_gb": "perf/memory_reserved_peak_gb",
    "memory_device_used_gb": "perf/memory_device_used_gb",
    "goodput": "perf/goodput",
    "checkpoint_s": "perf/checkpoint_s",
    "checkpoint_blocked_s": "perf/checkpoint_blocked_s",
    "preemptions": "preemption/count",
}


def mlflow_metric_name(key: str) -> str:
    """The MLflow name of one of the trainer's metric keys."""
    return MLFLOW_METRIC_NAMES.get(key, key)


def run_status(outcome: int | BaseException | None) -> str | None:
    """The MLflow status of a job that ended with `outcome`: fit()'s exit status, or what it raised.

    0: FINISHED; EXIT_REQUEUE (stopped to be requeued) or an interrupt: KILLED; an exception or another
    status: FAILED; None (the job never said): no status, the run is left as it is.
    """
    if outcome is None:
        return None
    if isinstance(outcome, KeyboardInterrupt) or outcome == EXIT_REQUEUE:
        return "KILLED"
    if outcome == 0 and not isinstance(outcome, BaseException):
        return "FINISHED"
    return "FAILED"


class Tracker(Protocol):
    """What the trainer calls; MlflowTracker on rank 0, NullTracker elsewhere."""

    @property
    def run_id(self) -> str | None: ...
    def start(
        self,
        *,
        run_id: str | None,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        datasets: Mapping[str, str | None] = ...,
    ) -> None: ...
    def wait_started(self, timeout_s: float) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def lineage(self) -> dict[str, str | None]: ...
    def close(self, status: str | None = None) -> None: ...


class NullTracker:
    """What ranks other than 0 (and runs with tracking disabled) use."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, *, run_id, run_name, params, tags, datasets=None) -> None:
        pass

    def wait_started(self, timeout_s: float) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def lineage(self) -> dict[str, str | None]:
        return {}

    def close(self, status: str | None = None) -> None:
        pass


# ==================================================================================================== where


def default_store_uri(output_dir: Path) -> str:
    """One sqlite store per output folder: every run under it (pre-training, fine-tuning) in one UI."""
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def resolve_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri(output_dir)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a new experiment in an sqlite store: `mlartifacts` next to the .db file. A server
    decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()


def _sqlite_is_new(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()


# ==================================================================================================== what


def git_commit() -> str:
    """The commit of the code that runs (a tag of every run), or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_tags(info: RankInfo, *, model: str, run_dir: Path, resumed_step: int | None) -> dict[str, str]:
    """The tags of a job: where and how it runs (MlflowTracker.start adds MLflow's context tags)."""
    commit = git_commit()
    tags = {
        "world_size": str(info.world_size),
        "nodes": str(info.num_nodes),
        "launcher": info.launcher,
        "host": os.uname().nodename,
        "git_commit": commit,
        "model": model,
        "run_dir": str(run_dir),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if resumed_step is not None:
        tags["resumed_from_step"] = str(resumed_step)
    return tags


def dataset_record(path: str | None, context: str) -> dict | None:
    """A dataset (shards + manifest) as MLflow's dataset input: name, digest = the loader's dataset
    fingerprint (shard names, counts, checksums, blocklist), sample/class/shard counts as its profile."""
    if not path:
        return None
    from data_pipeline.manifest import dataset_fingerprint, load_blocklist, load_manifest

    try:
        manifest, _, root = load_manifest(path)
        blocked = load_blocklist(path)
    except (OSError, ValueError) as exc:  # the loader reports it; tracking only loses the lineage
        log.warning("MLflow: no dataset input for %s: %s", path, exc)
        return None
    root = root.resolve()
    profile = {
        "num_samples": manifest.num_samples - len(blocked),
        "num_classes": manifest.num_classes,
        "num_shards": len(manifest.shards),
        "blocklisted": len(blocked),
        "label_kind": manifest.label_kind,
    }
    label = "long" if manifest.label_kind == "single" else "string"
    schema = {
        "mlflow_colspec": [
            {"type": "binary", "name": manifest.image_ext, "required": True},
            {"type": label, "name": manifest.label_ext, "required": True},
        ]
    }
    return {
        "name": f"{root.parent.name}/{root.name}",
        "digest": dataset_fingerprint(manifest, blocked),
        "source_type": "local",
        "source": json.dumps({"uri": root.as_uri()}),
        "schema": json.dumps(schema),
        "profile": json.dumps(profile),
        "context": context,
    }


def init_lineage_tags(init_path: str) -> dict[str, str]:
    """Tags of a fine-tune naming what it starts from, read from the export's sidecar (OUT.json): the
    pre-training run (its card's `training_run`), the source checkpoint and its step."""
    sidecar_path = Path(init_path).with_suffix(".json")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        log.warning(
            "%s: no readable sidecar; the fine-tune's MLflow run cannot name its source", sidecar_path
        )
        return {}
    tags = {"init_source_step": str(sidecar.get("step", ""))}
    if sidecar.get("source"):
        tags["init_source_checkpoint"] = str(sidecar["source"])
    source = sidecar.get("training_run") or {}
    if source.get("mlflow_run_id"):
        tags["init_source_run_id"] = source["mlflow_run_id"]
        link = (
            f"[{source['mlflow_run_id']}](#/experiments/{source['mlflow_experiment_id']}/runs/{source['mlflow_run_id']})"
            if source.get("mlflow_experiment_id")
            else f"`{source['mlflow_run_id']}`"
        )
        tags["mlflow.note.content"] = (
            f"Fine-tuned from MLflow run {link} (step {sidecar.get('step')}, {init_path})."
        )
    return tags


def _clean(value: Any, limit: int = MAX_PARAM_LEN) -> str:
    return redact_userinfo(str(value))[:limit]


# ==================================================================================================== sampler


class SystemSampler:
    """Rank 0's host as MLflow system metrics (system/cpu_utilization_percentage, memory, disk, network,
    gpu_* where NVML is present), sampled with MLflow's own monitors but delivered through the spool."""

    def __init__(self, every_s: float, emit: Callable[[dict[str, float]], None]):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        with contextlib.suppress(Exception):  # no nvidia-ml-py or no GPU: CPU, memory, disk, network
            self.monitors.append(GPUMonitor())
        self.every_s, self._emit = every_s, emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # psutil keeps CPU times per thread and the first percentage covers no interval: discard it here.
        for monitor in self.monitors:
            monitor.collect_metrics()
            monitor.clear_metrics()
        while not self._stop.wait(self.every_s):
            metrics: dict[str, float] = {}
            try:
                for monitor in self.monitors:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
            except Exception as exc:  # a monitor that breaks costs its metrics, nothing else
                log.warning("system metrics: %s; sampling stopped", first_line(exc))
                return
            self._emit({f"system/{k}": v for k, v in metrics.items()})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ==================================================================================================== tracker


class MlflowTracker:
    """Rank 0's tracker: appends to the spool and leaves the talking to the sender (module docstring)."""

    def __init__(
        self,
        uri: str,
        cfg: TrackingConfig,
        spool_dir: Path,
        *,
        client_factory: Callable[[], Any] | None = None,
    ):
        # A dead server otherwise costs ~250 s of retries per call (platform notes); the sender retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(cfg.timeout_s))))
        self.uri, self.cfg = uri, cfg
        self._new_sqlite = _sqlite_is_new(uri)
        _set_aside_other_store(spool_dir, uri)
        self.spool = Spool(spool_dir, int(cfg.spool_mb * 2**20))
        self.state = RunState(spool_dir, uri, cfg.experiment)
        if client_factory is None:
            from mlflow.tracking import MlflowClient

            client_factory = lambda: MlflowClient(tracking_uri=uri)  # noqa: E731
        self._step = 0
        self.sender = Sender(
            self.spool,
            self.state,
            client_factory,
            retry_max_s=cfg.retry_max_s,
            current_step=lambda: self._step,
        )
        self.sender.start()
        self._sampler: SystemSampler | None = None
        self._started = False
        self._lost = 0  # records that could not even be spooled (disk full)

    @property
    def run_id(self) -> str | None:
        return self.state.run_id

    def start(
        self,
        *,
        run_id: str | None,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        datasets: Mapping[str, str | None] | None = None,
    ) -> None:
        """Create the run, or continue `run_id` (a resumed job), in the background."""
        # MLflow's own context tags (mlflow.user, mlflow.source.name/type, mlflow.source.git.*), which the
        # MLflow UI and users of Lightning's or composer's MLflow loggers expect; ours win on a clash.
        from mlflow.tracking.context.registry import resolve_tags

        tags = {**resolve_tags({}), **tags}
        if self.state.open:
            log.warning(
                "MLflow: the last job of this run ended without ending its MLflow run (killed outright?); "
                "this job continues it"
            )
        if self.state.run_id is None and run_id is not None:
            self.state.run_id = run_id  # from the checkpoint: known at once, even with the server down
        self.state.open = True
        self.state.save()
        self._started = True
        self._append(
            {
                "kind": "start",
                "t": now_ms(),
                "run_name": run_name,
                "experiment": self.cfg.experiment,
                "artifact_location": artifact_location(self.uri),
                "tags": {k: _clean(v, 5000) for k, v in tags.items()},
                "params": {k: _clean(v) for k, v in params.items()},
                "datasets": [d for c, p in (datasets or {}).items() if (d := dataset_record(p, c))],
            }
        )
        if self.cfg.system_metrics_every_s > 0 and self._sampler is None:
            try:
                self._sampler = SystemSampler(self.cfg.system_metrics_every_s, self._log_system)
            except ImportError as exc:  # psutil missing
                log.warning("MLflow system metrics off: %s", first_line(exc))

    def wait_started(self, timeout_s: float) -> None:
        """Wait (bounded) until the run exists or the store is found unreachable, so that the first
        checkpoint already carries the run id. A new sqlite store first creates its tables."""
        if self.run_id is not None:
            return
        t0 = time.time()
        what = "create its tables and the run" if self._new_sqlite else "create the run"
        log.info("MLflow: waiting up to %.0f s for %s to %s", timeout_s, redact_userinfo(self.uri), what)
        if not self.sender.contact.wait(timeout_s):
            log.warning(
                "MLflow: no run after %.0f s at %s (still %s); training goes on, a later checkpoint "
                "gets the run id",
                timeout_s,
                redact_userinfo(self.uri),
                self.sender.phase,
            )
        elif self.run_id is not None:
            log.info("MLflow: run ready after %.1f s", time.time() - t0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._step = step
        self._append(metrics_record({mlflow_metric_name(k): v for k, v in metrics.items()}, step))

    def _log_system(self, metrics: dict[str, float]) -> None:
        self._append(metrics_record(metrics, self._step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._append(
            {"kind": "artifact", "t": now_ms(), "path": str(Path(path).resolve()), "dir": artifact_path}
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append({"kind": "tags", "t": now_ms(), "tags": {k: _clean(v, 5000) for k, v in tags.items()}})

    def lineage(self) -> dict[str, str | None]:
        """What a model card records about the run that trained the weights."""
        return {
            "mlflow_run_id": self.run_id,
            "mlflow_experiment": self.cfg.experiment,
            "mlflow_experiment_id": self.state.experiment_id,
            "mlflow_tracking_uri": redact_userinfo(self.uri),
        }

    def close(self, status: str | None = None) -> None:
        """End the run with `status` (None: leave it), deliver what is spooled (bounded wait), stop."""
        if self._sampler is not None:
            self._sampler.close()
        if self._started and status is not None:
            self._append({"kind": "status", "t": now_ms(), "status": status})
        self.state.open = False
        self.state.save()
        if not self.sender.drain(self.cfg.flush_timeout_s):
            log.warning(
                "MLflow: records not delivered after %.0f s stay in %s; the next job of this run delivers "
                "them, or `python -m pretrain.tracking deliver %s`",
                self.cfg.flush_timeout_s,
                self.spool.root,
                self.spool.root.parent,
            )
        self.spool.close()

    def _append(self, record: dict) -> None:
        try:
            self.spool.append(record)
        except OSError as exc:  # disk full: tracking loses the record, training goes on
            self._lost += 1
            if self._lost == 1:
                log.warning("MLflow spool %s: %s; records are lost until it can write", self.spool.root, exc)


def _set_aside_other_store(spool_dir: Path, uri: str) -> None:
    """A spool written for another tracking URI (the user changed it) is kept aside, not sent here."""
    saved = RunState.saved_uri(spool_dir)
    if saved is not None and saved != redact_userinfo(uri):
        aside = spool_dir.with_name(f"{spool_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        spool_dir.rename(aside)
        log.warning(
            "MLflow: the spool of this run was for %s, now %s: kept in %s (deliver it with "
            "`python -m pretrain.tracking deliver %s --spool %s`)",
            saved,
            redact_userinfo(uri),
            aside,
            spool_dir.parent,
            aside.name,
        )


def build_tracker(cfg: TrackingConfig, info: RankInfo, run_dir: Path) -> MlflowTracker | NullTracker:
    """Rank 0 with tracking enabled talks to MLflow; everyone else gets the no-op tracker."""
    if not (cfg.enabled and info.is_main):
        return NullTracker()
    return MlflowTracker(resolve_uri(cfg, run_dir.parent), cfg, run_dir / SPOOL_DIR)


# ==================================================================================================== CLI


def deliver(
    run_dir: Path,
    *,
    spool: str = SPOOL_DIR,
    status: str | None = None,
    timeout_s: float = 300,
    client_factory: Callable[[], Any] | None = None,
) -> bool:
    """Deliver a run folder's spool to the store it was written for; optionally end the run with `status`."""
    root = run_dir / spool
    uri = RunState.saved_uri(root)
    if uri is None:
        raise FileNotFoundError(f"{root}: no MLflow spool ({RUN_STATE} missing)")
    if client_factory is None:
        from mlflow.tracking import MlflowClient

        client_factory = lambda: MlflowClient(tracking_uri=uri)  # noqa: E731
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    queue = Spool(root, 2**62)
    state = RunState(root, uri, json.loads((root / RUN_STATE).read_text()).get("experiment", "coatnet"))
    if status is not None:
        queue.append({"kind": "status", "t": now_ms(), "status": status})
        state.open = False
        state.save()
    sender = Sender(queue, state, client_factory, retry_max_s=5.0)
    sender.start()
    done = sender.drain(timeout_s)
    queue.close()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.tracking",
        description="Deliver what a run folder's MLflow spool still holds.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("deliver", help="deliver the spool of RUN_DIR to its tracking store")
    cmd.add_argument("run_dir", type=Path)
    cmd.add_argument("--status", choices=["FINISHED", "FAILED", "KILLED"], help="also end the run so")
    cmd.add_argument(
        "--spool", default=SPOOL_DIR, help=f"the spool folder inside RUN_DIR (default {SPOOL_DIR})"
    )
    cmd.add_argument("--timeout", type=float, default=300.0, help="seconds to keep trying (default 300)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
    try:
        done = deliver(args.run_dir, spool=args.spool, status=args.status, timeout_s=args.timeout)
    except FileNotFoundError as exc:
        print(f"python -m pretrain.tracking: {exc}", file=sys.stderr)
        return 2
    print("delivered" if done else "not everything delivered; run it again when the server answers")
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
