"""CoAtNet-5 at full width on the CPU twin: trains, stops, resumes bitwise, exports and fine-tunes.

    python benchmarks/full_size.py                          # coatnet_5, 1000-class head, 64 px, 2 ranks
    python benchmarks/full_size.py --depths 1,1,1,1,1       # the CI twin: CoAtNet-5's widths, 1 block/stage
    python benchmarks/full_size.py --json out.json --out /tmp/full

One invocation, with the real `deepspeed` launcher on 2 CPU ranks (ZeRO-3, bf16, activation
checkpointing, batch 1 per rank) over scikit-learn's digits as webdataset shards:
1. an uninterrupted run of --steps steps;
2. the same command with a stop file (what cluster/launch.sh writes on Slurm's warning signal) once step
   --stop-after is logged: the ranks save at the next step and exit with the requeue status; then the same
   command again resumes and trains to --steps. Its losses must equal the first run's, bitwise;
3. `coatnet-export` of that checkpoint (fp32 safetensors);
4. a fine-tune from the export at --finetune-size on another label set (digit parity, 2 classes): head
   re-initialised, every relative-bias table resized, pre-logits kept; one step.

While each process runs, its resident memory is sampled every 0.2 s (psutil). Printed: phase times
(build, step, save, load, export), per rank the memory after set-up (imports, process group, loaders)
and the peak, what ZeRO-3 holds on disk per rank (the optimizer shard: fp32 master weights and Adam
moments), and the planner's figures for the same setting (pretrain.plan, the model measured on the meta
device) beside the measured ones. A gap above 15% on the total per rank is a bug in the code or in the
planner. Needs about 20 GB of memory for CoAtNet-5 (run it alone) and 26 GB of disk under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from data_pipeline.sample_data import digit_shards
from pretrain.dist import free_port
from pretrain.preemption import EXIT_REQUEUE, STOP_FILE_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIB = 2**30
EXIT_OK = 0
GAP_LIMIT = 0.15


# ============================================================================================ one launch


@dataclass
class Launch:
    """What one process tree did: its status, rank 0's console lines with their times, peak memory."""

    rc: int
    seconds: float
    lines: list[tuple[float, str]]
    peak: dict[str, int] = field(default_factory=dict)  # process label -> peak resident bytes
    samples: list[tuple[float, str, int]] = field(default_factory=list)  # (time, label, resident bytes)

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        for t, line in self.lines:
            match = re.search(pattern, line)
            if match:
                return t, match
        return None

    def all(self, pattern: str) -> list[tuple[float, re.Match]]:
        return [(t, m) for t, line in self.lines if (m := re.search(pattern, line))]

    def peak_after(self, label: str) -> str:
        """The last console line before the process's peak sample: the phase the peak belongs to."""
        when = max((rss, -t) for t, lab, rss in self.samples if lab == label)[1] * -1
        before = [line for t, line in self.lines if t <= when]
        return f"{when:.0f} s, after: {before[-1][:100]}" if before else f"{when:.0f} s"

    def resident_at(self, label: str, when: float) -> int:
        """The process's resident bytes at the last sample before `when`."""
        before = [rss for t, lab, rss in self.samples if lab == label and t <= when]
        return before[-1] if before else 0


