"""Training and inference speed of a CoAtNet on this machine's CPU: images/s, GFLOP/s, matmul ratio, memory.

    python benchmarks/model_speed.py                      # CoAtNet-0 at 224, batch 16
    python benchmarks/model_speed.py --batch-size 8 --steps 2 --json out.json
    python benchmarks/model_speed.py --batch-size 8 --dtypes fp32 --modes infer --masks 3d 4d --interleave
    python benchmarks/model_speed.py --modes train --dtypes fp32 --compile   # eager vs torch.compile

Each configuration runs in its own process so that its peak resident memory is its own. Configurations:
fp32 / bf16 autocast; training (forward + backward, no optimizer step; activation checkpointing off and
on) and inference (eval mode, ``torch.inference_mode``); the attention-mask layout (``4d``, the model's,
or ``3d``, the layout before it, which keeps CPU attention on the unfused math kernel: for before/after
figures in one run); eager, and with ``--compile`` also ``torch.compile`` of the whole model (what
``engine.compile`` does). A configuration times ``--steps`` batches after one warm-up step (which, when
compiled, includes the compilation: reported as warm-up seconds). ``--interleave`` measures all mask
layouts in one process, alternating steps between them, for a before/after ratio that a drifting load
on a shared machine does not bias. Reported per configuration:
- images/s, from the median step time;
- achieved GFLOP/s: the model's FLOPs per image (training: forward+backward, 3x the forward FLOPs that
  torch's FlopCounterMode counts on the meta device, checkpointing's recomputation not counted, as in
  MFU; inference: the forward FLOPs) times images/s;
- the ratio of that to a plain square matmul's GFLOP/s in the same dtype, measured in the same process
  just before and just after the model (mean): how much of the machine's dense-math speed it reaches;
- peak RSS of the process and its growth over the steps (activations, gradients, workspace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import blocks, create_model

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
MODES = ("train", "infer")
MASKS = ("4d", "3d")


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def matmul_gflops(dtype: torch.dtype, n: int = 2048, min_seconds: float = 1.0) -> float:
    """Dense (n x n) @ (n x n) throughput in GFLOP/s, the machine's reference for this dtype.

    Repeats for at least ``min_seconds``: a bf16 2048^3 product takes only ~10 ms with AMX.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, oneDNN kernel selection
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / elapsed / 1e9


