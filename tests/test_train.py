"""The training engine end to end: real launchers, real DALI shards of real images, real MLflow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pretrain.dist import free_port
from tests.helpers.launch import REPO, SMOKE, data_overrides, read_metrics, run_script, run_training, tail


def train(launcher: str, run_dir: Path, shards: Path, *overrides: str) -> subprocess.CompletedProcess:
    """coatnet-train on configs/smoke.yaml: 2 ranks through a launcher, or one plain process ("single")."""
    nproc = 1 if launcher == "single" else 2
    return run_training(SMOKE, run_dir, *data_overrides(shards), *overrides, launcher=launcher, nproc=nproc)


def assert_learned(run_dir: Path, proc: subprocess.CompletedProcess, min_top1: float) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps, evals = read_metrics(run_dir)
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert evals[-1]["eval/top1"] > min_top1, evals[-1]  # 10 classes: chance is 0.1
    return steps


@pytest.mark.multiprocess
@pytest.mark.mlflow_server
def test_deepspeed_launcher_zero3_bf16_checkpointing_with_mlflow_server(
    tmp_path: Path, digits_shards: Path, mlflow_server: str
) -> None:
    run_dir = tmp_path / "ds-run"
    proc = train(
        "deepspeed",
        run_dir,
        digits_shards,
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=engine-test",
        "run.log_every=5",
    )
    steps = assert_learned(run_dir, proc, min_top1=0.6)
    assert {"lr", "grad_norm", "images_per_s", "data_wait_fraction", "step_time_s", "memory_gb"} <= set(
        steps[-1]
    )
    assert "zero_stage" not in proc.stdout  # DeepSpeed's own chatter stays out of the console

    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    assert run.data.params["model.name"] == "coatnet_0"
    assert run.data.params["engine.zero_stage"] == "3" and run.data.params["engine.precision"] == "bf16"
    assert run.data.params["model.grad_checkpointing"] == "True"
    assert run.data.tags["world_size"] == "2" and run.data.tags["launcher"] == "deepspeed"
    assert len(run.data.tags["git_commit"]) in (40, len("unknown"))
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [m["step"] for m in steps]
    assert history[-1].value == pytest.approx(steps[-1]["loss"])
    assert client.get_metric_history(run.info.run_id, "eval/top1")[-1].value > 0.6
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.info.status == "FINISHED"


@pytest.mark.multiprocess
def test_torchrun_with_unreachable_tracking_server(tmp_path: Path, digits_shards: Path) -> None:
    run_dir = tmp_path / "torchrun-run"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = train(
        "torchrun",
        run_dir,
        digits_shards,
        f"tracking.uri={dead}",
        "schedule.steps=150",
        "tracking.flush_timeout_s=1",
    )
    assert_learned(run_dir, proc, min_top1=0.3)
    assert "is unreachable" in proc.stdout and "training goes on, records are kept in" in proc.stdout


@pytest.mark.slow
def test_single_process_with_local_mlflow_store(tmp_path: Path, digits_shards: Path) -> None:
    run_dir = tmp_path / "single-run"
    proc = train("single", run_dir, digits_shards, "schedule.steps=150", "data.batch_size=64")
    assert_learned(run_dir, proc, min_top1=0.3)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # one per output folder
    (run,) = client.search_runs([client.get_experiment_by_name("coatnet").experiment_id])
    assert run.data.tags["world_size"] == "1" and run.data.tags["launcher"] == "single"
    assert client.get_metric_history(run.info.run_id, "train/loss")
    assert "done: 150 steps in" in proc.stdout and "(all jobs of this run)" in proc.stdout

    # The same command on the finished run: says so, exits 0, adds nothing (no second evaluation).
    metrics, config = (run_dir / "metrics.jsonl").read_text(), (run_dir / "config.yaml").read_text()
    again = train("single", run_dir, digits_shards, "schedule.steps=150", "data.batch_size=64")
    assert again.returncode == 0 and "already finished at step 150: nothing to do" in again.stdout, tail(
        again
    )
    assert (run_dir / "metrics.jsonl").read_text() == metrics

    # A resume with a changed invariant: one line naming the key, old -> new; the run folder as it was.
    changed = train("single", run_dir, digits_shards, "schedule.steps=150", "data.batch_size=32")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, tail(changed)
    assert "data.batch_size: 64 -> 32" in changed.stderr and changed.stderr.count("\n") == 1, tail(changed)
    assert (run_dir / "config.yaml").read_text() == config and not list(run_dir.glob("config.*.yaml"))
    assert not (run_dir / "LOCK").exists()  # released by the refused job


@pytest.mark.slow
@pytest.mark.multiprocess
def test_coatnet5_full_size_is_sharded_by_zero_init(tmp_path: Path) -> None:
    """Each of 2 ranks holds about half of CoAtNet-5's 688M parameters right after construction."""
    proc = run_script(REPO / "tests" / "helpers" / "zero_partition_probe.py", str(tmp_path), "coatnet_5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = reports[0]["full"]
    assert full == pytest.approx(688e6, rel=0.01)
    for report in reports:
        # Parameters below the persistence threshold (norms, biases) stay whole on every rank: a few %.
        assert report["local"] / full == pytest.approx(0.5, abs=0.02), report
    assert sum(r["local"] for r in reports) >= full
