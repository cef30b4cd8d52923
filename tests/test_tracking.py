"""MLflow tracking: the spool, the sender, statuses, names, secrets and lineage.

The first part runs in this process against a fake MLflow client (a few dicts that can be "down"), so
every delivery rule is checked in milliseconds. The second part trains for real (configs/smoke.yaml)
against a real `mlflow server` on 127.0.0.1 or the default sqlite store, and reads the result back with
MLflow's own client.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from data_pipeline.manifest import Manifest, ShardInfo, save_manifest
from pretrain.config import ConfigError, TrackingConfig, load_config, redact_userinfo
from pretrain.metrics import StepMeter
from pretrain.preemption import EXIT_REQUEUE
from pretrain.sender import RUN_KEY_TAG
from pretrain.spool import Spool
from pretrain.tracking import (
    MLFLOW_METRIC_NAMES,
    MlflowTracker,
    dataset_record,
    default_store_uri,
    init_lineage_tags,
    mlflow_metric_name,
    run_status,
)
from tests.helpers.launch import SMOKE

# ================================================================================================ a fake MLflow


class FakeMlflow:
    """The part of MlflowClient the sender uses, kept in dicts. `down` makes every call fail as an
    unreachable server does; `lose_create_answer` makes create_run succeed but raise (a lost answer)."""

    def __init__(self) -> None:
        self.down = False
        self.lose_create_answer = False
        self.refuse_tag: str | None = None
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.calls = 0
        self._lock = threading.Lock()

    def _call(self) -> None:
        with self._lock:
            self.calls += 1
        if self.down:
            raise MlflowException("API request to http://127.0.0.1:1/api failed: Connection refused")

    def get_experiment_by_name(self, name):
        self._call()
        exp = self.experiments.get(name)
        return None if exp is None else type("Exp", (), exp)()

    def create_experiment(self, name, artifact_location=None, tags=None):
        self._call()
        self.experiments[name] = {"experiment_id": str(len(self.experiments)), "tags": dict(tags or {})}
        return self.experiments[name]["experiment_id"]

    def set_experiment_tag(self, exp_id, key, value):
        self._call()

    def search_runs(self, exp_ids, filter_string, max_results):
        self._call()
        key = filter_string.split("'")[1]
        info = type("Info", (), {})
        out = []
        for run_id, run in self.runs.items():
            if run["tags"].get(RUN_KEY_TAG) == key:
                info.run_id = run_id
                out.append(type("Run", (), {"info": info})())
        return out

    def create_run(self, exp_id, start_time, tags, run_name):
        self._call()
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"tags": dict(tags), "params": {}, "metrics": [], "status": ["RUNNING"]}
        self.runs[run_id]["datasets"], self.runs[run_id]["artifacts"] = [], []
        if self.lose_create_answer:
            self.lose_create_answer = False
            raise MlflowException("API request failed: Read timed out")
        return type("Run", (), {"info": type("Info", (), {"run_id": run_id})})()

    def update_run(self, run_id, status):
        self._call()
        if run_id not in self.runs:
            raise MlflowException(f"Run {run_id} not found", error_code=RESOURCE_DOES_NOT_EXIST)
        self.runs[run_id]["status"].append(status)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=True):
        self._call()
        if any(t.key == self.refuse_tag for t in tags):
            raise MlflowException("bad tag", error_code=INVALID_PARAMETER_VALUE)
        run = self.runs[run_id]
        run["metrics"] += [(m.key, m.step, m.value) for m in metrics]
        run["params"].update({p.key: p.value for p in params})
        run["tags"].update({t.key: t.value for t in tags})

    def log_inputs(self, run_id, datasets):
        self._call()
        self.runs[run_id]["datasets"] += datasets

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call()
        self.runs[run_id]["artifacts"].append(Path(path).name)

    def set_terminated(self, run_id, status, end_time=None):
        self._call()
        self.runs[run_id]["status"].append(status)


def tracking_cfg(**kw) -> TrackingConfig:
    base = {"retry_max_s": 0.2, "flush_timeout_s": 10.0, "system_metrics_every_s": 0.0}
    return TrackingConfig(**{**base, **kw})


def tracker(tmp_path: Path, fake: FakeMlflow, **kw) -> MlflowTracker:
    return MlflowTracker("http://127.0.0.1:1", tracking_cfg(**kw), tmp_path / "spool", client_factory=lambda: fake)


def start(t: MlflowTracker, run_id: str | None = None) -> None:
    t.start(run_id=run_id, run_name="r", params={"optim.lr": 0.001}, tags={"world_size": "1"})


def losses(fake: FakeMlflow, run_id: str) -> list[tuple[int, float]]:
    return [(step, value) for key, step, value in fake.runs[run_id]["metrics"] if key == "train/loss"]


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.02)


# ================================================================================================ the spool


def test_spool_reads_in_order_and_a_reopened_spool_continues_at_the_cursor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    for i in range(10):
        spool.append({"kind": "metrics", "i": i})
    first = spool.read(4)
    assert [r["i"] for _, r in first] == [0, 1, 2, 3]
    spool.ack(first[-1][0])
    spool.close()
    again = Spool(tmp_path, max_bytes=10_000)  # the next job of the run
    assert [r["i"] for _, r in again.read(100)] == list(range(4, 10))


def test_a_full_spool_drops_the_oldest_metrics_but_keeps_every_other_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4000)  # segments of 500 bytes
    spool.append({"kind": "start", "run_name": "r"})
    for i in range(200):
        spool.append({"kind": "metrics", "step": i, "m": {"train/loss": 1.0}})
        if i == 10:
            spool.append({"kind": "tags", "tags": {"a": "b"}})
    records = [r for _, r in spool.read(10_000)]
    assert spool.dropped > 0 and spool.undelivered_bytes() <= 4000
    kinds = [r["kind"] for r in records]
    assert kinds[:2] == ["start", "tags"]  # kept, in order, ahead of the newest metrics
    steps = [r["step"] for r in records if r["kind"] == "metrics"]
    assert steps == list(range(200 - len(steps), 200))  # the newest survive, contiguous
    assert spool.dropped == 200 - len(steps)


# ================================================================================================ the sender


def test_an_outage_delays_records_and_loses_none_in_order(tmp_path: Path) -> None:
    fake = FakeMlflow()
    t = tracker(tmp_path, fake)
    start(t)
    t.wait_started(10)
    for step in range(1, 6):
        t.log_metrics({"loss": 1.0 / step}, step)
    wait_until(lambda: len(losses(fake, t.run_id)) == 5)
    fake.down = True
    for step in range(6, 30):
        t.log_metrics({"loss": 1.0 / step}, step)  # returns at once: only a file append
    time.sleep(0.5)
    fake.down = False
    t.close("FINISHED")
    assert [s for s, _ in losses(fake, t.run_id)] == list(range(1, 30))
    assert fake.runs[t.run_id]["status"][-1] == "FINISHED"
    assert fake.runs[t.run_id]["params"] == {"optim.lr": "0.001"}


def test_a_resumed_job_delivers_what_the_last_one_left_and_continues_the_run(tmp_path: Path) -> None:
    fake = FakeMlflow()
    fake.down = True
    first = tracker(tmp_path, fake, flush_timeout_s=0.5)
    start(first)
    first.wait_started(10)  # returns once the store is found unreachable
    assert first.run_id is None
    for step in range(1, 11):
        first.log_metrics({"loss": float(step)}, step)
    first.close("KILLED")  # stopped for requeue with the server still down
    assert fake.runs == {}
    fake.down = False
    second = tracker(tmp_path, fake)
    start(second, run_id=first.run_id)
    second.wait_started(10)
    for step in range(11, 16):
        second.log_metrics({"loss": float(step)}, step)
    second.close("FINISHED")
    (run_id,) = fake.runs
    assert [s for s, _ in losses(fake, run_id)] == list(range(1, 16))
    assert fake.runs[run_id]["status"] == ["RUNNING", "KILLED", "RUNNING", "FINISHED"]


def test_a_create_whose_answer_was_lost_finds_its_run_instead_of_making_a_second(tmp_path: Path) -> None:
    fake = FakeMlflow()
    fake.lose_create_answer = True
    t = tracker(tmp_path, fake)
    start(t)
    t.log_metrics({"loss": 1.0}, 1)
    t.close("FINISHED")
    assert len(fake.runs) == 1 and losses(fake, t.run_id) == [(1, 1.0)]


def test_a_record_mlflow_refuses_is_skipped_with_a_warning_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeMlflow()
    fake.refuse_tag = "bad"
    t = tracker(tmp_path, fake)
    start(t)
    t.log_metrics({"loss": 1.0}, 1)
    t.set_tags({"bad": "x"})
    t.log_metrics({"loss": 0.5}, 2)
    with caplog.at_level(logging.WARNING):
        t.close("FINISHED")
    assert losses(fake, t.run_id) == [(1, 1.0), (2, 0.5)]
    assert "MLflow refused a tags record" in caplog.text


def test_a_job_killed_outright_is_noticed_and_its_run_continued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeMlflow()
    first = tracker(tmp_path, fake)
    start(first)
    first.wait_started(10)
    run_id = first.run_id  # first is never closed: SIGKILL
    second = tracker(tmp_path, fake)
    with caplog.at_level(logging.WARNING):
        start(second)
    second.close("FINISHED")
    assert "ended without ending its MLflow run" in caplog.text
    assert list(fake.runs) == [run_id] and fake.runs[run_id]["status"][-1] == "FINISHED"


def test_run_status_says_how_the_job_ended() -> None:
    assert run_status(0) == "FINISHED"
    assert run_status(EXIT_REQUEUE) == "KILLED"
    assert run_status(KeyboardInterrupt()) == "KILLED"
    assert run_status(RuntimeError("corrupt JPEG")) == "FAILED"
    assert run_status(1) == "FAILED"
    assert run_status(None) is None


def test_every_metric_the_trainer_logs_has_a_namespace_in_mlflow() -> None:
    figures = StepMeter(64, 2, 1e9, 989.0).report()  # mfu included
    trainer_keys = {"loss", "lr", "grad_norm", "epoch", "samples_seen", "goodput", "checkpoint_s", "preemptions"}
    for key in {*figures, *trainer_keys, "eval/top1", "preemption/lost_s"}:
        assert "/" in mlflow_metric_name(key), key
    assert set(figures) <= set(MLFLOW_METRIC_NAMES)
    assert mlflow_metric_name("loss") == "train/loss" and mlflow_metric_name("mfu") == "perf/mfu"


# ================================================================================================ secrets, stores, lineage


def test_a_tracking_uri_with_a_password_is_refused_at_load_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["tracking.uri=http://alice:s3cret@mlflow.example:5000"])
    message = str(err.value)
    assert "s3cret" not in message and "\n" not in message
    assert "tracking.uri" in message and "MLFLOW_TRACKING_PASSWORD" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:hunter2@mlflow.example")
    with pytest.raises(ConfigError, match=r"\$MLFLOW_TRACKING_URI=https://\*\*\*@mlflow\.example") as err:
        load_config(SMOKE)
    assert "hunter2" not in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config(SMOKE).tracking.uri is None


def test_redact_userinfo_removes_user_and_password_of_every_uri() -> None:
    text = "a https://u:p@h.org/x b s3://key@bucket/y c http://h:80/z"
    assert redact_userinfo(text) == "a https://***@h.org/x b s3://***@bucket/y c http://h:80/z"


def test_the_default_store_is_one_per_output_folder(tmp_path: Path) -> None:
    assert default_store_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_dataset_record_describes_the_manifest(tmp_path: Path) -> None:
    shards = [ShardInfo(f"s{i}.tar", 100, 1000, "ab" * 32, f"s{i}.idx") for i in range(3)]
    (tmp_path / "digits" / "train").mkdir(parents=True)
    save_manifest(Manifest("single", 10, [str(i) for i in range(10)], shards), tmp_path / "digits" / "train")
    record = dataset_record(str(tmp_path / "digits" / "train"), "training")
    assert record["name"] == "digits/train" and len(record["digest"]) == 16
    assert json.loads(record["profile"]) == {
        "num_samples": 300,
        "num_classes": 10,
        "num_shards": 3,
        "blocklisted": 0,
        "label_kind": "single",
    }
    assert dataset_record(None, "validation") is None


def test_init_lineage_tags_name_the_pretraining_run(tmp_path: Path) -> None:
    export = tmp_path / "pre.safetensors"
    sidecar = {"step": 200, "source": "/runs/pre/checkpoints/step_00000200"}
    sidecar["training_run"] = {"mlflow_run_id": "abc123", "mlflow_experiment_id": "1"}
    export.with_suffix(".json").write_text(json.dumps(sidecar))
    tags = init_lineage_tags(str(export))
    assert tags["init_source_run_id"] == "abc123" and tags["init_source_step"] == "200"
    assert tags["init_source_checkpoint"] == sidecar["source"]
    assert "#/experiments/1/runs/abc123" in tags["mlflow.note.content"]
