"""Does a resumed run train as fast as one that never stopped? (design invariant)

    python benchmarks/resume_speed.py                 # 300 steps, stop at step 100
    python benchmarks/resume_speed.py --steps 200 --stop 80 --out /tmp/resume-bench

One invocation runs, one after the other on the same machine, with the real `deepspeed` launcher on 2 CPU
ranks and configs/smoke.yaml over scikit-learn's digits (shards built with `coatnet-data build`, reused
from --out when present):
- uninterrupted: `pretrain.train` for --steps steps;
- stop and resume: the same command; when rank 0's metrics reach step --stop minus 5 the stop file
  (COATNET_STOP_FILE, what cluster/launch.sh writes on Slurm's warning signal) is created, the ranks
  agree at the next stop check, save and exit with the requeue status; then the same command again
  resumes from that checkpoint and trains to --steps.

For each run the figure is after/before: the median images/s of the metric lines after the stop point
(from stop + --settle steps on, so that the resumed process's first steps are not counted) over the
median of the lines before it (from --warmup steps to the stop step). Both runs use the same windows,
so the uninterrupted run's ratio is the reference; the invariant asks for the resumed one to match it.
The median data-wait fraction of each window says whether a slowdown is input or compute. Beside it, the
ranks' CPU seconds per step (utime + stime of both rank processes, read from /proc at each metric line):
images/s moves with whatever else runs on the machine, CPU time per step hardly does, so its after/before
still shows extra work per step when the load changes between the windows. Load averages are printed at
the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.sample_data import digit_shards
from pretrain.dist import free_port
from pretrain.preemption import EXIT_REQUEUE, STOP_FILE_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = REPO / "configs" / "smoke.yaml"
CHECK_EVERY = 10  # PreemptionHandler's default: the ranks look at the stop file every 10 steps
# A metric line every 5 steps: the stop file is created at the line of step stop - 5, halfway between two
# stop checks (a line at a check step would race with that check, which follows it immediately).
LOG_EVERY = 5
EXIT_OK = 0


def launch(run_dir: Path, shards: Path, steps: int, stop_file: Path, extra: list[str]) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 --module pretrain.train` on the smoke recipe, output in run_dir/console.log."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
    cmd += ["pretrain.train", "--config", str(SMOKE), f"data.train={shards / 'train'}"]
    cmd += [f"data.val={shards / 'val'}", f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"]
    cmd += [f"schedule.steps={steps}", f"run.log_every={LOG_EVERY}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), STOP_FILE_ENV: str(stop_file)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "console.log", "a") as console:
        # A session of its own: on a timeout the launcher and its ranks are killed together.
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )


def train_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if "images_per_s" in m]


def rank_pids(root: int) -> list[int]:
    """The training ranks below the launcher `root` (its descendants running pretrain.train)."""
    parent, found = {}, []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    for pid in parent:
        up = pid
        while up in parent and up != root:
            up = parent[up]
        if up == root and pid != root:
            try:
                if b"pretrain.train" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:4]:
                    found.append(pid)
            except OSError:
                continue
    return sorted(found)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (all their threads: torch, gloo, DALI)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def follow(
    proc: subprocess.Popen,
    run_dir: Path,
    expected: int,
    timeout: float,
    stop_file: Path,
    stop_at: int | None = None,
) -> dict[int, float]:
    """Wait for the launch; create the stop file at the metric line of step `stop_at` - LOG_EVERY.

    Returns step -> CPU seconds per step of both ranks together since this launch's previous metric line,
    sampled when each line appears: unlike images/s, CPU time per step hardly moves with the machine's load
    (a process waiting for a core uses none), so it shows extra work even when other jobs share the cores.
    """
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    size, seen, pids = -1, None, []
    last: tuple[int, float] | None = None
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(
                f"resume_speed: {run_dir} ran past {timeout:.0f} s; see {run_dir / 'console.log'}"
            )
        now_size = metrics.stat().st_size if metrics.exists() else -1
        if now_size != size:
            size, lines = now_size, train_lines(run_dir)
            if seen is None:
                seen = len(lines)  # lines of an earlier launch of the same run
            if len(lines) > seen:
                seen = len(lines)
                pids = pids if len(pids) == 2 else rank_pids(proc.pid)
                step, used = lines[-1]["step"], cpu_seconds(pids)
                if last is not None and step > last[0]:
                    cpu[step] = (used - last[1]) / (step - last[0])
                last = (step, used)
                if stop_at is not None and step >= stop_at - LOG_EVERY:
                    stop_file.touch()  # seen at the ranks' next stop check, the step `stop_at`
        time.sleep(0.02)
    if proc.returncode != expected:
        raise SystemExit(
            f"resume_speed: {run_dir} exited with {proc.returncode}, expected {expected}; "
            f"see {run_dir / 'console.log'}"
        )
    return cpu


def uninterrupted(
    run_dir: Path, shards: Path, steps: int, extra: list[str], timeout: float
) -> dict[int, float]:
    stop_file = run_dir / "STOP"
    return follow(launch(run_dir, shards, steps, stop_file, extra), run_dir, EXIT_OK, timeout, stop_file)


def stop_and_resume(
    run_dir: Path, shards: Path, steps: int, stop: int, extra: list[str], timeout: float
) -> tuple[int, dict[int, float]]:
    """Stop at `stop` with the stop file, then resume to `steps`. Returns the step the first job saved at
    and the CPU seconds per step of both jobs."""
    stop_file = run_dir / "STOP"
    proc = launch(run_dir, shards, steps, stop_file, extra)
    cpu = follow(proc, run_dir, EXIT_REQUEUE, timeout, stop_file, stop_at=stop)
    stop_file.unlink(missing_ok=True)
    stopped = train_lines(run_dir)[-1]["step"]
    proc = launch(run_dir, shards, steps, stop_file, extra)
    cpu.update(follow(proc, run_dir, EXIT_OK, timeout, stop_file))
    return stopped, cpu


def windows(
    lines: list[dict], cpu: dict[int, float], stopped: int, warmup: int, settle: int
) -> dict[str, float]:
    """Median images/s, data-wait fraction, step time and CPU s/step before and after the stop point."""
    before = [m for m in lines if warmup <= m["step"] <= stopped]
    after = [m for m in lines if m["step"] >= stopped + settle]
    if not before or not after:
        raise SystemExit(f"resume_speed: no metric lines before or after step {stopped}; use more --steps")
    out = {}
    for name, part in (("before", before), ("after", after)):
        for key in ("images_per_s", "data_wait_fraction", "step_time_s"):
            out[f"{name}_{key}"] = statistics.median(m[key] for m in part)
        sampled = [cpu[m["step"]] for m in part if m["step"] in cpu]  # not a launch's first line
        out[f"{name}_cpu_s_per_step"] = statistics.median(sampled) if sampled else math.nan
    out["ratio"] = out["after_images_per_s"] / out["before_images_per_s"]
    out["cpu_ratio"] = out["after_cpu_s_per_step"] / out["before_cpu_s_per_step"]
    return out


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def describe(name: str, fig: dict[str, float]) -> str:
    return (
        f"{name:<14} before {fig['before_images_per_s']:6.0f} img/s "
        f"(data {100 * fig['before_data_wait_fraction']:4.1f}%, {1000 * fig['before_cpu_s_per_step']:.0f} CPU ms/step)"
        f"  after {fig['after_images_per_s']:6.0f} img/s "
        f"(data {100 * fig['after_data_wait_fraction']:4.1f}%, {1000 * fig['after_cpu_s_per_step']:.0f} CPU ms/step)"
        f"  after/before {fig['ratio']:.2f} (CPU per step {fig['cpu_ratio']:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each run (default 300)")
    parser.add_argument("--stop", type=int, default=100, help="step to stop the interrupted run at")
    parser.add_argument("--warmup", type=int, default=20, help="first step of the 'before' window")
    parser.add_argument("--settle", type=int, default=40, help="'after' window starts at stop + settle")
    parser.add_argument("--out", type=Path, default=None, help="folder for shards and runs (default: temp)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per launch before giving up")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="extra config overrides for every run (A/B tests)"
    )
    args = parser.parse_args(argv)
    if args.stop % CHECK_EVERY or not args.warmup < args.stop < args.steps - args.settle:
        parser.error(f"need warmup < stop < steps - settle and stop a multiple of {CHECK_EVERY}")
    out = args.out or Path(tempfile.mkdtemp(prefix="resume-speed-"))
    out.mkdir(parents=True, exist_ok=True)
    shards = digit_shards(out)
    runs = out / "runs"
    for name in ("uninterrupted", "resumed"):
        shutil.rmtree(runs / name, ignore_errors=True)  # this script's own previous runs

    print(f"{load_average()} (start); runs in {runs}", flush=True)
    t0 = time.time()
    cpu_a = uninterrupted(runs / "uninterrupted", shards, args.steps, args.overrides, args.timeout)
    stopped, cpu_b = stop_and_resume(
        runs / "resumed", shards, args.steps, args.stop, args.overrides, args.timeout
    )
    figs = {
        "uninterrupted": windows(
            train_lines(runs / "uninterrupted"), cpu_a, stopped, args.warmup, args.settle
        ),
        "resumed": windows(train_lines(runs / "resumed"), cpu_b, stopped, args.warmup, args.settle),
    }
    print(f"{args.steps} steps each, 2 ranks (deepspeed launcher); stop file at step {stopped}")
    for name, fig in figs.items():
        print(describe(name, fig))
    print(
        f"resume: after/before {figs['resumed']['ratio']:.2f} "
        f"(uninterrupted: {figs['uninterrupted']['ratio']:.2f}); CPU per step after/before "
        f"{figs['resumed']['cpu_ratio']:.2f} (uninterrupted: {figs['uninterrupted']['cpu_ratio']:.2f}); "
        f"{load_average()} (end); {time.time() - t0:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"stopped_at": stopped, "load": os.getloadavg(), **figs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