def train_flops_per_image(args: argparse.Namespace) -> float:
    """Forward + backward FLOPs of one image: 3x the forward FLOPs counted on the meta device.

    The backward is not counted by FlopCounterMode itself: torch 2.13's formula for
    convolution_backward ignores ``groups`` and charges a depthwise conv's backward 385x its forward
    (CoAtNet-0: 48 GFLOP instead of ~6.5). Backward = 2x forward (input and weight gradients) is exact
    for convs and matmuls up to the stem's unneeded input gradient.
    """
    with torch.device("meta"):
        model = build(args)
        x = torch.empty(1, 3, args.image_size, args.image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return 3 * counter.get_total_flops()


def build(args: argparse.Namespace):
    overrides = json.loads(args.overrides) if args.overrides else {}
    return create_model(args.model, image_size=args.image_size, **overrides)


def attention_3d_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The attention call as it was before the 4-D mask: the (heads, N, N) bias passed as it is."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def mask_layout(mask: str) -> contextlib.AbstractContextManager:
    """Run the model with the given attention-mask layout (``3d``: the previous formulation)."""
    if mask == "3d":
        return mock.patch.object(blocks, "biased_attention", attention_3d_mask)
    return contextlib.nullcontext()


def run_worker(args: argparse.Namespace) -> list[dict]:
    """Measure one configuration in this process, one row per mask layout in ``args.worker_masks``.

    With several layouts the steps alternate between them (3d, 4d, 3d, 4d, ...), so that a change of
    the machine's load hits every layout alike; each row reports the median of its step times.
    """
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    train = args.mode == "train"
    reference_before = matmul_gflops(dtype or torch.float32, min_seconds=args.matmul_seconds)
    model = build(args).train(train)
    model.set_grad_checkpointing(args.checkpointing)
    if args.compiled:
        model.compile(backend=args.compile_backend)  # in place, as engine.compile does
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rss_before = rss_mib()

    def step(mask: str) -> float:
        start = time.perf_counter()
        with mask_layout(mask):
            if train:
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    loss = model(x).float().logsumexp(1).mean()
                loss.backward()
            else:
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    model(x)
        return time.perf_counter() - start

    # Warm-up: allocates gradients, picks kernels, compiles (per layout: another graph when compiled).
    warmup = {mask: step(mask) for mask in args.worker_masks}
    times: dict[str, list[float]] = {mask: [] for mask in args.worker_masks}
    for _ in range(args.steps):
        for mask in args.worker_masks:
            times[mask].append(step(mask))
    # Measured on both sides of the model: the machine may be shared and its load may drift.
    reference = (
        reference_before + matmul_gflops(dtype or torch.float32, min_seconds=args.matmul_seconds)
    ) / 2
    flops = train_flops_per_image(args) / (1 if train else 3)
    rows = []
    for mask in args.worker_masks:
        step_s = statistics.median(times[mask])
        images_per_s = args.batch_size / step_s
        achieved = flops * images_per_s / 1e9
        rows.append(
            {
                "dtype": args.dtype,
                "mode": args.mode,
                "checkpointing": args.checkpointing,
                "mask": mask,
                "compiled": args.compiled,
                "images_per_s": images_per_s,
                "step_s": step_s,
                "step_times_s": times[mask],
                "warmup_s": warmup[mask],
                "gflops": achieved,
                "matmul_gflops": reference,
                "ratio_to_matmul": achieved / reference,
                "peak_rss_mib": peak_rss_mib(),
                "rss_growth_mib": peak_rss_mib() - rss_before,
            }
        )
    return rows


def configurations(args: argparse.Namespace) -> list[dict]:
    """Every (dtype, compiled, masks, mode, checkpointing) worker; checkpointing only in training.

    Each mask layout gets its own worker, or with ``--interleave`` all layouts share one.
    """
    out = []
    mask_groups = [args.masks] if args.interleave else [[m] for m in args.masks]
    for dtype in args.dtypes:
        for compiled in (False, True) if args.compile else (False,):
            for masks in mask_groups:
                for mode in args.modes:
                    for ckpt in (False, True) if mode == "train" else (False,):
                        out.append(
                            {"dtype": dtype, "compiled": compiled, "masks": masks, "mode": mode, "ckpt": ckpt}
                        )
    return out


def run_all(args: argparse.Namespace) -> list[dict]:
    """One subprocess per configuration so each peak-memory figure is that configuration's."""
    results = []
    for c in configurations(args):
        cmd = [sys.executable, __file__, "--worker", "--dtype", c["dtype"], "--mode", c["mode"]]
        cmd += ["--worker-masks", *c["masks"], *_shared_flags(args)]
        cmd += ["--checkpointing"] if c["ckpt"] else []
        cmd += ["--compiled"] if c["compiled"] else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark worker {c} failed:\n{out.stderr}")
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            results.append(row)
            print(format_row(row), flush=True)
    return results


def speedups(results: list[dict]) -> list[str]:
    """Lines comparing a 4d row with its 3d twin, and a compiled row with its eager twin."""

    def key(r: dict, **change) -> tuple:
        r = {**r, **change}
        return (r["dtype"], r["mode"], r["checkpointing"], r["mask"], r["compiled"])

    rows = {key(r): r for r in results}
    lines = []
    for r in results:
        for label, twin in (
            ("4d mask vs 3d", key(r, mask="3d")),
            ("compiled vs eager", key(r, compiled=False)),
        ):
            if (
                twin != key(r)
                and twin in rows
                and (r["mask"] == "4d" if label.startswith("4d") else r["compiled"])
            ):
                lines.append(
                    f"{label}: {r['dtype']} {r['mode']} ckpt={'on' if r['checkpointing'] else 'off'} "
                    f"mask={r['mask']} compiled={r['compiled']}: {r['images_per_s'] / rows[twin]['images_per_s']:.2f}x"
                )
    return lines


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model, "--image-size", str(args.image_size)]
    flags += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    flags += ["--matmul-seconds", str(args.matmul_seconds), "--compile-backend", args.compile_backend]
    return flags + (["--overrides", args.overrides] if args.overrides else [])


HEADER = (
    f"{'dtype':<5} {'mode':<5} {'ckpt':<4} {'mask':<4} {'comp':<4} {'img/s':>8} {'step s':>7} {'warm-up s':>9} "
    f"{'GFLOP/s':>8} {'matmul GFLOP/s':>14} {'ratio':>5} {'peak RSS MiB':>12} {'growth MiB':>10}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['dtype']:<5} {r['mode']:<5} {('on' if r['checkpointing'] else 'off'):<4} {r['mask']:<4} "
        f"{('yes' if r['compiled'] else 'no'):<4} {r['images_per_s']:>8.2f} {r['step_s']:>7.3f} "
        f"{r['warmup_s']:>9.1f} {r['gflops']:>8.1f} {r['matmul_gflops']:>14.1f} {r['ratio_to_matmul']:>5.2f} "
        f"{r['peak_rss_mib']:>12.0f} {r['rss_growth_mib']:>10.0f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coatnet_0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="duration of each matmul reference")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--masks", nargs="+", default=["4d"], choices=MASKS, help="3d: the attention-mask layout before 4d"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="measure all --masks in one process, alternating steps (robust to a drifting load; shared RSS)",
    )
    parser.add_argument("--compile", action="store_true", help="also measure every configuration compiled")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument(
        "--overrides", default="", help="config overrides as JSON, e.g. '{\"depths\": [1,1,1,1,1]}'"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-masks", nargs="+", choices=MASKS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    print(
        f"{args.model} at {args.image_size}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(HEADER, flush=True)
    results = run_all(args)
    for line in speedups(results):
        print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
