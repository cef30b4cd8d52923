"""Where each byte of a ZeRO-3 rank goes, phase by phase: resident memory against what is accounted for.

    python benchmarks/memory_breakdown.py                         # CoAtNet-5 widths, 1 block per stage
    python benchmarks/memory_breakdown.py --depths ''             # CoAtNet-5 at full depth (~20 GB: alone)
    python benchmarks/memory_breakdown.py --json out.json

Two ranks under torchrun (gloo, DeepSpeed's CPU accelerator), the trainer's own components
(`pretrain.engine.build_model` under zero.Init, torch's fused AdamW from `pretrain.optim`, the DeepSpeed
config of `pretrain.ds_config`), bf16, activation checkpointing, batch 1 at 64 px, synthetic images.
For each phase (process set-up, model build, engine, two training steps split into forward / backward /
optimizer step, a checkpoint save, a load, the resume canary's forward and one more step), per rank:
- resident memory after the phase, and the phase's own peak (VmHWM, reset before each phase through
  /proc/self/clear_refs);
- what malloc holds in use (glibc mallinfo2: arena + mmapped bytes) -- resident minus that is memory the
  allocator keeps but nobody uses (fragmentation, freed arenas);
- the tensors DeepSpeed and the optimizer hold, by kind: bf16 parameter partitions, fp32 master
  partitions, the gradient partition buffer, Adam moments, ZeRO-3's reduce (IPG) bucket;
- /dev/shm bytes (DeepSpeed's shared-memory collectives).
The planner's per-rank figures for the same model (`pretrain.plan`) are printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> _Mallinfo2 | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    return libc.mallinfo2()


def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not got back (arenas + mmapped chunks); None off glibc."""
    info = _mallinfo()
    return None if info is None else int(info.uordblks + info.hblkhd)


def malloc_free() -> int | None:
    """Bytes free inside malloc's arenas: kept by the allocator, resident once touched."""
    info = _mallinfo()
    return None if info is None else int(info.fordblks)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Start a new VmHWM (Linux: writing 5 to clear_refs resets the peak resident set)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def shm_bytes() -> int:
    try:
        return sum(p.stat().st_size for p in Path("/dev/shm").iterdir() if p.is_file())
    except OSError:
        return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "numel"))


def deepspeed_holdings(engine) -> dict[str, int]:
    """Bytes of the tensors ZeRO-3 and the optimizer hold on this rank, by kind."""
    opt = engine.optimizer
    inner = opt.optimizer
    held = {
        "bf16 param partitions": tensor_bytes(getattr(opt, "fp16_partitioned_groups_flat", [])),
        "fp32 master partitions": tensor_bytes(getattr(opt, "fp32_partitioned_groups_flat", [])),
        "grad partition buffer": tensor_bytes([getattr(opt, "grad_partitions_flat_buffer", None)]),
        "Adam moments": tensor_bytes(v for s in inner.state.values() for v in s.values()),
    }
    bucket = [v for k, v in vars(opt).items() if "ipg_bucket_flat_buffer" in k]
    held["reduce bucket"] = tensor_bytes(bucket)
    persistent = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
    held["persistent params (whole)"] = tensor_bytes(p.data for p in persistent)
    return held


# ============================================================================================ one rank


def engine_config(args: argparse.Namespace):
    from pretrain.config import EngineConfig

    extra = {"max_reuse_distance": args.max_reuse_distance} if args.max_reuse_distance is not None else {}
    extra.update(json.loads(os.environ.get("MB_ENGINE", "{}")))
    return EngineConfig(
        zero_stage=3,
        precision="bf16",
        global_batch_size=2,
        param_persistence_threshold=args.persistence,
        **extra,
    )


