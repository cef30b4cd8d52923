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
The median data-wait fraction and step time of each window say whether a slowdown is input or compute.
Load averages are printed before and after: the machine is shared and its load moves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.sample_data import write_digits_folder
from pretrain.preemption import EXIT_REQUEUE, STOP_FILE_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = REPO / "configs" / "smoke.yaml"
CHECK_EVERY = 10  # PreemptionHandler's default: the ranks look at the stop file every 10 steps
# A metric line every 5 steps: the stop file is created at the line of step stop - 5, halfway between two
# stop checks (a line at a check step would race with that check, which follows it immediately).
LOG_EVERY = 5
EXIT_OK = 0


def build_shards(out: Path) -> Path:
    """Digits at 32x32 as webdataset shards (80/20 train/val), through the real build command."""
    shards = out / "shards"
    if (shards / "train" / "manifest.json").exists():
        return shards
    write_digits_folder(out / "images", image_size=32, label_set="digits")
    cmd = [str(BIN / "coatnet-data"), "build", str(out / "images"), str(shards)]
    cmd += ["--shard-size", "256", "--val-fraction", "0.2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait(proc: subprocess.Popen, run_dir: Path, expected: int, timeout: float) -> None:
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(
            f"resume_speed: {run_dir} ran past {timeout:.0f} s; see {run_dir / 'console.log'}"
        ) from None
    if status != expected:
        raise SystemExit(
            f"resume_speed: {run_dir} exited with {status}, expected {expected}; "
            f"see {run_dir / 'console.log'}"
        )


def uninterrupted(run_dir: Path, shards: Path, steps: int, extra: list[str], timeout: float) -> None:
    proc = launch(run_dir, shards, steps, run_dir / "STOP", extra)
    wait(proc, run_dir, EXIT_OK, timeout)


def stop_and_resume(
    run_dir: Path, shards: Path, steps: int, stop: int, extra: list[str], timeout: float
) -> int:
    """Stop near `stop` with the stop file, then resume to `steps`. Returns the step the first job saved at."""
    stop_file = run_dir / "STOP"
    proc = launch(run_dir, shards, steps, stop_file, extra)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        done = train_lines(run_dir)
        if done and done[-1]["step"] >= stop - LOG_EVERY:
            stop_file.touch()  # seen at the next multiple of CHECK_EVERY
            break
        time.sleep(0.02)
    wait(proc, run_dir, EXIT_REQUEUE, max(1.0, deadline - time.monotonic()))
    stop_file.unlink(missing_ok=True)
    stopped = train_lines(run_dir)[-1]["step"]
    wait(launch(run_dir, shards, steps, stop_file, extra), run_dir, EXIT_OK, timeout)
    return stopped


def windows(lines: list[dict], stopped: int, warmup: int, settle: int) -> dict[str, float]:
    """Median images/s, data-wait fraction and step time before and after the stop point."""
    before = [m for m in lines if warmup <= m["step"] <= stopped]
    after = [m for m in lines if m["step"] >= stopped + settle]
    if not before or not after:
        raise SystemExit(f"resume_speed: no metric lines before or after step {stopped}; use more --steps")
    out = {}
    for name, part in (("before", before), ("after", after)):
        for key in ("images_per_s", "data_wait_fraction", "step_time_s"):
            out[f"{name}_{key}"] = statistics.median(m[key] for m in part)
    out["ratio"] = out["after_images_per_s"] / out["before_images_per_s"]
    return out


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def describe(name: str, fig: dict[str, float]) -> str:
    return (
        f"{name:<14} before {fig['before_images_per_s']:6.0f} img/s "
        f"(data {100 * fig['before_data_wait_fraction']:4.1f}%, {1000 * fig['before_step_time_s']:.1f} ms/step)"
        f"  after {fig['after_images_per_s']:6.0f} img/s "
        f"(data {100 * fig['after_data_wait_fraction']:4.1f}%, {1000 * fig['after_step_time_s']:.1f} ms/step)"
        f"  after/before {fig['ratio']:.2f}"
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
    shards = build_shards(out)
    runs = out / "runs"
    for name in ("uninterrupted", "resumed"):
        shutil.rmtree(runs / name, ignore_errors=True)  # this script's own previous runs

    print(f"{load_average()} (start); runs in {runs}", flush=True)
    t0 = time.time()
    uninterrupted(runs / "uninterrupted", shards, args.steps, args.overrides, args.timeout)
    stopped = stop_and_resume(runs / "resumed", shards, args.steps, args.stop, args.overrides, args.timeout)
    figs = {
        "uninterrupted": windows(train_lines(runs / "uninterrupted"), stopped, args.warmup, args.settle),
        "resumed": windows(train_lines(runs / "resumed"), stopped, args.warmup, args.settle),
    }
    print(f"{args.steps} steps each, 2 ranks (deepspeed launcher); stop file at step {stopped}")
    for name, fig in figs.items():
        print(describe(name, fig))
    print(
        f"resume: after/before {figs['resumed']['ratio']:.2f} "
        f"(uninterrupted: {figs['uninterrupted']['ratio']:.2f}); {load_average()} (end); "
        f"{time.time() - t0:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"stopped_at": stopped, "load": os.getloadavg(), **figs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