def _label(proc: psutil.Process) -> str | None:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return None
    rank = next((a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")), None)
    if "pretrain.train" in cmd and rank is not None:  # a rank (the launcher's command names the module too)
        return f"rank {rank}"
    if any(a.endswith("coatnet-export") for a in cmd[:2]):
        return "export"
    return None


def run(cmd: list[str], env: dict[str, str], log: Path, on_line=None) -> Launch:
    """Run `cmd`, timestamp its output into `log`, sample its processes' resident memory."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    samples: list[tuple[float, str, int]] = []
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            now = time.monotonic() - t0
            for p in procs:
                label = _label(p)
                if label:
                    with contextlib.suppress(psutil.Error):
                        samples.append((now, label, p.memory_info().rss))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    with log.open("w") as out:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.monotonic() - t0
            lines.append((t, line.rstrip()))
            out.write(f"{t:8.1f} {line}")
            out.flush()
            if on_line:
                on_line(line)
    rc = proc.wait()
    done.set()
    sampler.join()
    peak: dict[str, int] = {}
    for _, label, rss in samples:
        peak[label] = max(peak.get(label, 0), rss)
    return Launch(rc, time.monotonic() - t0, lines, peak, samples)


def train_cmd(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
    cmd += [
        "pretrain.train",
        "--config",
        str(config),
        f"run.output_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
    ]
    return cmd + list(overrides)


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            out[entry["step"]] = entry["loss"]
    return out


def check(launch: Launch, expected: int, what: str, log: Path) -> None:
    if launch.rc != expected:
        tail = "\n".join(line for _, line in launch.lines[-40:])
        peaks = ", ".join(f"{label} {rss / GIB:.2f}" for label, rss in sorted(launch.peak.items()))
        raise SystemExit(
            f"{what}: exit status {launch.rc}, expected {expected} (log {log}); peak resident GiB: {peaks}\n{tail}"
        )


# ============================================================================================ figures


def phase_times(launch: Launch) -> dict[str, float]:
    """Seconds of the phases rank 0's log shows: build (model + engine), steps, save, load."""
    out: dict[str, float] = {}
    setup = launch.first(r"run folder ")
    built = launch.first(r"M parameters")
    if setup and built:
        out["build_s"] = built[0] - setup[0]
    steps = [t for t, _ in launch.all(r"step \d+/\d+ ")]
    if len(steps) >= 2:
        gaps = sorted(b - a for a, b in itertools.pairwise(steps))
        out["step_s"] = gaps[len(gaps) // 2]
    saves = [float(m.group(1)) for _, m in launch.all(r"committed in ([0-9.]+) s")]
    if saves:
        out["save_s"] = max(saves)
    loaded = launch.first(r"resumed from .* in ([0-9.]+) s")
    if loaded:
        out["load_s"] = float(loaded[1].group(1))
    return out


def memory(launch: Launch) -> dict[str, dict[str, float]]:
    """Per rank: resident GiB after set-up (at the 'run folder' line), after the build, and the peak."""
    setup = launch.first(r"run folder ")
    built = launch.first(r"M parameters")
    out = {}
    for label in sorted(launch.peak):
        out[label] = {
            "setup_gib": launch.resident_at(label, setup[0]) / GIB if setup else 0.0,
            "built_gib": launch.resident_at(label, built[0]) / GIB if built else 0.0,
            "peak_gib": launch.peak[label] / GIB,
            "peak_after": launch.peak_after(label),
        }
    return out


def zero3_shards(checkpoint: Path) -> dict[str, float]:
    """GiB on disk per rank: the optimizer shard (fp32 master + Adam moments) and the model states."""
    out = {}
    for f in sorted(checkpoint.glob("*_optim_states.pt")):
        rank = re.search(r"rank_(\d+)", f.name)
        out[f"rank {rank.group(1) if rank else '?'} optimizer shard"] = f.stat().st_size / GIB
    for f in sorted(checkpoint.glob("*_model_states.pt")):
        rank = re.search(r"rank_(\d+)", f.name)
        out[f"rank {rank.group(1) if rank else '?'} model states"] = f.stat().st_size / GIB
    return out


def planner(config: Path, overrides: list[str], num_classes: int) -> dict[str, float]:
    """pretrain.plan's per-rank figures (GiB) for the same setting on 2 ranks, nothing reserved."""
    from pretrain.config import load_config
    from pretrain.plan import Cluster, make_plan

    cfg = load_config(str(config), overrides)
    cluster = Cluster(
        nodes=1, gpus_per_node=2, gpu_memory=64 * GIB, peak_tflops=1.0, mfu=1.0, link_gbytes=1.0, reserve=0
    )
    plan = make_plan(cfg, cluster, config.name, num_classes)
    s = plan.states
    ckpt = cfg.model.grad_checkpointing
    return {
        "parameters (M)": plan.profile.params / 1e6,
        "bf16 parameter shard": s.params_bf16 / GIB,
        "fp32 master + Adam shard": s.master_and_adam / GIB,
        "bf16 gradient shard": s.grads_bf16 / GIB,
        "gathered parameters": s.gathered_params / GIB,
        "gathered gradients": s.gathered_grads / GIB,
        "fp32 gradients at the step": s.step_fp32_grads / GIB,
        "activations": plan.activations[ckpt] / GIB,
        "total": plan.peak[ckpt] / GIB,
    }


# ============================================================================================ main


def write_config(out: Path, args: argparse.Namespace, shards: Path) -> Path:
    """The benchmark's recipe: configs/smoke.yaml's path (digits, ZeRO-3, bf16) at CoAtNet-5's size."""
    depths = f"[{args.depths}]" if args.depths else "null"
    text = f"""# written by benchmarks/full_size.py
base: {REPO / "configs" / "smoke.yaml"}
run:
  log_every: 1
  eval_every: 0
  stop_check_s: 0.2
model:
  name: {args.model}
  image_size: {args.image_size}
  num_classes: {args.classes}
  depths: {depths}
  dims: null
  head_dim: null
  pre_logits: null
  grad_checkpointing: true
data:
  train: {shards / "train"}
  val: null
  batch_size: 1
  num_threads: 1
schedule:
  steps: {args.steps}
  warmup_steps: 1
engine:
  precision: bf16
  zero_stage: 3
  param_persistence_threshold: 100000
checkpoint:
  every_steps: 0
  keep_last: 1
tracking:
  enabled: false
"""
    path = out / "full_size.yaml"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coatnet_5")
    parser.add_argument("--classes", type=int, default=1000, help="pre-training head size (default 1000)")
    parser.add_argument(
        "--depths", default="", help="blocks per stage, e.g. 1,1,1,1,1 (default: the variant's)"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--finetune-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stop-after", type=int, default=2, help="stop file once this step is logged")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 0 < args.stop_after < args.steps - 1:
        parser.error("--stop-after must leave at least one step after the stop step")

    out = args.out or Path(tempfile.mkdtemp(prefix="full-size-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("straight", "stopped", "tuned"):
        shutil.rmtree(out / name, ignore_errors=True)
    load_start = os.getloadavg()
    shards = digit_shards(out / "digits", image_size=32, label_set="digits")
    parity = digit_shards(out / "parity", image_size=64, label_set="parity")
    config = write_config(out, args, shards)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop(STOP_FILE_ENV, None)
    print(
        f"{args.model} at {args.image_size} px, {args.classes} classes, 2 ranks; work folder {out}",
        flush=True,
    )

    straight_dir = out / "straight"
    straight = run(train_cmd(config, straight_dir), env, out / "straight.log")
    check(straight, EXIT_OK, "uninterrupted run", out / "straight.log")
    print(f"uninterrupted: {straight.seconds:.0f} s", flush=True)

    stopped_dir = out / "stopped"
    stop_file = out / "STOP"
    stop_file.unlink(missing_ok=True)
    pattern = re.compile(rf"step {args.stop_after}/{args.steps} ")

    def request_stop(line: str) -> None:
        if pattern.search(line):
            stop_file.touch()

    stop_env = {**env, STOP_FILE_ENV: str(stop_file)}
    first = run(train_cmd(config, stopped_dir), stop_env, out / "stopped-1.log", request_stop)
    check(first, EXIT_REQUEUE, "stopped run", out / "stopped-1.log")
    stop_file.unlink(missing_ok=True)
    second = run(train_cmd(config, stopped_dir), stop_env, out / "stopped-2.log")
    check(second, EXIT_OK, "resumed run", out / "stopped-2.log")
    expected, got = losses(straight_dir), losses(stopped_dir)
    bitwise = expected == got and len(expected) == args.steps
    print(
        f"stop + resume: {first.seconds:.0f} + {second.seconds:.0f} s; losses bitwise equal: {bitwise}",
        flush=True,
    )

    export = out / "pre.safetensors"
    exported = run(
        [str(BIN / "coatnet-export"), str(stopped_dir / "checkpoints"), str(export), "--force"],
        env,
        out / "export.log",
    )
    check(exported, EXIT_OK, "export", out / "export.log")

    tuned_dir = out / "tuned"
    tune = [
        f"model.image_size={args.finetune_size}",
        "model.num_classes=null",
        f"data.train={parity / 'train'}",
        f"init.path={export}",
        "schedule.steps=1",
        "schedule.warmup_steps=0",
    ]
    tuned = run(train_cmd(config, tuned_dir, *tune), env, out / "tuned.log")
    check(tuned, EXIT_OK, "fine-tune", out / "tuned.log")
    tuned_loss = losses(tuned_dir)
    resized = json.loads((tuned_dir / "init_report.json").read_text())

    checkpoint = max((stopped_dir / "checkpoints").glob("step_*"))
    depth_override = [f"model.depths=[{args.depths}]"] if args.depths else []
    figures = {
        "setting": {
            "model": args.model,
            "depths": args.depths or "variant",
            "image_size": args.image_size,
            "classes": args.classes,
            "ranks": 2,
            "batch_per_rank": 1,
        },
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "phases": {
            "uninterrupted": phase_times(straight),
            "stopped": phase_times(first),
            "resumed": phase_times(second),
            "export_s": exported.seconds,
            "finetune": phase_times(tuned),
        },
        "memory": {
            "uninterrupted": memory(straight),
            "resumed": memory(second),
            "export_peak_gib": exported.peak.get("export", 0) / GIB,
            "finetune": memory(tuned),
        },
        "zero3_on_disk_gib": zero3_shards(checkpoint),
        "planner_gib": planner(config, depth_override, args.classes),
        "resume_bitwise_equal": bitwise,
        "losses": {"uninterrupted": expected, "stop_and_resume": got},
        "export_gib": export.stat().st_size / GIB,
        "finetune": {
            "loss": tuned_loss,
            "resized": len(resized["resized"]),
            "reinitialised": resized["reinitialised"],
        },
    }
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if bitwise else 1


def print_table(f: dict) -> None:
    s = f["setting"]
    print(
        f"\n{s['model']} (depths {s['depths']}) at {s['image_size']} px, {s['classes']} classes, 2 CPU ranks"
    )
    print(f"load average: start {f['load_average']['start'][0]:.1f}, end {f['load_average']['end'][0]:.1f}")
    print("\nphase                      seconds")
    for run_name in ("uninterrupted", "stopped", "resumed", "finetune"):
        for key, value in f["phases"][run_name].items():
            print(f"  {run_name + ' ' + key:<25}{value:8.1f}")
    print(f"  {'export':<25}{f['phases']['export_s']:8.1f}")
    print("\nresident memory per rank (GiB)   after set-up  after build   peak")
    for run_name in ("uninterrupted", "resumed", "finetune"):
        for label, m in f["memory"][run_name].items():
            print(
                f"  {run_name + ' ' + label:<30}{m['setup_gib']:10.2f}{m['built_gib']:12.2f}{m['peak_gib']:9.2f}"
                f"   peak at {m['peak_after']}"
            )
    print(f"  {'export process peak':<30}{'':22}{f['memory']['export_peak_gib']:9.2f}")
    print("\nZeRO-3 on disk per rank (GiB)")
    for key, value in f["zero3_on_disk_gib"].items():
        print(f"  {key:<30}{value:8.2f}")
    plan = f["planner_gib"]
    print("\nplanner per rank (GiB, pretrain.plan, nothing reserved)")
    for key, value in plan.items():
        print(f"  {key:<30}{value:8.2f}")
    measured = {label: m["peak_gib"] - m["setup_gib"] for label, m in f["memory"]["uninterrupted"].items()}
    for label, value in measured.items():
        gap = value / plan["total"] - 1 if plan["total"] else 0.0
        flag = "" if abs(gap) <= GAP_LIMIT else f"  (gap above {GAP_LIMIT:.0%})"
        print(
            f"  measured {label} peak - set-up: {value:.2f} GiB, planner total {plan['total']:.2f}: {gap:+.0%}{flag}"
        )
    shard = f["zero3_on_disk_gib"].get("rank 0 optimizer shard", 0.0)
    if plan["fp32 master + Adam shard"]:
        print(f"  optimizer shard on disk / planned: {shard / plan['fp32 master + Adam shard']:.2f}")
    print(f"\nresume bitwise equal: {f['resume_bitwise_equal']}; export {f['export_gib']:.2f} GiB")
    ft = f["finetune"]
    print(
        f"fine-tune: loss {ft['loss']}, {ft['resized']} bias tables resized, re-initialised {ft['reinitialised']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
