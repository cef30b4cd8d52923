"""The local Slurm harness itself (start/stop, single node, teardown) and the launch scripts' contracts."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local_slurm import ClusterSpec, LocalSlurm
from pretrain.dist import free_port
from tests.fixtures.slurm import REPO_ROOT, require_slurm

CLUSTER = REPO_ROOT / "cluster"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cred_expire_s": 2}, "cred_expire_s must be >= 5"),
        ({"tag": "much-too-long"}, "tag must be"),
        ({"nodes": 300}, "nodes must be"),
        ({"subnet": "192.168.1"}, "subnet must look like"),
        ({"ctld_port": 7000, "slurmd_port": 7000}, "must differ"),
    ],
)
def test_cluster_spec_rejects_bad_values(change: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterSpec(base=tmp_path, **change)  # type: ignore[arg-type]


def test_launch_script_refuses_to_run_outside_a_job() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(CLUSTER / "launch.sh"), "pretrain.train", "cfg.yaml"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "submit it with sbatch" in result.stderr


@pytest.mark.parametrize("script", ["pretrain.sbatch", "finetune.sbatch"])
def test_sbatch_scripts_requeue_and_warn_the_batch_shell(script: str) -> None:
    text = (CLUSTER / script).read_text()
    header = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in header and "--open-mode=append" in header
    assert any(h.startswith("--signal=B:USR1@") for h in header)  # B: the batch shell, where the trap is
    assert subprocess.run(["bash", "-n", str(CLUSTER / script)]).returncode == 0


def _own_cluster(nodes: int) -> Iterator[LocalSlurm]:
    require_slurm(nodes)
    base = Path(tempfile.mkdtemp(prefix="coatnet-slurm-"))
    pid = os.getpid() % 1_000_000
    spec = ClusterSpec(
        base,
        nodes,
        tag=f"h{pid}",
        subnet=f"10.202.{pid % 250}",
        ctld_port=free_port(),
        slurmd_port=free_port(),
    )
    cluster = LocalSlurm(spec)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def one_host_cluster() -> Iterator[LocalSlurm]:
    yield from _own_cluster(nodes=0)


@pytest.fixture
def one_emulated_node() -> Iterator[LocalSlurm]:
    yield from _own_cluster(nodes=1)


@pytest.mark.slurm
def test_single_node_cluster_runs_a_job_on_this_host(one_host_cluster: LocalSlurm, tmp_path: Path) -> None:
    cluster = one_host_cluster
    cluster.start()
    assert list(cluster.node_states().values()) == ["idle"]
    job = cluster.sbatch(f"--output={tmp_path}/out", "--wrap", "srun hostname")
    assert cluster.wait_finished(job, timeout_s=60)["JobState"] == "COMPLETED"
    assert (tmp_path / "out").read_text().strip() == cluster.host


@pytest.mark.slurm
def test_stop_ends_daemons_and_removes_namespaces(one_emulated_node: LocalSlurm) -> None:
    cluster = one_emulated_node
    cluster.start()
    pids = [int(f.read_text()) for f in cluster.run_dir.glob("*.bgpid")]
    assert len(pids) == 3  # munged, slurmctld, slurmd-n1
    namespace = f"{cluster.spec.tag}-n1"
    assert namespace in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    cluster.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path(f"/sys/class/net/{cluster.spec.tag}-br").exists()
