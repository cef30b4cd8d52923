"""Training speed of a CoAtNet on this machine's CPU: images/s, GFLOP/s, matmul ratio, peak memory.

    python benchmarks/model_speed.py                      # CoAtNet-0 at 224, batch 16
    python benchmarks/model_speed.py --batch-size 8 --steps 2 --json out.json

Each configuration (fp32 / bf16 autocast, activation checkpointing off / on) runs in its own process so
that its peak resident memory is its own. A configuration times forward + backward (no optimizer step)
over ``--steps`` batches after one warm-up step. Reported per configuration:
- images/s;
- achieved GFLOP/s: the model's forward+backward FLOPs (3x the forward FLOPs that torch's FlopCounterMode
  counts on the meta device; checkpointing's recomputation is not counted, as in MFU) times images/s;
- the ratio of that to a plain square matmul's GFLOP/s in the same dtype, measured in the same process
  just before and just after the model (mean): how much of the machine's dense-math speed it reaches;
- peak RSS of the process and its growth over the steps (activations, gradients, workspace).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import create_model

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


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


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process; returns the figures as a dict."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    reference_before = matmul_gflops(dtype or torch.float32, min_seconds=args.matmul_seconds)
    model = build(args).train()
    model.set_grad_checkpointing(args.checkpointing)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rss_before = rss_mib()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()

    step()  # warm-up: allocates gradients, picks kernels
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    images_per_s = args.batch_size * args.steps / elapsed
    # Measured on both sides of the model: the machine may be shared and its load may drift.
    reference = (
        reference_before + matmul_gflops(dtype or torch.float32, min_seconds=args.matmul_seconds)
    ) / 2
    achieved = train_flops_per_image(args) * images_per_s / 1e9
    return {
        "dtype": args.dtype,
        "checkpointing": args.checkpointing,
        "images_per_s": images_per_s,
        "gflops": achieved,
        "matmul_gflops": reference,
        "ratio_to_matmul": achieved / reference,
        "peak_rss_mib": peak_rss_mib(),
        "rss_growth_mib": peak_rss_mib() - rss_before,
    }


def run_all(args: argparse.Namespace) -> list[dict]:
    """One subprocess per (dtype, checkpointing) so each peak-memory figure is that configuration's."""
    results = []
    for dtype in args.dtypes:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, *_shared_flags(args)]
            if ckpt:
                cmd.append("--checkpointing")
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"benchmark worker {dtype} checkpointing={ckpt} failed:\n{out.stderr}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(format_row(results[-1]), flush=True)
    return results


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model, "--image-size", str(args.image_size)]
    flags += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    flags += ["--matmul-seconds", str(args.matmul_seconds)]
    return flags + (["--overrides", args.overrides] if args.overrides else [])


HEADER = (
    f"{'dtype':<5} {'ckpt':<5} {'img/s':>8} {'GFLOP/s':>9} {'matmul GFLOP/s':>15} {'ratio':>6} "
    f"{'peak RSS MiB':>13} {'growth MiB':>11}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['dtype']:<5} {('on' if r['checkpointing'] else 'off'):<5} {r['images_per_s']:>8.2f} "
        f"{r['gflops']:>9.1f} {r['matmul_gflops']:>15.1f} {r['ratio_to_matmul']:>6.2f} "
        f"{r['peak_rss_mib']:>13.0f} {r['rss_growth_mib']:>11.0f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coatnet_0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward steps")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="duration of each matmul reference")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--overrides", default="", help="config overrides as JSON, e.g. '{\"depths\": [1,1,1,1,1]}'"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    print(
        f"{args.model} at {args.image_size}, batch {args.batch_size}, forward+backward, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(HEADER, flush=True)
    results = run_all(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
