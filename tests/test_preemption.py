"""PreemptionHandler (signals, stop file, agreement across ranks), the event log and downtime measurement."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.dist import free_port
from pretrain.preemption import (
    EXIT_REQUEUE,
    Event,
    EventLog,
    JobContext,
    PreemptionHandler,
    downtimes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_signal_stops_at_the_next_check_step_and_stays_stopped() -> None:
    with PreemptionHandler(signals=(signal.SIGUSR2,), check_every=5) as handler:
        assert not any(handler.should_stop(step) for step in range(1, 11))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.requested_locally
        # steps 11..14 are not check steps: no decision there, so all ranks can agree at 15
        assert [handler.should_stop(step) for step in range(11, 16)] == [False] * 4 + [True]
        assert handler.stop_step == 15 and handler.reason == "signal SIGUSR2"
        assert handler.should_stop(16)


def test_stop_file_requests_a_stop(tmp_path: Path) -> None:
    stop_file = tmp_path / "STOP"
    with PreemptionHandler(signals=(), stop_file=stop_file, check_every=2) as handler:
        assert not handler.should_stop(2)
        stop_file.touch()
        assert handler.should_stop(4)
        assert handler.reason == f"stop file {stop_file}"


def test_close_restores_previous_signal_handler() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        handler = PreemptionHandler(signals=(signal.SIGUSR2,))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [] and handler.requested_locally
        handler.close()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_check_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="check_every"):
        PreemptionHandler(signals=(), check_every=0)


def _rank(rank: int, world: int, port: int, tmp: Path) -> None:
    """One training-like process: all_reduce every step, ask the handler, report the stop step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with PreemptionHandler(signals=(signal.SIGUSR2, signal.SIGTERM), check_every=4) as handler:
        for step in range(1, 3000):
            time.sleep(0.005)
            dist.all_reduce(torch.ones(1))  # a training step's gradient all_reduce
            if step == 10:
                (tmp / f"ready-{rank}").write_text(str(os.getpid()))
            if handler.should_stop(step):
                (tmp / f"stopped-{rank}").write_text(f"{step} {handler.reason}")
                break
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _rank, args=(2, free_port(), tmp_path), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready-1").exists():
        assert time.monotonic() < deadline, "rank 1 did not reach step 10"
        time.sleep(0.05)
    os.kill(int((tmp_path / "ready-1").read_text()), signal.SIGUSR2)  # rank 1 only
    while not ctx.join(timeout=120):
        pass
    step0, reason0 = (tmp_path / "stopped-0").read_text().split(" ", 1)
    step1, reason1 = (tmp_path / "stopped-1").read_text().split(" ", 1)
    assert step0 == step1 and int(step0) % 4 == 0 and 10 < int(step0) < 2999
    assert reason1 == "signal SIGUSR2" and reason0 == "another rank"


def test_exit_requeue_is_mirrored_in_launch_script() -> None:
    text = (REPO_ROOT / "cluster" / "launch.sh").read_text()
    assert f"\nEXIT_REQUEUE={EXIT_REQUEUE} " in text


def test_job_context_from_env(tmp_path: Path) -> None:
    env = {
        "COATNET_STOP_FILE": str(tmp_path / "STOP"),
        "COATNET_EVENTS_FILE": str(tmp_path / "events.log"),
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": "2",
    }
    ctx = JobContext.from_env(env)
    assert ctx == JobContext(tmp_path / "STOP", tmp_path / "events.log", "42", 2)
    assert JobContext.from_env({}) == JobContext()
    with pytest.raises(ValueError, match="SLURM_RESTART_COUNT"):
        JobContext.from_env({"SLURM_RESTART_COUNT": "x"})


def test_event_log_round_trip_and_shell_lines(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.log")
    log.record("checkpoint", step=20)
    # the format cluster/launch.sh writes
    with open(log.path, "a") as f:
        f.write("1700000000.123456789 start nodes=n[1-2] job=7 restart=1\n")
    first, second = log.read()
    assert first.name == "checkpoint" and first.fields == {"step": "20"}
    assert abs(first.time - time.time()) < 60
    assert second == Event(1700000000.123456789, "start", {"nodes": "n[1-2]", "job": "7", "restart": "1"})
    with pytest.raises(ValueError, match="one non-empty word"):
        log.record("stop", reason="two words")


def test_a_malformed_event_line_is_skipped_naming_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Line 2 as CI found it: Slurm's SIGTERM to a job whose node died killed launch.sh's `date` mid-line.
    path = tmp_path / "events.log"
    path.write_text("1.0 start restart=0\n end rc=1 job=7 restart=0\n2.0 signal sig=TERM\n")
    events = EventLog(path).read()
    assert [(e.time, e.name) for e in events] == [(1.0, "start"), (2.0, "signal")]
    assert "events.log:2" in caplog.text and "end rc=1" in caplog.text


def _events(*rows: tuple[float, str, dict[str, str]]) -> list[Event]:
    return [Event(t, name, fields) for t, name, fields in rows]


def test_downtime_of_a_warning_signal_runs_from_signal_to_resumed_step() -> None:
    events = _events(
        (100.0, "start", {"restart": "0"}),
        (150.0, "checkpoint", {"step": "100"}),
        (200.0, "signal", {}),
        (203.0, "stop", {"step": "130"}),
        (204.0, "end", {"rc": "3"}),
        (204.5, "requeue", {}),
        (215.0, "start", {"restart": "1"}),
        (230.0, "resumed", {"step": "131"}),
    )
    (lost,) = downtimes(events)
    assert (lost.cause, lost.seconds, lost.restart) == ("signal", 30.0, 1)


def test_downtime_of_a_failure_counts_from_last_checkpoint() -> None:
    events = _events(
        (100.0, "start", {"restart": "0"}),
        (150.0, "checkpoint", {"step": "100"}),
        (170.0, "checkpoint", {"step": "200"}),
        (240.0, "start", {"restart": "1"}),  # no signal: the node died
        (250.0, "resumed", {"step": "201"}),
        (300.0, "checkpoint", {"step": "300"}),
        (310.0, "start", {"restart": "2"}),  # died again; redo from step 300
        (325.0, "resumed", {"step": "301"}),
    )
    assert [(d.cause, d.seconds, d.restart) for d in downtimes(events)] == [
        ("failure", 80.0, 1),
        ("failure", 25.0, 2),
    ]


def test_signal_without_a_stop_checkpoint_is_a_failure() -> None:
    # A dead node: Slurm SIGTERMs the batch shell, which logs the signal, but no rank could save.
    events = _events(
        (100.0, "start", {"restart": "0"}),
        (150.0, "checkpoint", {"step": "100"}),
        (200.0, "signal", {"sig": "TERM"}),
        (201.0, "end", {"rc": "143"}),
        (215.0, "start", {"restart": "1"}),
        (230.0, "resumed", {"step": "101"}),
    )
    (lost,) = downtimes(events)
    assert (lost.cause, lost.seconds, lost.restart) == ("failure", 80.0, 1)


def test_no_downtime_when_the_run_finishes_despite_a_signal() -> None:
    events = _events((0.0, "start", {"restart": "0"}), (5.0, "signal", {}), (6.0, "end", {"rc": "0"}))
    assert downtimes(events) == []
