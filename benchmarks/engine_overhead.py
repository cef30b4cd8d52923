"""Cost of the DeepSpeed ZeRO-3 engine: 2 ZeRO-3 ranks against one plain PyTorch process, same global batch.

    python benchmarks/engine_overhead.py                         # small CoAtNet-0 at 64x64, global batch 16
    python benchmarks/engine_overhead.py --steps 20 --batch 32 --image-size 96

One run of this script measures, one after the other on the same machine:
- plain, 2 threads: one process, torch threads = 2 (both cores), the whole global batch;
- plain, 1 thread:  the same on one core (the per-core reference);
- ZeRO-3, 2 ranks:  `torchrun --nproc_per_node 2` on this file, gloo, DeepSpeed's CPU accelerator, 1 thread
  per rank (so both sides use the same 2 cores), micro-batch = global batch / 2, no accumulation.

Both sides use the project's real components: the model from `pretrain.engine.build_model` (under
`deepspeed.zero.Init` for ZeRO-3; the same `create_model` call without it for plain), the DeepSpeed config
from `pretrain.ds_config.deepspeed_config` (typed `EngineConfig` / `OptimConfig`), torch's AdamW from
`pretrain.optim.build_optimizer` with its schedule, and the loss from `pretrain.losses.build_loss`.

Precision, and why the comparison is fair: DeepSpeed's bf16 mode casts the module to bf16 (forward and
backward run entirely in bf16, norms included) and keeps fp32 master weights, on which AdamW and gradient
clipping run. The plain process does exactly that by hand: a bf16 copy of the model computes, its gradients
are copied into an fp32 master model, the gradient norm is clipped and AdamW steps on the master, whose
values are copied back into the bf16 model. The arithmetic is thus the same on both sides; what differs is
what ZeRO-3 adds: parameter gathers and releases around each module, gradient reduce-scatter, partitioned
optimizer state and the engine's hooks. (bf16 autocast would instead run norms and softmax in fp32 and
recast weights every forward, a different precision policy rather than an engine cost.)

The input is synthetic (fixed random bf16 images and labels made before timing): this measures the
engine, not the data pipeline (see benchmarks/data_speed.py for that). Warm-up steps are excluded; the
figure per configuration is the median step time (for ZeRO-3, each step's slowest rank), with images/s.

By default `engine.param_persistence_threshold` is 0 so that every parameter of this small model is
partitioned, as nearly all of CoAtNet-5..7's are (DeepSpeed's default 1e5 elements would keep most of a
small model's tensors whole and hide the gather cost). `--gather-unit-elements 150000000` gathers each
block as one unit (`engine.gather_unit_elements`, `pretrain.engine.zero3_gather_units`; off by default
in the trainer, and so here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.config import EngineConfig, LossConfig, ModelConfig, OptimConfig, ScheduleConfig
from pretrain.dist import free_port
from pretrain.losses import build_loss
from pretrain.optim import build_optimizer, build_scheduler

ZERO3_RANKS = 2


# ============================================================================================ configuration


def model_config(args: argparse.Namespace) -> ModelConfig:
    """A small CoAtNet-0 (same family and block types as the paper's, fewer and narrower blocks)."""
    return ModelConfig(
        name="coatnet_0",
        image_size=args.image_size,
        depths=[1, 1, 2, 2, 1],
        dims=[32, 32, 64, 128, 256],
        head_dim=32,
        grad_checkpointing=args.grad_checkpointing,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        zero_stage=3,
        precision="bf16",
        global_batch_size=args.batch,
        param_persistence_threshold=args.persistence_threshold,
        gather_unit_elements=args.gather_unit_elements,
    )


def synthetic_batch(args: argparse.Namespace, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed images [size, 3, H, W] in bf16 (the loader's default output dtype) and labels [size]."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, args.image_size, args.image_size, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, args.num_classes, (size,), generator=gen)
    return images, labels


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_bytes(opt: torch.optim.Optimizer, master: list[torch.Tensor] | None = None) -> int:
    """fp32 master weights plus AdamW's moments and step counters held by this process.

    `master` defaults to the optimizer's own params (the plain process). ZeRO-3 hands its fp32 partitions
    to the wrapped torch optimizer only for the duration of `step()`, so the caller passes them.
    """
    if master is None:
        master = [p for g in opt.param_groups for p in g["params"]]
    states = [v for s in opt.state.values() for v in s.values()]
    return tensor_bytes(master) + tensor_bytes(states)


PHASES = ("forward", "backward", "update")


def clock_into(marks: list[float]) -> Callable[[], None]:
    """A `clock()` that appends the current time to `marks`."""
    return lambda: marks.append(time.perf_counter())


def resident_parameter_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this ZeRO-3 rank holds between steps: its partition (`ds_tensor`) of every parameter
    plus the whole tensor of those it keeps gathered (below the persistence threshold; released ones have
    an empty `data`). `pretrain.engine.local_parameter_count` counts only the partitions."""
    return sum(tensor_bytes([p.data, getattr(p, "ds_tensor", None)]) for p in model.parameters())


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], list[list[float]]]:
    """Seconds of each of `steps` calls of `step()` after `warmup` untimed ones, and of their phases.

    `step(clock)` calls `clock()` after the forward (loss included) and after the backward; the rest of
    the step is the update (gradient clipping, AdamW, for ZeRO-3 also the partition bookkeeping).
    """
    for _ in range(warmup):
        step(lambda: None)
    times, phases = [], []
    for _ in range(steps):
        marks = [time.perf_counter()]
        step(clock_into(marks))
        marks.append(time.perf_counter())
        times.append(marks[-1] - marks[0])
        phases.append([b - a for a, b in itertools.pairwise(marks)])
    return times, phases


# ============================================================================================ plain process


def run_plain(args: argparse.Namespace) -> dict:
    """One process, torch.optim.AdamW, bf16 compute weights + fp32 master weights (see module docstring)."""
    from pretrain.model import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, optim_cfg = model_config(args), OptimConfig()
    master = create_model(
        cfg.name, num_classes=args.num_classes, image_size=cfg.image_size, **cfg.overrides()
    )
    model = create_model(cfg.name, num_classes=args.num_classes, image_size=cfg.image_size, **cfg.overrides())
    model.load_state_dict(master.state_dict())
    model.to(torch.bfloat16).set_grad_checkpointing(cfg.grad_checkpointing)
    master.train(), model.train()
    optimizer = build_optimizer(master, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, ScheduleConfig(steps=10_000, warmup_steps=10), 1.0)
    loss_fn = build_loss(LossConfig(), args.num_classes)
    images, labels = synthetic_batch(args, args.batch, seed=0)
    pairs = list(zip(model.parameters(), master.parameters(), strict=True))

    def step(clock) -> None:
        loss = loss_fn(model(images), labels)
        clock()
        loss.backward()
        clock()
        for low, high in pairs:  # bf16 gradients -> fp32 master gradients
            high.grad = low.grad.float()
            low.grad = None
        torch.nn.utils.clip_grad_norm_(master.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            for low, high in pairs:
                low.copy_(high)  # fp32 master -> bf16 compute weights
            for low, high in zip(model.buffers(), master.buffers(), strict=True):
                high.copy_(low)  # BatchNorm running statistics follow the computing model

    times, phases = time_steps(step, args.warmup, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "times": times,
        "phases": phases,
        "threads": torch.get_num_threads(),
        "params": n_params,
        "param_bytes": tensor_bytes(model.parameters()),
        "optimizer_bytes": optimizer_bytes(optimizer),
    }


# ============================================================================================ ZeRO-3 ranks


def run_zero3(args: argparse.Namespace) -> dict | None:
    """One ZeRO-3 rank (started by torchrun). Returns the results on rank 0, None on the others."""
    from pretrain import dist
    from pretrain.ds_config import deepspeed_config
    from pretrain.engine import build_engine, build_model, full_parameter_count

    torch.set_num_threads(args.threads)
    info = dist.detect()
    if info.world_size != ZERO3_RANKS:
        raise ValueError(
            f"--role zero3 expects {ZERO3_RANKS} ranks from torchrun, got WORLD_SIZE={info.world_size}"
        )
    eng_cfg, optim_cfg, cfg = engine_config(args), OptimConfig(), model_config(args)
    dist.init_distributed(info, eng_cfg.timeout_minutes)
    micro = args.batch // info.world_size
    ds_config = deepspeed_config(eng_cfg, optim_cfg, micro_batch=micro, world_size=info.world_size)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=args.num_classes, ds_config=ds_config)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, ScheduleConfig(steps=10_000, warmup_steps=10), 1.0)
    engine = build_engine(
        model, optimizer, scheduler, ds_config, gather_unit_elements=eng_cfg.gather_unit_elements
    )
    loss_fn = build_loss(LossConfig(), args.num_classes)
    images, labels = synthetic_batch(args, micro, seed=1 + info.rank)

    def step(clock) -> None:
        loss = loss_fn(engine(images), labels)
        clock()
        engine.backward(loss)
        clock()
        engine.step()

    times, phases = time_steps(step, args.warmup, args.steps)
    local = {
        "times": times,
        "phases": phases,  # this rank's; the report shows rank 0's
        "threads": torch.get_num_threads(),
        "params": full_parameter_count(engine.module),
        "param_bytes": resident_parameter_bytes(engine.module),
        # The fp32 master and AdamW moments of this rank's shard (DeepSpeedZeroOptimizer_Stage3's flat partitions).
        "optimizer_bytes": optimizer_bytes(
            engine.optimizer.optimizer, master=list(engine.optimizer.fp32_partitioned_groups_flat)
        ),
    }
    every = dist.all_gather_object(local)
    dist.destroy()
    if not info.is_main:
        return None
    slowest = [max(step_times) for step_times in zip(*(r["times"] for r in every), strict=True)]
    return {
        **local,
        "times": slowest,
        "threads_per_rank": [r["threads"] for r in every],
        "param_bytes_per_rank": [r["param_bytes"] for r in every],
        "optimizer_bytes_per_rank": [r["optimizer_bytes"] for r in every],
        "micro_batch": micro,
        "accumulation": ds_config["gradient_accumulation_steps"],
    }


# ============================================================================================ driver


def child_args(args: argparse.Namespace, role: str, threads: int, out: Path) -> list[str]:
    return [
        __file__,
        "--role", role,
        "--threads", str(threads),
        "--result", str(out),
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--batch", str(args.batch),
        "--image-size", str(args.image_size),
        "--num-classes", str(args.num_classes),
        "--persistence-threshold", str(args.persistence_threshold),
        "--gather-unit-elements", str(args.gather_unit_elements),
    ] + (["--grad-checkpointing"] if args.grad_checkpointing else [])  # fmt: skip


def launch(args: argparse.Namespace, role: str, threads: int, workdir: Path) -> dict:
    """Run one configuration in fresh processes (own thread pools, own memory) and read its result file."""
    out = workdir / f"{role}-{threads}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if role == "zero3":
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ZERO3_RANKS)]
        cmd += ["--master_port", str(free_port())]
    else:
        cmd = [sys.executable]
    proc = subprocess.run(cmd + child_args(args, role, threads, out), env=env, capture_output=True, text=True)
    if not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{role} with {threads} thread(s) failed (exit {proc.returncode}); output above")
    if proc.returncode != 0:
        # The result is written (atomically) only after every rank finished timing; what fails afterwards
        # (teardown; `dist.run_and_exit` removed the gloo abort this tolerated) cannot change it.
        print(f"note: {role} exited {proc.returncode} after writing its result (teardown); result kept")
    return json.loads(out.read_text())


def write_result(path: Path, result: dict) -> None:
    """Write then rename, so that a process dying mid-write never leaves a readable half result."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def summary(result: dict, batch: int) -> tuple[float, float]:
    """(median step seconds, images/s at the global batch)."""
    median = statistics.median(result["times"])
    return median, batch / median


def spread(times: list[float]) -> str:
    """10th-90th percentile of the step times: how much the shared machine moved them."""
    if len(times) < 2:
        return "-"
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # never outside the data
    return f"{deciles[0]:.4f}-{deciles[-1]:.4f}"


def phase_medians(result: dict) -> str:
    per_phase = zip(*result["phases"], strict=True)
    return " ".join(f"{name} {statistics.median(v):.4f}" for name, v in zip(PHASES, per_phase, strict=True))


def merge(results: list[dict]) -> dict:
    """One configuration's repeats as one result: all timed steps pooled, the rest from the last repeat."""
    return {
        **results[-1],
        "times": [t for r in results for t in r["times"]],
        "phases": [p for r in results for p in r["phases"]],
    }


def report(args: argparse.Namespace, plain2: dict, plain1: dict, zero3: dict) -> dict:
    """Print the comparison table and return its figures."""
    mib = 2**20
    t2, ips2 = summary(plain2, args.batch)
    t1, ips1 = summary(plain1, args.batch)
    tz, ipsz = summary(zero3, args.batch)
    print(
        f"model: CoAtNet-0 small (depths [1,1,2,2,1], dims [32,32,64,128,256], head_dim 32), "
        f"{zero3['params'] / 1e6:.2f}M parameters, {args.image_size}x{args.image_size}, "
        f"{args.num_classes} classes, bf16, grad checkpointing {'on' if args.grad_checkpointing else 'off'}"
    )
    print(
        f"global batch {args.batch} (ZeRO-3: {zero3['micro_batch']} per rank x {ZERO3_RANKS} ranks, "
        f"accumulation {zero3['accumulation']}); {args.repeats} x {args.steps} timed steps per configuration, "
        f"each after {args.warmup} warm-up; "
        f"persistence threshold {args.persistence_threshold}; gather units up to {args.gather_unit_elements:,} "
        "elements; synthetic input"
    )
    rows = [
        (f"plain, {plain2['threads']} threads", plain2, t2, ips2, 2),
        (f"plain, {plain1['threads']} thread", plain1, t1, ips1, 1),
        (f"ZeRO-3, {ZERO3_RANKS} ranks x {zero3['threads_per_rank'][0]} thread", zero3, tz, ipsz, 2),
    ]
    header = f"{'configuration':<28} {'median step s':>14} {'min s':>7} {'p10-p90 s':>15} {'img/s':>8} {'img/s/core':>11}"
    print(header + "  median phases s (ZeRO-3: rank 0)")
    for name, result, t, ips, cores in rows:
        print(
            f"{name:<28} {t:>14.4f} {min(result['times']):>7.4f} {spread(result['times']):>15} {ips:>8.1f} "
            f"{ips / cores:>11.1f}  " + phase_medians(result)
        )
    print(f"ratio ZeRO-3 / plain (2 threads, same 2 cores): {tz / t2:.2f}x step time")
    print(f"ratio ZeRO-3 / plain (1 thread):                {tz / t1:.2f}x step time")
    # The fastest step approximates the uncontended cost: on this shared machine a 2-thread OpenMP process
    # loses whole time slices whenever another job holds one of its cores (bimodal step times).
    m2, m1, mz = min(plain2["times"]), min(plain1["times"]), min(zero3["times"])
    print(
        f"ratio of fastest steps (least disturbed by other load): {mz / m2:.2f}x vs 2 threads, {mz / m1:.2f}x vs 1"
    )
    print(
        f"per-core: ZeRO-3 reaches {ipsz / 2 / ips1:.0%} of one plain core's img/s per core "
        f"(ideal 2-rank step = plain 1-thread step / 2 = {t1 / 2:.4f} s)"
    )
    full_param = plain2["param_bytes"]
    for r, (pb, ob) in enumerate(
        zip(zero3["param_bytes_per_rank"], zero3["optimizer_bytes_per_rank"], strict=True)
    ):
        print(
            f"ZeRO-3 rank {r}: bf16 parameters {pb / mib:.2f} MiB ({pb / full_param:.0%} of full), "
            f"fp32 master + AdamW state {ob / mib:.2f} MiB ({ob / plain2['optimizer_bytes']:.0%} of full)"
        )
    print(
        f"plain process: bf16 parameters {full_param / mib:.2f} MiB, "
        f"fp32 master + AdamW state {plain2['optimizer_bytes'] / mib:.2f} MiB"
    )
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return {
        "global_batch": args.batch,
        "image_size": args.image_size,
        "plain_2threads_s": t2,
        "plain_1thread_s": t1,
        "zero3_s": tz,
        "ratio_vs_plain_2threads": tz / t2,
        "ratio_vs_plain_1thread": tz / t1,
        "min_ratio_vs_plain_2threads": mz / m2,
        "min_ratio_vs_plain_1thread": mz / m1,
        "zero3_param_bytes_per_rank": zero3["param_bytes_per_rank"],
        "zero3_optimizer_bytes_per_rank": zero3["optimizer_bytes_per_rank"],
        "plain_param_bytes": plain2["param_bytes"],
        "plain_optimizer_bytes": plain2["optimizer_bytes"],
        "load_average": list(os.getloadavg()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (in every process)")
    p.add_argument(
        "--repeats", type=int, default=2, help="rounds of the three configurations, interleaved; steps pooled"
    )
    p.add_argument("--batch", type=int, default=16, help=f"global batch (a multiple of {ZERO3_RANKS})")
    p.add_argument("--image-size", type=int, default=64, help="input resolution (divisible by 32)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--persistence-threshold", type=int, default=0, help="stage3_param_persistence_threshold")
    p.add_argument(
        "--gather-unit-elements",
        type=int,
        default=EngineConfig().gather_unit_elements,
        help="engine.gather_unit_elements: blocks up to this size are gathered in one go (0: layer by layer)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--role", choices=["plain", "zero3"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch % ZERO3_RANKS:
        p.error(f"--batch {args.batch} is not a multiple of {ZERO3_RANKS} ranks")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "plain":
        write_result(args.result, run_plain(args))
        return 0
    if args.role == "zero3":
        result = run_zero3(args)
        if result is not None:
            write_result(args.result, result)
        return 0
    runs: dict[str, list[dict]] = {"plain2": [], "plain1": [], "zero3": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every configuration
            runs["plain2"].append(launch(args, "plain", 2, workdir))
            runs["plain1"].append(launch(args, "plain", 1, workdir))
            runs["zero3"].append(launch(args, "zero3", 1, workdir))
    figures = report(args, merge(runs["plain2"]), merge(runs["plain1"]), merge(runs["zero3"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(main)
