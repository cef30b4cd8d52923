"""The fixes the fault trials forced, in one process (milliseconds): full disk, stop checks, launch.sh."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from pretrain import dist
from pretrain.checkpoint import MANIFEST, CheckpointManager, SaveFailed, checkpoint_bytes, tag_for
from pretrain.config import CheckpointConfig
from pretrain.evaluate import evaluate
from pretrain.preemption import PreemptionHandler

SINGLE = dist.RankInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")
REPO = Path(__file__).resolve().parents[2]


class Engine:
    """Writes what one ZeRO-3 rank writes; `fail` makes the optimizer file's write fail like a full disk."""

    def __init__(self, optim_bytes: int = 1 << 16) -> None:
        self.optim_bytes = optim_bytes
        self.fail: OSError | None = None
        self.module = torch.nn.Linear(8, 8)  # 72 parameters

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        if self.fail is not None:
            (folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
            raise self.fail
        (folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(self.optim_bytes))


def test_a_save_the_free_space_cannot_hold_is_refused_naming_folder_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, SINGLE)
    mgr.save(Engine(), 10, {"x": 1})
    needed = checkpoint_bytes(tmp_path / tag_for(10))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, 0, needed // 2))
    with pytest.raises(SaveFailed) as err:
        mgr.save(Engine(), 20, {"x": 2})
    message = str(err.value)
    assert "\n" not in message
    assert f"checkpoint.dir {tmp_path}" in message and f"needs about {needed} bytes" in message
    assert f"{needed // 2} are free" in message and "resumes from step_000000010" in message
    assert not (tmp_path / tag_for(20)).exists()  # nothing written
    assert (tmp_path / tag_for(10) / MANIFEST).exists()


def test_a_write_that_fails_removes_the_partial_folder_and_says_what_it_needs(tmp_path: Path) -> None:
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, SINGLE)
    engine = Engine()
    engine.fail = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(SaveFailed) as err:
        mgr.save(engine, 10, {"x": 1})  # the first save: estimated from the parameter count
    message = str(err.value)
    assert "No space left on device" in message and f"checkpoint.dir {tmp_path}" in message
    assert "needs about 1152 bytes" in message  # 16 bytes x 72 parameters
    assert err.value.errno == errno.ENOSPC and message.startswith("checkpoint.dir ")
    assert not (tmp_path / tag_for(10)).exists()
    mgr.save(Engine(), 10, {"x": 1})  # space is back: the same save commits
    assert (tmp_path / tag_for(10) / MANIFEST).exists()


def test_torch_saves_runtime_error_for_a_full_disk_is_a_write_failure_too(tmp_path: Path) -> None:
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, SINGLE)
    engine = Engine()
    engine.fail = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
    with pytest.raises(SaveFailed, match=r"failed on rank 0 \(\[enforce fail.*unexpected pos 128 vs 0\)"):
        mgr.save(engine, 10, {})
    engine.fail = RuntimeError("something else entirely")
    with pytest.raises(RuntimeError, match="something else"):
        mgr.save(engine, 10, {})


def test_retention_keeps_the_checkpoint_just_committed_and_ignores_a_save_in_flight(tmp_path: Path) -> None:
    mgr = CheckpointManager(CheckpointConfig(keep_last=1), tmp_path, SINGLE)
    mgr.save(Engine(), 10, {})
    in_flight = tmp_path / tag_for(30)  # e.g. a decoupled writer still writing, no manifest yet
    in_flight.mkdir()
    mgr.save(Engine(), 20, {})
    mgr.close()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag_for(20), tag_for(30)]


def test_stop_waits_for_the_next_aligned_step_so_logged_windows_stay_whole() -> None:
    with PreemptionHandler(signals=(signal.SIGUSR2,), align=5) as handler:
        assert not handler.should_stop(1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert [handler.should_stop(s) for s in range(2, 6)] == [False, False, False, True]
        assert handler.stop_step == 5 and handler.reason == "signal SIGUSR2"


def test_stop_file_is_looked_for_at_most_every_file_every_s(tmp_path: Path) -> None:
    stop = tmp_path / "STOP"
    with PreemptionHandler(signals=(), stop_file=stop, file_every_s=3600) as handler:
        assert not handler.should_stop(1)  # looked: absent
        stop.touch()
        assert not handler.should_stop(2)  # not again within the hour
    with PreemptionHandler(signals=(), stop_file=stop, file_every_s=0.0) as handler:
        assert handler.should_stop(1)


def test_evaluation_is_abandoned_when_a_stop_arrives() -> None:
    batches = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2))] * 4
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) == 3

    forward = lambda x: torch.zeros(x.shape[0], 10)  # noqa: E731
    assert evaluate(forward, batches, label_kind="single", device=torch.device("cpu"), stop=stop) is None
    assert len(calls) == 3
    full = evaluate(forward, batches, label_kind="single", device=torch.device("cpu"))
    assert full is not None and full["samples"] == 8


FAKE_SRUN = """#!/bin/bash
# stands for srun + the deepspeed launchers: the ranks saved on a stop request, the launchers exit 143
[[ $1 == --kill-on-bad-exit=1 ]] || { echo "srun without --kill-on-bad-exit=1" >&2; exit 99; }
if [[ $FAKE_STOP == 1 ]]; then echo "$(date +%s.%N) stop step=40" >>"$COATNET_EVENTS_FILE"; fi
exit $FAKE_RC
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in show) echo n1 ;; requeue) echo "$2" >>"$FAKE_REQUEUED" ;; esac
"""


@pytest.mark.parametrize(
    ("stop", "rc", "requeued"), [(1, 143, True), (0, 143, False), (0, 3, True), (0, 0, False)]
)
def test_launch_sh_requeues_on_the_trainers_stop_event_whatever_the_launchers_exit_with(
    tmp_path: Path, stop: int, rc: int, requeued: bool
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "RUN_DIR": str(run_dir),
        "NPROC_PER_NODE": "1",
        "FAKE_STOP": str(stop),
        "FAKE_RC": str(rc),
        "FAKE_REQUEUED": str(tmp_path / "requeued"),
    }
    run_dir.mkdir()
    (run_dir / "events.log").write_text("1.0 stop step=10\n")  # an earlier job run's stop: not this one's
    proc = subprocess.run(
        ["bash", str(REPO / "cluster" / "launch.sh"), "pretrain.train", "cfg.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (tmp_path / "requeued").exists() == requeued, proc.stderr
    assert proc.returncode == (3 if requeued else rc), proc.stderr
    events = (run_dir / "events.log").read_text()
    assert ("requeue job=77" in events) == requeued


def test_launch_sh_traps_sigterm() -> None:
    assert "trap 'on_warning TERM' TERM" in (REPO / "cluster" / "launch.sh").read_text()
