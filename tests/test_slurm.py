"""Real Slurm (3 emulated nodes, jobs on 2): the sbatch headers and the launch path.

The jobs run the real cluster/pretrain.sbatch with cluster.smoke_job standing in for the trainer (it
speaks the same protocol: --config + overrides, stop file, EXIT_REQUEUE, event log), so these tests need
neither the model nor data. The warning signal -> requeue path and node failure run with the real
trainer in tests/test_slurm_train.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.local_slurm import LocalSlurm
from pretrain.preemption import EventLog
from tests.fixtures.slurm import REPO_ROOT

pytestmark = pytest.mark.slurm

SBATCH = REPO_ROOT / "cluster" / "pretrain.sbatch"
# Local nodes have 2 CPUs and no GPUs: override the header's production sizes on the command line.
LOCAL = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def submit_smoke(
    slurm: LocalSlurm, env: dict[str, str], tmp: Path, *overrides: str, sbatch_args: tuple[str, ...] = ()
) -> tuple[int, Path]:
    """Submit pretrain.sbatch running cluster.smoke_job; return the job id and its RUN_DIR."""
    run_dir, out = tmp / "run", tmp / "out"
    config = tmp / "smoke.yaml"
    config.write_text(f"out: {out}\nstep_s: 0.05\ncheck_every: 5\nsave_every: 10\n")
    job_env = {**env, "TRAIN_MODULE": "cluster.smoke_job", "RUN_DIR": str(run_dir)}
    args = [*LOCAL, *sbatch_args, f"--output={tmp}/job.out", f"--chdir={REPO_ROOT}", str(SBATCH)]
    return slurm.sbatch(*args, str(config), *overrides, env=job_env), run_dir


def wait_for_file(path: Path, timeout_s: float, job_log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            log = job_log.read_text() if job_log.exists() else "(no job log)"
            raise TimeoutError(f"{path} not written after {timeout_s} s; job log:\n{log[-3000:]}")
        time.sleep(0.2)


def job_log(tmp: Path) -> str:
    return (tmp / "job.out").read_text(errors="replace")


@pytest.mark.parametrize("script", ["pretrain.sbatch", "finetune.sbatch"])
def test_scheduler_accepts_sbatch_headers(slurm: LocalSlurm, script: str) -> None:
    # --test-only: Slurm parses the header and plans the job without running it
    result = slurm.run(
        "sbatch", "--test-only", *LOCAL, str(REPO_ROOT / "cluster" / script), "cfg.yaml", check=False
    )
    assert result.returncode == 0 and "to start at" in result.stderr, result.stderr


def test_cluster_runs_one_task_per_node_with_distinct_hosts(slurm: LocalSlurm, tmp_path: Path) -> None:
    assert slurm.node_states() == {"n1": "idle", "n2": "idle", "n3": "idle"}
    script = tmp_path / "hosts.sbatch"
    # each task reports its hostname and the address its node has on the cluster network
    script.write_text(
        "#!/bin/bash\nsrun --ntasks-per-node=1 bash -c "
        "'echo $SLURM_NODEID $(hostname) $(getent hosts $(hostname) | cut -d\" \" -f1)'\n"
    )
    job = slurm.sbatch("-N2", "--ntasks-per-node=1", f"--output={tmp_path}/hosts.out", str(script))
    fields = slurm.wait_finished(job, timeout_s=60)
    assert fields["JobState"] == "COMPLETED", (fields, (tmp_path / "hosts.out").read_text())
    rows = sorted(line.split() for line in (tmp_path / "hosts.out").read_text().splitlines())
    assert [r[:2] for r in rows] == [["0", "n1"], ["1", "n2"]]
    assert rows[0][2] != rows[1][2]  # two network namespaces, two addresses


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_launcher_runs_gloo_all_reduce_across_nodes(
    slurm: LocalSlurm, slurm_job_env: dict[str, str], tmp_path: Path
) -> None:
    job, run_dir = submit_smoke(slurm, slurm_job_env, tmp_path, "steps=10")
    fields = slurm.wait_finished(job, timeout_s=180)
    assert fields["JobState"] == "COMPLETED", job_log(tmp_path)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["hosts"] == ["n1", "n2"]  # rank 0 on the head node, rank 1 on the other
    assert result["allreduce"] == 3.0  # 1 + 2: both ranks took part
    assert (run_dir / "hostfile").read_text().split("\n")[:2] == ["n1 slots=1", "n2 slots=1"]
    names = [e.name for e in EventLog(run_dir / "events.log").read()]
    assert names == ["start", "checkpoint", "end"]
