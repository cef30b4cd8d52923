"""Rank detection under each launcher, with real launchers and real process groups."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import dist
from pretrain.dist import _first_slurm_host, detect, free_port
from tests.helpers.launch import REPO

PROBE = Path(__file__).parent / "helpers" / "rank_probe.py"


def test_detect_from_environment() -> None:
    assert detect({}).launcher == "single" and detect({}).world_size == 1 and detect({}).is_main
    ds = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1", "LOCAL_SIZE": "2"})
    assert (ds.rank, ds.world_size, ds.local_rank, ds.local_world_size, ds.launcher) == (
        3,
        4,
        1,
        2,
        "deepspeed",
    )
    assert ds.num_nodes == 2 and not ds.is_main
    tr = detect(
        {
            "RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "2",
            "TORCHELASTIC_RUN_ID": "x",
        }
    )
    assert tr.launcher == "torchrun" and tr.is_main
    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NNODES": "4",
        "SLURM_STEP_ID": "0",
    }
    s = detect(srun)
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.launcher) == (5, 8, 1, 2, "srun")
    # The batch shell itself (no step) is not a rank of anything; a launcher inside srun wins over SLURM_*.
    assert detect({k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}).launcher == "single"
    assert detect({**srun, "RANK": "2", "WORLD_SIZE": "16", "CROSS_RANK": "0"}).rank == 2


def test_first_slurm_host() -> None:
    assert _first_slurm_host("n[1-3],m7") == "n1"
    assert _first_slurm_host("gpu[012,015]") == "gpu012"
    assert _first_slurm_host("node7") == "node7"


def _run_probe(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [*cmd, str(PROBE), str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("probe*.json"))]
    # Every rank logs to its own file; only rank 0 prints on the console.
    for r in reports:
        assert f"hello from rank {r['rank']}" in (out / "logs" / f"rank{r['rank']}.log").read_text()
    assert "hello from rank 0" in proc.stdout and "hello from rank 1" not in proc.stdout
    return reports


@pytest.mark.multiprocess
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    reports = _run_probe(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ],
        tmp_path,
    )
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["launcher"] == "torchrun" and r["world_size"] == 2 and r["sum"] == 3.0 for r in reports)
    assert [r["torch_rank"] for r in reports] == [0, 1]


@pytest.mark.multiprocess
def test_deepspeed_launcher_two_ranks(tmp_path: Path) -> None:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the deepspeed launcher is installed with the package"
    port = free_port()
    reports = _run_probe([launcher, "--num_gpus", "2", "--master_port", str(port)], tmp_path)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["launcher"] == "deepspeed" and r["world_size"] == 2 and r["sum"] == 3.0 for r in reports)
    assert [r["local_rank"] for r in reports] == [0, 1]
    # DeepSpeed's shared-memory collectives (LOCAL_SIZE is set) are unlinked once mapped: nothing left
    # in /dev/shm while the run goes on, nor after it.
    assert [r["shm_left"] for r in reports] == [[], []]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_single_process(tmp_path: Path) -> None:
    (report,) = _run_probe([sys.executable], tmp_path)
    assert report["launcher"] == "single" and report["world_size"] == 1 and report["sum"] == 1.0


def test_stale_shared_memory_segments_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "SHM_DIR", tmp_path)
    uid = os.getuid()
    old = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_1234_0"
    fresh = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_5678_0"
    other_user = tmp_path / f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_1234_0"
    for path in (old, fresh, other_user):
        path.write_bytes(b"x")
    os.utime(old, (0, 0))
    os.utime(other_user, (0, 0))
    assert dist.remove_stale_shm() == [old]
    assert fresh.exists() and other_user.exists() and not old.exists()


EXIT_PROBE = """
import atexit, sys
from pretrain import dist
atexit.register(lambda: print("exit handler ran", flush=True))
def main():
    sys.stdout.write("unflushed line")  # no newline, no flush: run_and_exit must flush it
    case = sys.argv[1]
    if case == "raise":
        raise RuntimeError("boom")
    if case == "sysexit":
        sys.exit(4)
    if case == "message":
        sys.exit("a message")
    return 3
dist.run_and_exit(main)
"""


@pytest.mark.parametrize(
    ("case", "status", "in_stderr"),
    [("return", 3, ""), ("raise", 1, "RuntimeError: boom"), ("sysexit", 4, ""), ("message", 1, "a message")],
)
def test_run_and_exit_keeps_the_status_flushes_and_runs_exit_handlers(
    case: str, status: int, in_stderr: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, case],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.startswith("unflushed line") and "exit handler ran" in proc.stdout, proc.stdout
    assert in_stderr in proc.stderr
