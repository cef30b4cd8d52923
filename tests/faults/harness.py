"""Fault injection against the real `deepspeed` launcher on 2 CPU ranks, judged by the losses.

Every trial trains configs/smoke.yaml (tests/fixtures/training.py: STEPS steps, a checkpoint every K,
losses logged every step, evaluation every EVAL_EVERY steps) into its own run folder, injects one fault,
then runs the very same command again until it exits 0, as a requeueing scheduler would. A trial passes
when every loss line the run folder ever logged (first attempts and redone steps alike) equals the
uninterrupted reference's loss of that step bitwise, every step was logged, and the run resumed from the
newest checkpoint committed when the fault hit (no step lost beyond it).

The long driver is `python -m tests.faults.run` (`make faults`); tests/faults/test_faults.py runs a
short set inside `make test`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pretrain.checkpoint import MANIFEST, TAG_RE, structural_problem, tag_for
from pretrain.dist import free_port
from tests.fixtures.training import COMMON, STEPS, K
from tests.helpers.launch import BIN, REPO, SMOKE, data_overrides

EVAL_EVERY = 5  # evaluations at 5, 15, 25 fall between saves; 10 and 20 are followed by a save
FAULTS = (*COMMON, f"run.eval_every={EVAL_EVERY}")
LAUNCH_TIMEOUT_S = 600
MAX_LAUNCHES = 4
RESUMED_RE = re.compile(r"resumed from (\S+) at step (\d+)")


@dataclass
class Result:
    """One row of the fault table."""

    trial: str
    launches: int = 0
    statuses: list[int] = field(default_factory=list)  # exit status of every launch, in order
    redone: int = 0  # steps trained again after the fault (<= K: since the last committed checkpoint)
    lost: int = 0  # committed steps NOT resumed from (must be 0)
    losses_equal: bool = False
    note: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.losses_equal and self.lost == 0 and bool(self.statuses) and self.statuses[-1] == 0


# ------------------------------------------------------------------------------------------------ launches


class Launch:
    """One `deepspeed --num_gpus 2 --module pretrain.train ...` in its own process group, output to a file."""

    def __init__(
        self,
        run_dir: Path,
        shards: Path,
        *overrides: str,
        env: dict[str, str] | None = None,
        nproc: int = 2,
    ):
        port = free_port()
        self.log_path = run_dir.parent / f"{run_dir.name}.launch{_next_launch(run_dir)}.out"
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(port),
            "--module",
            "pretrain.train",
            "--config",
            str(SMOKE),
            f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}",
            *data_overrides(shards),
            *FAULTS,
            *overrides,
        ]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)
        self.started = time.monotonic()
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def ranks(self) -> dict[int, psutil.Process]:
        """rank -> training process (found by its RANK variable among the launcher's descendants)."""
        found = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        for child in children:
            try:
                cmdline = " ".join(child.cmdline())
                if "pretrain.train" in cmdline and "deepspeed.launcher" not in cmdline:
                    found[int(child.environ()["RANK"])] = child
            except (psutil.Error, KeyError, ValueError):
                continue
        return found

    def signal_rank(self, rank: int, sig: signal.Signals) -> bool:
        proc = self.ranks().get(rank)
        if proc is None:
            return False
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return False
        return True

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        """The launcher's exit status, once every process of the launch is gone.

        The deepspeed runner dies of SIGTERM at once while its per-node launcher and the ranks go on
        saving: the next launch must not start before they are done (a scheduler waits for them too).
        """
        deadline = time.monotonic() + timeout
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait()
        while self._group_alive():
            if time.monotonic() > deadline:
                self.kill()
            time.sleep(0.1)
        return rc

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group this launch created (the launcher and its ranks)."""
        self.signal_group(signal.SIGKILL)

    def signal_group(self, sig: signal.Signals) -> None:
        """`sig` to every process of this launch at once (what Slurm does to a job step)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def _next_launch(run_dir: Path) -> int:
    return len(list(run_dir.parent.glob(f"{run_dir.name}.launch*.out"))) + 1


# ------------------------------------------------------------------------------------------------ run folder


def loss_lines(run_dir: Path) -> list[tuple[int, float]]:
    """Every (step, loss) line of rank 0's metrics.jsonl in file order; a redone step appears twice."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def logged_step(run_dir: Path) -> int:
    return max((s for s, _ in loss_lines(run_dir)), default=0)


def committed_step(ckpt_root: Path) -> int:
    """Newest committed checkpoint (manifest present, files complete) under `ckpt_root`; 0 without one."""
    if not ckpt_root.is_dir():
        return 0
    steps = [
        int(m.group(1))
        for p in ckpt_root.iterdir()
        if (m := TAG_RE.match(p.name)) and structural_problem(p) is None
    ]
    return max(steps, default=0)


def resumed_steps(run_dir: Path) -> list[int]:
    """The step each launch resumed from, in order (from rank 0's log, appended to by every launch)."""
    log = run_dir / "logs" / "rank0.log"
    return [int(m.group(2)) for m in RESUMED_RE.finditer(log.read_text())] if log.exists() else []


def compare_losses(run_dir: Path, reference: dict[int, float]) -> tuple[bool, str]:
    """Every logged loss equals the reference's at its step (bitwise), and every step was logged."""
    lines = loss_lines(run_dir)
    wrong = [(s, v, reference.get(s)) for s, v in lines if reference.get(s) != v]
    missing = sorted(set(reference) - {s for s, _ in lines})
    if wrong:
        return (
            False,
            f"{len(wrong)} loss(es) differ, first: step {wrong[0][0]} {wrong[0][1]!r} != {wrong[0][2]!r}",
        )
    if missing:
        return False, f"steps never logged: {missing[:5]}"
    return True, ""


def reference_losses(run_dir: Path) -> dict[int, float]:
    return dict(loss_lines(run_dir))


def wait_until(condition: Callable[[], bool], launch: Launch, timeout: float = LAUNCH_TIMEOUT_S) -> bool:
    """Poll every 5 ms; False when the launch ended (or the timeout passed) before `condition` held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not launch.running() or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ------------------------------------------------------------------------------------------------ trials


@dataclass
class Context:
    """Where trials run and what they are compared with."""

    root: Path
    shards: Path
    reference: dict[int, float]

    def run_dir(self, name: str) -> Path:
        return self.root / name


def make_reference(root: Path, shards: Path) -> dict[int, float]:
    """The uninterrupted run (same launcher, same command) every trial is compared with."""
    run_dir = root / "reference"
    if not (run_dir / "checkpoints" / tag_for(STEPS) / MANIFEST).exists():
        launch = Launch(run_dir, shards)
        rc = launch.wait()
        assert rc == 0, f"reference run failed ({rc}):\n{launch.output()[-4000:]}"
    ref = reference_losses(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1)), sorted(ref)
    return ref


def finish(
    ctx: Context,
    result: Result,
    run_dir: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    nproc: int = 2,
) -> None:
    """Run the same command again until it exits 0 (at most MAX_LAUNCHES in all); judge the losses."""
    while result.launches < MAX_LAUNCHES and (not result.statuses or result.statuses[-1] != 0):
        launch = Launch(run_dir, ctx.shards, *overrides, env=env, nproc=nproc)
        result.statuses.append(launch.wait())
        result.launches += 1
        if result.statuses[-1] != 0:
            result.note += f" launch {result.launches} failed: {_last_error(launch.output())};"
    result.losses_equal, why = compare_losses(run_dir, ctx.reference)
    if why:
        result.note += f" {why}"


def _last_error(output: str) -> str:
    lines = [
        line.strip()
        for line in output.splitlines()
        if "Error" in line or "error:" in line or "refused" in line.lower()
    ]
    return lines[-1][:200] if lines else "(no error line)"


KILL_MODES = ("step", "save", "eval", "startup")


def random_kill(ctx: Context, rng: random.Random, index: int, mode: str | None = None) -> Result:
    """SIGKILL one random rank at a random moment of `mode` (a step, a save, an evaluation, start-up)."""
    mode = mode or rng.choice(KILL_MODES)
    rank = rng.randint(0, 1)
    name = f"kill{index:02d}-{mode}-r{rank}"
    run_dir = ctx.run_dir(name)
    ckpts = run_dir / "checkpoints"
    result = Result(trial=name)
    t0 = time.monotonic()
    launch = Launch(run_dir, ctx.shards)
    if mode == "step":
        target = rng.randint(1, STEPS - 1)
        reached = wait_until(lambda: logged_step(run_dir) >= target, launch)
        time.sleep(rng.uniform(0, 0.3))
        where = f"after step {target}"
    elif mode == "save":
        target = rng.choice([K, 2 * K])
        reached = wait_until(lambda: (ckpts / tag_for(target)).is_dir(), launch)
        time.sleep(rng.uniform(0, 0.6))
        where = f"save of step {target}"
    elif mode == "eval":
        target = rng.choice([EVAL_EVERY, 3 * EVAL_EVERY, 5 * EVAL_EVERY])
        reached = wait_until(lambda: logged_step(run_dir) >= target, launch)  # evaluation follows at once
        time.sleep(rng.uniform(0, 0.05))
        where = f"evaluation at step {target}"
    else:
        reached = wait_until(lambda: bool(launch.ranks()), launch)
        time.sleep(rng.uniform(0.5, 8.0))
        where = "start-up"
    if not reached:
        result.note = f"the launch ended before the fault ({where}) could be injected;"
    killed = launch.signal_rank(rank, signal.SIGKILL)
    logged_at_kill = logged_step(run_dir)
    result.statuses.append(launch.wait())
    result.launches = 1
    committed = committed_step(ckpts)  # what the killed job left committed
    result.note = f"{where}: " + ("" if killed else "rank already gone; ") + result.note
    finish(ctx, result, run_dir)
    resumed = resumed_steps(run_dir)
    start = resumed[0] if resumed else 0
    result.lost = committed - start
    result.redone = max(0, logged_at_kill - start)
    result.seconds = time.monotonic() - t0
    return result