def run_rank(args: argparse.Namespace) -> None:
    import torch

    from pretrain import dist
    from pretrain.config import LossConfig, ModelConfig, OptimConfig, ScheduleConfig
    from pretrain.ds_config import deepspeed_config
    from pretrain.engine import build_engine, build_model, untraced_forward
    from pretrain.losses import build_loss
    from pretrain.optim import build_optimizer, build_scheduler
    from pretrain.state import optimizer_moments

    torch.set_num_threads(1)
    info = dist.detect()
    phases: list[dict] = []
    reset_peak()

    def mark(name: str, engine=None) -> None:
        row = {
            "phase": name,
            "rss": _status_kib("VmRSS"),
            "peak": _status_kib("VmHWM"),
            "malloc": malloc_in_use(),
            "malloc_free": malloc_free(),
            "shm": shm_bytes(),
        }
        if os.environ.get("MEMORY_BREAKDOWN_TRIM"):
            t0 = time.perf_counter()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            row["trim_s"] = time.perf_counter() - t0
            row["rss_after_trim"] = _status_kib("VmRSS")
        if engine is not None:
            row["held"] = deepspeed_holdings(engine)
        phases.append(row)
        reset_peak()

    dist.init_distributed(info, 30)
    mark("set-up")
    depths = [int(d) for d in args.depths.split(",")] if args.depths else None
    model_cfg = ModelConfig(
        name=args.model, image_size=args.image_size, depths=depths, grad_checkpointing=True
    )
    eng_cfg = engine_config(args)
    optim_cfg = OptimConfig()
    ds = deepspeed_config(eng_cfg, optim_cfg, micro_batch=1, world_size=info.world_size)
    torch.manual_seed(0)
    model = build_model(model_cfg, num_classes=args.classes, ds_config=ds)
    mark("model build (zero.Init)")
    if args.build_only:  # a size whose optimizer cannot fit here: is the build itself at its share?
        phases[-1]["held"] = {
            "bf16 param partitions": tensor_bytes(p.ds_tensor for p in model.parameters()),
            "persistent params (whole)": tensor_bytes(
                p.data for p in model.parameters() if getattr(p, "ds_persist", False)
            ),
        }
        phases[-1]["share"] = 2 * sum(p.ds_numel for p in model.parameters()) // info.world_size
        every = dist.all_gather_object(phases)
        if info.is_main:
            Path(args.result).write_text(json.dumps(every))
        return
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, ScheduleConfig(steps=100, warmup_steps=1), 1.0)
    engine = build_engine(model, optimizer, scheduler, ds, gather_unit_elements=eng_cfg.gather_unit_elements)
    mark("engine (deepspeed.initialize)", engine)
    loss_fn = build_loss(LossConfig(), args.classes)
    gen = torch.Generator().manual_seed(1 + info.rank)
    images = torch.randn(1, 3, args.image_size, args.image_size, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, args.classes, (1,), generator=gen)
    for step in (1, 2):
        loss = loss_fn(engine(images), labels)
        mark(f"step {step} forward", engine)
        engine.backward(loss)
        mark(f"step {step} backward", engine)
        engine.step()
        mark(f"step {step} optimizer step", engine)
    optimizer_moments(engine)  # what the resume canary computes at every save and load
    mark("canary: Adam moments' sums", engine)
    folder = Path(args.work) / "ckpt"
    engine.save_checkpoint(str(folder), tag="t", save_latest=False)
    dist.barrier()
    mark("save_checkpoint", engine)
    # As in a resuming process, which has no Adam state yet when it loads: without this the old moments
    # would sit beside the loaded ones (a transient no real resume has).
    engine.optimizer.optimizer.state.clear()
    engine.load_checkpoint(str(folder), tag="t")
    dist.barrier()
    mark("load_checkpoint", engine)
    # What a resumed trainer does next: the canary's eval forward (untraced), then a training step.
    engine.eval()
    with torch.no_grad(), untraced_forward(engine):
        engine(images)
    engine.train()
    mark("canary forward after load", engine)
    loss = loss_fn(engine(images), labels)
    mark("step 3 forward", engine)
    engine.backward(loss)
    mark("step 3 backward", engine)
    engine.step()
    mark("step 3 optimizer step", engine)
    every = dist.all_gather_object(phases)
    if info.is_main:
        Path(args.result).write_text(json.dumps(every))


# ============================================================================================ driver


