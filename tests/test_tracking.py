"""MLflow tracking: the spool, the sender, statuses, names, secrets and lineage.

The first part runs in this process against a fake MLflow client (a few dicts that can be "down"), so
every delivery rule is checked in milliseconds. The second part trains for real (configs/smoke.yaml)
against a real `mlflow server` on 127.0.0.1 or the default sqlite store, and reads the result back with
MLflow's own client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from data_pipeline.manifest import Manifest, ShardInfo, load_manifest, save_manifest
from data_pipeline.tarindex import read_index
from pretrain.config import ConfigError, TrackingConfig, load_config, redact_userinfo
from pretrain.dist import free_port
from pretrain.metrics import StepMeter
from pretrain.preemption import EXIT_REQUEUE, STOP_FILE_ENV
from pretrain.sender import RUN_KEY_TAG
from pretrain.spool import Spool
from pretrain.tracking import (
    MLFLOW_METRIC_NAMES,
    MlflowTracker,
    dataset_record,
    default_store_uri,
    deliver,
    init_lineage_tags,
    mlflow_metric_name,
    run_status,
)
from tests.fixtures.mlflow_server import MlflowServer
from tests.helpers.launch import (
    BIN,
    CONFIGS,
    REPO,
    SMOKE,
    data_overrides,
    launcher_prefix,
    rank0_log,
    read_metrics,
    run_training,
    tail,
)

FINETUNE = CONFIGS / "smoke_finetune.yaml"

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
    return MlflowTracker(
        "http://127.0.0.1:1", tracking_cfg(**kw), tmp_path / "spool", client_factory=lambda: fake
    )


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


def test_deliver_sends_what_a_finished_job_left_and_ends_a_run_never_resumed(tmp_path: Path) -> None:
    fake = FakeMlflow()
    t = tracker(tmp_path, fake, flush_timeout_s=0.5)
    start(t)
    t.wait_started(10)
    fake.down = True
    t.log_metrics({"loss": 0.5}, 7)
    t.close(None)  # the job never said how it ended
    fake.down = False
    assert deliver(tmp_path, spool="spool", status="KILLED", timeout_s=10, client_factory=lambda: fake)
    assert losses(fake, t.run_id) == [(7, 0.5)] and fake.runs[t.run_id]["status"][-1] == "KILLED"


def test_run_status_says_how_the_job_ended() -> None:
    assert run_status(0) == "FINISHED"
    assert run_status(EXIT_REQUEUE) == "KILLED"
    assert run_status(KeyboardInterrupt()) == "KILLED"
    assert run_status(RuntimeError("corrupt JPEG")) == "FAILED"
    assert run_status(1) == "FAILED"
    assert run_status(None) is None


def test_every_metric_the_trainer_logs_has_a_namespace_in_mlflow() -> None:
    figures = StepMeter(64, 2, 1e9, 989.0).report()  # mfu included
    trainer_keys = {
        "loss",
        "lr",
        "grad_norm",
        "epoch",
        "samples_seen",
        "goodput",
        "checkpoint_s",
        "checkpoint_blocked_s",
        "preemptions",
    }
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
    assert load_config(SMOKE, ["tracking.enabled=false"]).tracking.uri is None  # not used: not refused
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


# ================================================================================================ real runs
# configs/smoke.yaml on the digits shards, one plain process (the tracker is rank 0's either way).

FEW = ("run.log_every=5", "checkpoint.every_steps=10", "tracking.system_metrics_every_s=1")


def train_in_background(
    run_dir: Path, shards: Path, *overrides: str, env: dict[str, str]
) -> subprocess.Popen:
    """pretrain.train as run_training starts it, without waiting; output in <run_dir>.out."""
    cmd = [
        *launcher_prefix("single", 1, free_port()),
        "pretrain.train",
        "--config",
        str(SMOKE),
        f"run.output_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        *data_overrides(shards),
        *overrides,
    ]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    out = open(run_dir.with_suffix(".out"), "w")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a loss in metrics.jsonl so far (read while the trainer appends: a torn line is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            steps += [entry["step"]] if "loss" in entry else []
    return sorted(steps)


def losses_of(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)[0]}


def only_run(uri: str, experiment: str = "coatnet"):
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def loss_history(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


@pytest.mark.slow
@pytest.mark.mlflow_server
@pytest.mark.multiprocess
def test_server_sigkilled_mid_run_and_restarted_gets_every_loss_point_and_the_run_finishes(
    tmp_path: Path, digits_shards: Path, restartable_mlflow_server: MlflowServer
) -> None:
    server = restartable_mlflow_server
    run_dir = tmp_path / "outage"
    secret = "pw-" + uuid.uuid4().hex  # credentials the MLflow way; this server ignores them
    env = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": secret}
    proc = train_in_background(
        run_dir,
        digits_shards,
        *FEW,
        "schedule.steps=300",
        f"tracking.uri={server.uri}",
        "tracking.experiment=outage",
        "tracking.retry_max_s=2",
        "tracking.flush_timeout_s=180",
        env=env,
    )
    try:
        wait_until(lambda: len(logged_steps(run_dir)) >= 2 or proc.poll() is not None, timeout_s=300)
        server.kill()  # SIGKILL, mid-run
        killed_at = max(logged_steps(run_dir))
        wait_until(lambda: max(logged_steps(run_dir)) >= killed_at + 5 or proc.poll() is not None, 300)
        server.start()  # same port, same store; 10-60 s to answer on 2 loaded cores
        restarted_at = max(logged_steps(run_dir))
        assert proc.wait(timeout=600) == 0, run_dir.with_suffix(".out").read_text()[-4000:]
    finally:
        proc.kill()
    assert killed_at < restarted_at < 300, (killed_at, restarted_at)  # the outage was inside the run
    log = rank0_log(run_dir)
    assert log.index("is unreachable") < log.index("answers again") < log.index("done: 300 steps")

    client, run = only_run(server.uri, "outage")
    assert loss_history(client, run.info.run_id) == losses_of(run_dir)  # every point, steps 5..300
    assert sorted(losses_of(run_dir)) == list(range(5, 301, 5))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"].endswith("train.py")
    assert any(k.startswith("system/") for k in run.data.metrics)

    # The password reaches nothing: no file of the run folder, no param, tag or artifact, no output.
    files = [p for p in run_dir.rglob("*") if p.is_file()] + [run_dir.with_suffix(".out")]
    assert len(files) > 10
    assert [p for p in files if secret.encode() in p.read_bytes()] == []
    assert secret not in json.dumps([run.data.params, run.data.tags])
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    assert sorted(p.name for p in artifacts.iterdir()) == ["config.yaml", "ds_config.json"]
    assert all(secret.encode() not in p.read_bytes() for p in artifacts.rglob("*") if p.is_file())


def test_a_password_in_the_tracking_uri_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "refused"
    proc = run_training(SMOKE, run_dir, "tracking.uri=http://alice:s3cret-pw@127.0.0.1:5000", timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "MLFLOW_TRACKING_PASSWORD" in line and "s3cret-pw" not in proc.stdout + proc.stderr
    assert not run_dir.exists()


def corrupt_first_jpeg(dataset: Path) -> None:
    """Overwrite most of the first sample's JPEG data in shard 0 with zeros (the index stays valid)."""
    manifest = load_manifest(dataset)[0]
    _, offset, size, _ = read_index(dataset / manifest.shards[0].index)[0].component("jpg")
    with open(dataset / manifest.shards[0].name, "r+b") as fh:
        fh.seek(offset + size // 3)
        fh.write(bytes(size - size // 3))


@pytest.mark.multiprocess
def test_a_run_that_meets_a_corrupt_image_mid_run_is_failed(tmp_path: Path, digits_shards: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    corrupt_first_jpeg(shards / "train")  # met within the first epoch (44 steps), in the loader's order
    run_dir = tmp_path / "runs" / "corrupt"
    proc = run_training(SMOKE, run_dir, *data_overrides(shards), *FEW, "schedule.steps=60")
    assert proc.returncode == 1 and "undecodable image" in proc.stderr, tail(proc)
    client, run = only_run(default_store_uri(run_dir.parent))
    assert run.info.status == "FAILED"
    assert loss_history(client, run.info.run_id) == losses_of(run_dir)  # what it did before, delivered
    assert max(losses_of(run_dir), default=0) < 45


@pytest.fixture(scope="module")
def requeued_run(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> tuple[Path, str, str]:
    """A run stopped for requeue at step 5 (the stop file; a stop lands on the next log step), then resumed to step 20. Returns the run
    folder and the MLflow run's status after each job."""
    root = tmp_path_factory.mktemp("requeue")
    run_dir, stop = root / "runs" / "pre", root / "STOP"
    stop.touch()
    overrides = (*data_overrides(digits_shards), *FEW, "schedule.steps=20")
    proc = run_training(SMOKE, run_dir, *overrides, env={STOP_FILE_ENV: str(stop)})
    assert proc.returncode == EXIT_REQUEUE, tail(proc)
    first = only_run(default_store_uri(run_dir.parent))[1].info.status
    stop.unlink()
    proc = run_training(SMOKE, run_dir, *overrides, env={STOP_FILE_ENV: str(stop)})
    assert proc.returncode == 0, tail(proc)
    return run_dir, first, only_run(default_store_uri(run_dir.parent))[1].info.status


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_run_stopped_for_requeue_is_killed_then_resumed_in_the_same_run_and_finished(
    requeued_run: tuple[Path, str, str],
) -> None:
    run_dir, after_stop, after_resume = requeued_run
    assert (after_stop, after_resume) == ("KILLED", "FINISHED")
    client, run = only_run(default_store_uri(run_dir.parent))  # one store in the output folder
    assert loss_history(client, run.info.run_id) == losses_of(run_dir)
    assert sorted(losses_of(run_dir)) == [5, 10, 15, 20]
    assert run.data.tags["resumed_from_step"] == "5" and run.data.metrics["preemption/count"] == 1
    assert 0 < run.data.metrics["perf/goodput"] < 1
    assert run.data.metrics["train/samples_seen"] == 20 * 32
    assert (
        client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    (train, val) = sorted(run.inputs.dataset_inputs, key=lambda d: d.tags[0].value)
    assert [train.tags[0].value, val.tags[0].value] == ["training", "validation"]
    assert json.loads(train.dataset.profile)["num_samples"] == 1426
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3
    assert {"config.yaml", "ds_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_finetune_names_the_pretraining_run_it_starts_from(
    requeued_run: tuple[Path, str, str], parity_shards: Path
) -> None:
    pre_dir = requeued_run[0]
    export = pre_dir / "export.safetensors"
    subprocess.run(
        [str(BIN / "coatnet-export"), str(pre_dir / "checkpoints"), str(export)], check=True, timeout=300
    )
    client, pre = only_run(default_store_uri(pre_dir.parent))
    assert (
        json.loads(export.with_suffix(".json").read_text())["training_run"]["mlflow_run_id"]
        == pre.info.run_id
    )

    ft_dir = pre_dir.parent / "ft"  # the same output folder: both runs in one store, one UI
    overrides = (f"data.train={parity_shards / 'train'}", f"data.val={parity_shards / 'val'}")
    proc = run_training(FINETUNE, ft_dir, *overrides, f"init.path={export}", "schedule.steps=5", *FEW)
    assert proc.returncode == 0, tail(proc)
    experiment = client.get_experiment_by_name("coatnet").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert set(runs) == {"pre", "ft"}
    tags = runs["ft"].data.tags
    assert tags["init_source_run_id"] == pre.info.run_id and tags["init_source_step"] == "20"
    assert pre.info.run_id in tags["mlflow.note.content"]