def planner_figures(args: argparse.Namespace) -> dict[str, float]:
    from pretrain import plan
    from pretrain.config import ModelConfig

    depths = [int(d) for d in args.depths.split(",")] if args.depths else None
    cfg = ModelConfig(name=args.model, image_size=args.image_size, depths=depths, grad_checkpointing=True)
    profile = plan.profile_model(cfg, args.classes, args.persistence)
    states = plan.model_states(profile, engine_config(args), 2)
    no_reserve = plan.Cluster(
        nodes=1, gpus_per_node=2, gpu_memory=64 * GIB, peak_tflops=1.0, mfu=1.0, link_gbytes=1.0, reserve=0
    )
    return {
        "parameters (M)": profile.params / 1e6,
        "bf16 params": states.params_bf16 / GIB,
        "fp32 master + Adam": states.master_and_adam / GIB,
        "bf16 grads": states.grads_bf16 / GIB,
        "gathered params": states.gathered_params / GIB,
        "gathered grads": states.gathered_grads / GIB,
        "fp32 grads at step": states.step_fp32_grads / GIB,
        "activations (ckpt)": plan.activation_bytes(profile, 1, True) / GIB,
        "total (training peak)": plan.peak_bytes(profile, states, no_reserve, 1, True) / GIB,
    }


def print_report(every: list[list[dict]], planned: dict[str, float]) -> None:
    def g(n: int | None) -> str:
        return "    -" if n is None else f"{n / GIB:5.2f}"

    print("\nper rank, GiB: resident after the phase / the phase's peak / malloc in use / /dev/shm")
    print(f"{'phase':32}" + "".join(f"{'rank ' + str(r):>28}" for r in range(len(every))))
    for i, row in enumerate(every[0]):
        cells = [
            f"{g(rank[i]['rss'])} {g(rank[i]['peak'])} {g(rank[i]['malloc'])} {g(rank[i]['shm'])}"
            for rank in every
        ]
        print(f"{row['phase']:32}" + "".join(f"{c:>28}" for c in cells))
    last = every[0][-1].get("held", {})
    print("\nheld by ZeRO-3 and the optimizer on rank 0 after the last phase, GiB")
    for name, n in last.items():
        print(f"  {name:28} {n / GIB:6.2f}")
    print(f"  {'total':28} {sum(last.values()) / GIB:6.2f}")
    if "share" in every[0][-1]:
        built = [rank[-1]["rss"] - rank[0]["rss"] for rank in every]
        peaks = [rank[-1]["peak"] for rank in every]
        share = every[0][-1]["share"]
        print(f"  {'bf16 share of the model':28} {share / GIB:6.2f}  (2 bytes x parameters / ranks)")
        print(
            "  resident growth over the build, per rank: "
            + ", ".join(f"{b / GIB:.2f} GiB ({b / share:.2f}x the share)" for b in built)
            + "; build peaks "
            + ", ".join(f"{x / GIB:.2f}" for x in peaks)
        )
    print("\nthe planner, per rank, GiB")
    for name, v in planned.items():
        print(f"  {name:28} {v:6.2f}" if "(M)" not in name else f"  {name:28} {v:6.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_5")
    p.add_argument("--depths", default="1,1,1,1,1", help="blocks per stage ('' for the variant's own)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--persistence", type=int, default=100_000, help="stage3_param_persistence_threshold")
    p.add_argument(
        "--max-reuse-distance", type=int, help="engine.max_reuse_distance (default: the config's default)"
    )
    p.add_argument(
        "--build-only",
        action="store_true",
        help="stop after the model build (CoAtNet-6/7: their optimizer states do not fit 2 ranks here)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--role", choices=["rank"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "rank":
        run_rank(args)
        return 0

    from pretrain.dist import free_port

    with tempfile.TemporaryDirectory(prefix="memory-breakdown-") as work:
        result = Path(work) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(free_port()), __file__, "--role", "rank", "--work", work]
        cmd += ["--result", str(result), "--model", args.model, "--depths", args.depths]
        cmd += ["--image-size", str(args.image_size), "--classes", str(args.classes)]
        cmd += ["--persistence", str(args.persistence)]
        if args.build_only:
            cmd += ["--build-only"]
        if args.max_reuse_distance is not None:
            cmd += ["--max-reuse-distance", str(args.max_reuse_distance)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if not result.exists():
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            print(f"memory_breakdown: the ranks failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        every = json.loads(result.read_text())
    planned = planner_figures(args)
    print(
        f"{args.model} depths {args.depths or 'variant'} at {args.image_size} px, 2 ranks, {time.monotonic() - t0:.0f} s"
    )
    print_report(every, planned)
    if args.json:
        args.json.write_text(json.dumps({"phases": every, "planner_gib": planned}, indent=1))
    return 0


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(main)
