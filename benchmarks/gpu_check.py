"""One GPU, one command, at most 8 minutes: the figures the first day with a GPU must produce, as one JSON.

    python benchmarks/gpu_check.py --out DIR        # writes DIR/gpu_check.json (and prints it)

Sections (each one runs in try/except: a failure is an "error" string in its section, the rest runs;
on a GPU each runs in its own process, so that an out-of-memory or a crashed kernel costs one section):

- env: versions, the device, which optional packages import, a bf16 matmul's TFLOP/s (the practical peak).
- attention: which scaled_dot_product_attention kernel CoAtNet's relative attention runs (aten ops and
  kernel names seen by torch.profiler), and whether the relative-bias table's gradient matches an fp32
  reference through the math kernel (bf16 on the chosen kernel; fp32 on the chosen kernel).
- train: 1-rank ZeRO-3 bf16 steps (the trainer's own build_model / build_optimizer / build_engine) of
  CoAtNet-0 and CoAtNet-5 at 224, with and without activation checkpointing: img/s, step time, peak
  allocated/reserved memory beside `coatnet-plan`'s prediction for the same setting, MFU from the
  model's MACs (pretrain.model.count_macs). Input: synthetic bf16 batches made on the device (labelled).
- checkpoint: save and resume through pretrain.checkpoint.CheckpointManager on the device (manifest,
  digests, signature), the continuation compared with the uninterrupted steps, BatchNorm dtypes after.
- determinism: the same three CoAtNet-0 steps run twice with engine.deterministic on and twice with it
  off: bitwise equal or not, the spread, or the op that refused (docs/determinism.md).
- decode: DALI `mixed` (nvJPEG) decode + random-resized-crop images/s against DALI's CPU decoder, with
  the loader's nvJPEG sizing, when DALI imports and JPEGs exist (--jpegs DIR, or made with PIL);
  otherwise a record saying so (the train section's input is synthetic either way).

Without a GPU it runs its CPU twin on tiny sizes (a tiny CoAtNet, a few steps, seconds), in one process:
tests/test_gpu_check.py checks the JSON. `"twin": true` marks those figures as meaningless for speed.

What the machine needs: torch. DeepSpeed, PyYAML (pretrain.config) and numpy are used when they import;
without DeepSpeed the train and checkpoint sections run plain torch (bf16 autocast, fused AdamW,
torch.save) and say so in "engine". The device machine lent to this project has torch 2.11 + CUDA 13 on
Python 3.12 and no package registry; bring DeepSpeed 0.19.8 as wheels (about 30 MB in all) like this:

    # on a machine with a registry (any OS; the wheels are for the device: CPython 3.12, x86_64 Linux)
    pip download deepspeed==0.19.8 --no-deps -d wheels/          # an sdist, 2 MB
    DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation wheels/deepspeed-0.19.8.tar.gz -w wheels/
    rm wheels/deepspeed-0.19.8.tar.gz                             # -> deepspeed-0.19.8-py3-none-any.whl
    pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \\
        -d wheels/ hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \\
        msgpack psutil py-cpuinfo einops ninja tqdm packaging numpy pyyaml
    # carry wheels/ into the working tree (the run tool's `carry`, 64 MiB), then on the device:
    pip install --no-index --no-deps --target .gpu_deps wheels/*.whl
    PYTHONPATH=.gpu_deps:$PWD python benchmarks/gpu_check.py --out $OUT

(`pip wheel` needs torch where it runs; DS_BUILD_OPS=0 builds no CUDA op: ZeRO-3 with torch's AdamW needs
none.) DALI for the decode section is ~600 MB of wheels (nvidia-dali-cuda130, nvimgcodec, nvjpeg ...),
too big to carry: that section reports DALI as absent on such a machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GIB = 2**30
BUDGET_S = 480  # the whole command, GPU sizes
NUM_CLASSES = 1000
TINY = {"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}


@dataclass(frozen=True)
class Sizes:
    """What the sections run: full sizes on a GPU, a tiny twin on a CPU."""

    twin: bool
    image_size: int
    models: tuple[tuple[str, int], ...]  # (variant, micro-batch per rank)
    overrides: dict = field(default_factory=dict)  # architecture overrides (the twin's tiny CoAtNets)
    warmup: int = 3
    steps: int = 10
    attention: tuple[int, int, int, int] = (
        32,
        14,
        384,
        32,
    )  # batch, grid side, width, head size (CoAtNet-0 S3)
    determinism_batch: int = 32
    decode_images: int = 256
    num_classes: int = NUM_CLASSES

    @staticmethod
    def for_device(cuda: bool) -> Sizes:
        if cuda:
            return Sizes(twin=False, image_size=224, models=(("coatnet_0", 128), ("coatnet_5", 64)))
        return Sizes(
            twin=True,
            image_size=32,
            models=(("coatnet_0", 4), ("coatnet_5", 4)),
            overrides=TINY,
            warmup=1,
            steps=2,
            attention=(2, 4, 32, 16),
            determinism_batch=4,
            decode_images=16,
            num_classes=10,
        )


# ================================================================================================ helpers


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a benchmark: timing needs the GPU to have finished


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _error(exc: BaseException) -> dict[str, str]:
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc))[-3000:],
    }


def _engine_kind() -> tuple[str, str | None]:
    """'deepspeed' when it and the trainer's config (PyYAML) import, else 'torch' and the reason."""
    missing = [m for m in ("deepspeed", "yaml") if not _has(m)]
    if missing:
        return (
            "torch",
            f"{' and '.join(missing)} not importable: plain torch bf16 autocast + fused AdamW instead",
        )
    return "deepspeed", None


def _init_dist_once() -> torch.device:
    """One rank, the trainer's own process-group set-up (NCCL on a GPU, gloo on a CPU)."""
    from pretrain import dist

    if not dist.is_initialized():
        return dist.init_distributed(dist.detect(), timeout_minutes=5)
    return _device()


def _memory(device: torch.device) -> dict[str, float]:
    from pretrain.metrics import memory_figures

    return memory_figures(device, reset=False)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _batch(
    sizes: Sizes, batch: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, 3, sizes.image_size, sizes.image_size, device=device, generator=g)
    y = torch.randint(0, sizes.num_classes, (batch,), device=device, generator=g)
    return x.to(torch.bfloat16), y


class _Trainer:
    """The step the trainer runs, built like the trainer builds it (DeepSpeed) or plain torch (fallback)."""

    def __init__(self, kind: str, name: str, sizes: Sizes, batch: int, ckpt: bool, device: torch.device):
        self.kind, self.device = kind, device
        if kind == "deepspeed":
            from pretrain.config import EngineConfig, LossConfig, ModelConfig, OptimConfig
            from pretrain.ds_config import deepspeed_config
            from pretrain.engine import build_engine, build_model
            from pretrain.losses import build_loss
            from pretrain.optim import build_optimizer

            ds = deepspeed_config(EngineConfig(), OptimConfig(), micro_batch=batch, world_size=1)
            cfg = ModelConfig(
                name=name, image_size=sizes.image_size, grad_checkpointing=ckpt, **sizes.overrides
            )
            model = build_model(cfg, num_classes=sizes.num_classes, ds_config=ds)
            self.engine = build_engine(
                model,
                build_optimizer(model, OptimConfig()),
                None,
                ds,
                gather_unit_elements=EngineConfig().gather_unit_elements,
            )
            self.module = self.engine.module
            self.loss_fn = build_loss(LossConfig(), sizes.num_classes)
        else:
            from pretrain.model import create_model

            model = create_model(
                name, num_classes=sizes.num_classes, image_size=sizes.image_size, **sizes.overrides
            )
            model.set_grad_checkpointing(ckpt)
            self.module = model.to(device)
            self.optimizer = torch.optim.AdamW(
                model.parameters(), lr=1e-3, weight_decay=0.05, fused=device.type == "cuda"
            )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss on the device (no sync)."""
        if self.kind == "deepspeed":
            loss = self.loss_fn(self.engine(x), y)
            self.engine.backward(loss)
            self.engine.step()
            return loss.detach()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.module(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ================================================================================================ sections


def section_env(sizes: Sizes) -> dict[str, Any]:
    device = _device()
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "importable": {m: _has(m) for m in ("deepspeed", "yaml", "numpy", "nvidia.dali", "PIL", "pynvml")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / GIB,
            cudnn=torch.backends.cudnn.version(),
        )
    n, reps = (8192, 20) if device.type == "cuda" else (256, 3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    out["matmul_bf16_tflops"] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    out["matmul_shape"] = [n, n, n]
    return out


def _sdpa_kernel(names: set[str]) -> str:
    if any("_scaled_dot_product_cudnn_attention" in n for n in names):
        return "cudnn"
    if any("_scaled_dot_product_efficient_attention" in n or "_efficient_attention_" in n for n in names):
        return "mem_efficient"
    if any("_scaled_dot_product_flash_attention_for_cpu" in n for n in names):
        return "flash_cpu"
    if any("_scaled_dot_product_flash_attention" in n or "_flash_attention_" in n for n in names):
        return "flash"
    if any("_scaled_dot_product_fused_attention_overrideable" in n for n in names):
        return "overrideable"
    return "math"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def section_attention(sizes: Sizes) -> dict[str, Any]:
    """Kernel selection and the relative-bias gradient against an fp32 math-kernel reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from pretrain.model.blocks import RelativeAttention

    device = _device()
    batch, side, dim, head = sizes.attention
    torch.manual_seed(0)
    ref = RelativeAttention(dim, dim, head, (side, side)).to(device)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    fp32 = copy.deepcopy(ref)
    x = torch.randn(batch, side, side, dim, device=device)
    grad_out = torch.randn(batch, side, side, dim, device=device)

    def backward(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        out = module(inputs)
        out.backward(grad_out.to(out.dtype))
        return out

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    backward(low, x.bfloat16())  # warm-up: kernel selection and workspace allocation outside the trace
    low.zero_grad(set_to_none=True)
    with profile(activities=activities) as prof:
        out_low = backward(low, x.bfloat16())
        _sync(device)
    names = {e.key for e in prof.key_averages()}
    attention_names = sorted(
        n for n in names if any(k in n.lower() for k in ("scaled_dot_product", "attention", "fmha", "flash"))
    )
    with sdpa_kernel(SDPBackend.MATH):
        out_ref = backward(ref, x)
    backward(fp32, x)  # fp32 on whatever kernel torch picks for fp32
    table = "relative_position_bias_table"
    g_ref = getattr(ref, table).grad
    g_low = getattr(low, table).grad
    g_fp32 = getattr(fp32, table).grad
    rel_bf16, rel_fp32 = _rel(g_low, g_ref), _rel(g_fp32, g_ref)
    return {
        "shape": {
            "batch": batch,
            "grid": [side, side],
            "dim": dim,
            "head_dim": head,
            "bias_requires_grad": True,
        },
        "kernel_bf16": _sdpa_kernel(names),
        "profiler_attention_ops": attention_names[:40],
        "bias_grad_rel_error_bf16_vs_fp32_math": rel_bf16,
        "bias_grad_rel_error_fp32_vs_fp32_math": rel_fp32,
        "bias_grad_max_abs_error_bf16": float((g_low.float() - g_ref).abs().max()),
        "output_rel_error_bf16": _rel(out_low, out_ref),
        "qkv_weight_grad_rel_error_bf16": _rel(low.qkv.weight.grad, ref.qkv.weight.grad),
        # bf16 keeps ~3 significant digits; the table gradient sums batch x N^2 bf16 products per entry.
        "bias_grad_matches": rel_bf16 < 2e-2 and rel_fp32 < 1e-4,
    }


def train_case(sizes: Sizes, name: str, batch: int, ckpt: bool, peak_tflops: float) -> dict[str, Any]:
    from pretrain.model import count_macs, create_model

    device = _device()
    kind, note = _engine_kind()
    if kind == "deepspeed":
        device = _init_dist_once()
    out: dict[str, Any] = {
        "model": name,
        "image_size": sizes.image_size,
        "batch": batch,
        "grad_checkpointing": ckpt,
        "engine": "deepspeed ZeRO-3 bf16, 1 rank"
        if kind == "deepspeed"
        else "torch bf16 autocast, 1 process",
        "input": "synthetic bf16 batch on the device (no decoding)",
    }
    if note:
        out["engine_note"] = note
    _reset_memory(device)
    trainer = _Trainer(kind, name, sizes, batch, ckpt, device)
    x, y = _batch(sizes, batch, device)
    losses = [trainer.step(x, y) for _ in range(sizes.warmup)]
    _sync(device)
    start = time.perf_counter()
    losses += [trainer.step(x, y) for _ in range(sizes.steps)]
    _sync(device)
    elapsed = time.perf_counter() - start
    with torch.device("meta"):
        meta = create_model(
            name, num_classes=sizes.num_classes, image_size=sizes.image_size, **sizes.overrides
        )
    flops_per_image = 6.0 * count_macs(meta, sizes.image_size).macs  # the trainer's MFU convention
    images_s = batch * sizes.steps / elapsed
    tflops = images_s * flops_per_image / 1e12
    out.update(
        step_time_s=elapsed / sizes.steps,
        images_per_s=images_s,
        tflops=tflops,
        mfu=tflops / peak_tflops if device.type == "cuda" and peak_tflops > 0 else None,
        peak_tflops=peak_tflops,
        loss_first=float(losses[0]),
        loss_last=float(losses[-1]),
        loss_finite=bool(torch.stack(losses).isfinite().all()),
        **_memory(device),
    )
    if kind == "deepspeed":
        from pretrain.engine import batchnorm_dtypes

        out["batchnorm_dtypes"] = sorted(str(d) for d in batchnorm_dtypes(trainer.module))
    return out


def plan_prediction(sizes: Sizes, name: str) -> dict[str, Any]:
    """`coatnet-plan`'s per-GPU peak for 1 rank at every (batch, checkpointing) the train section runs."""
    from pretrain.config import EngineConfig, ModelConfig
    from pretrain.plan import activation_bytes, model_states, profile_model

    engine = EngineConfig()
    profile = profile_model(
        ModelConfig(name=name, image_size=sizes.image_size, **sizes.overrides),
        sizes.num_classes,
        engine.param_persistence_threshold,
    )
    states = model_states(profile, engine, 1)
    out = {"params": profile.params, "macs_per_image": profile.macs_per_image}
    for _, batch in sizes.models:
        for ckpt in (False, True):
            act = activation_bytes(profile, batch, ckpt)
            out[f"b{batch}_ckpt{int(ckpt)}"] = {
                "peak_gib": max(states.during_backward + act, states.at_step) / GIB,
                "activations_gib": act / GIB,
                "model_states_gib": states.during_backward / GIB,
            }
    return out


def checkpoint_case(sizes: Sizes, work: str) -> dict[str, Any]:
    """Save after 2 steps, continue 3; a fresh engine resumes from the save and runs the same 3."""
    name, batch = sizes.models[0]
    kind, note = _engine_kind()
    device = _init_dist_once() if kind == "deepspeed" else _device()
    os.environ.setdefault("COATNET_KEY_FILE", str(Path(work) / "checkpoint.key"))
    x, y = _batch(sizes, batch, device, seed=1)
    torch.manual_seed(0)
    first = _Trainer(kind, name, sizes, batch, False, device)
    for _ in range(2):
        first.step(x, y)
    root = Path(work) / "checkpoints"
    out: dict[str, Any] = {"model": name, "image_size": sizes.image_size, "batch": batch}
    start = time.perf_counter()
    if kind == "deepspeed":
        from pretrain import dist
        from pretrain.checkpoint import CheckpointManager
        from pretrain.config import CheckpointConfig
        from pretrain.engine import batchnorm_dtypes

        manager = CheckpointManager(CheckpointConfig(), root, dist.detect())
        invariants = {"gpu_check": name}
        saved = manager.save(first.engine, 2, {"trainer": {"step": 2}}, {"resume_invariants": invariants})
        out["engine"] = "deepspeed ZeRO-3 bf16 through pretrain.checkpoint.CheckpointManager"
        out["save_phases_s"] = saved.timings
    else:
        root.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"model": first.module.state_dict(), "optim": first.optimizer.state_dict()}, root / "ckpt.pt"
        )
        out["engine"] = f"torch.save ({note})"
    out["save_s"] = time.perf_counter() - start
    out["size_gib"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / GIB
    continued = [float(first.step(x, y)) for _ in range(3)]
    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    second = _Trainer(kind, name, sizes, batch, False, device)
    start = time.perf_counter()
    if kind == "deepspeed":
        manager = CheckpointManager(CheckpointConfig(), root, dist.detect())
        point = manager.select(invariants)
        assert point is not None, "the checkpoint just saved was not found"
        client = manager.load(second.engine, point)
        out["client_state_back"] = client == {"step": 2}
        out["batchnorm_dtypes_after_load"] = sorted(str(d) for d in batchnorm_dtypes(second.module))
    else:
        saved = torch.load(root / "ckpt.pt", map_location=device, weights_only=True)
        second.module.load_state_dict(saved["model"])
        second.optimizer.load_state_dict(saved["optim"])
    out["load_s"] = time.perf_counter() - start
    resumed = [float(second.step(x, y)) for _ in range(3)]
    out.update(
        continued_losses=continued,
        resumed_losses=resumed,
        bitwise=continued == resumed,
        max_abs_loss_diff=max(abs(a - b) for a, b in zip(continued, resumed)),
    )
    return out


def determinism_case(sizes: Sizes, on: bool) -> dict[str, Any]:
    """The same three CoAtNet-0 steps (plain torch, bf16 autocast: the trainer's kernels) run twice."""
    from pretrain.engine import set_determinism
    from pretrain.model import create_model

    device = _device()
    set_determinism(on)
    name, batch = "coatnet_0", sizes.determinism_batch

    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = create_model(
            name, num_classes=sizes.num_classes, image_size=sizes.image_size, **sizes.overrides
        )
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        x, y = _batch(sizes, batch, device, seed=2)
        losses = []
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    try:
        (la, pa), (lb, pb) = run(), run()
    finally:
        set_determinism(False)
        torch.backends.cudnn.benchmark = False
    return {
        "deterministic": on,
        "model": name,
        "image_size": sizes.image_size,
        "batch": batch,
        "losses": [la, lb],
        "losses_bitwise": la == lb,
        "weights_bitwise": bool(torch.equal(pa, pb)),
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(la, lb)),
        "weights_rel_diff": _rel(pb, pa) if not torch.equal(pa, pb) else 0.0,
    }


def _jpegs(sizes: Sizes, folder: str | None) -> tuple[list[bytes], str]:
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"--jpegs {folder}: no .jpg/.jpeg files")
        return [p.read_bytes() for p in files[: sizes.decode_images]], f"{len(files)} JPEGs from {folder}"
    if not _has("PIL") or not _has("numpy"):
        raise RuntimeError("no JPEGs: give --jpegs DIR (PIL and numpy, to make some, are not importable)")
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(sizes.decode_images):
        # ImageNet-like: 500 x 375, smooth structure plus noise (random noise alone compresses badly)
        coarse = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 12, (375, 500, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs, "synthetic 500x375 JPEGs made with PIL"


def section_decode(sizes: Sizes, jpeg_dir: str | None) -> dict[str, Any]:
    """DALI decode + random resized crop + normalise, images/s: mixed (nvJPEG) against CPU."""
    if not _has("nvidia.dali"):
        return {
            "available": False,
            "note": "DALI not importable on this machine: no decode figures; the train section's input is "
            "synthetic (see the module docstring for why DALI does not travel here)",
        }
    import numpy as np

    from data_pipeline.config import DataConfig
    from data_pipeline.loader import gpu_decoder_args
    from data_pipeline.pipeline import MEAN, STD, placement

    blobs, source = _jpegs(sizes, jpeg_dir)
    batch = min(64, len(blobs))
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs[:batch]]
    out: dict[str, Any] = {"available": True, "jpegs": source, "batch": batch}
    devices = [("cpu", torch.device("cpu"))] + ([("mixed", _device())] if torch.cuda.is_available() else [])
    for label, device in devices:
        place = placement("auto", device, gpu_decoder_args(DataConfig()))
        pipe = _decode_pipeline(place, arrays, MEAN, STD)
        for _ in range(2):
            pipe.run()
        rounds = 10 if label == "mixed" else 3
        start = time.perf_counter()
        for _ in range(rounds):
            pipe.run()
        out[f"{label}_images_per_s"] = batch * rounds / (time.perf_counter() - start)
        out[f"{label}_decoder_args"] = place.decoder_kwargs()
        del pipe
    if "mixed_images_per_s" not in out:
        out["mixed_images_per_s"] = None
        out["mixed_note"] = "no GPU: CPU decoding only"
    return out


def _decode_pipeline(place, arrays: list, mean: list[float], std: list[float]):
    """The loader's decode + crop + normalise graph, fed the same encoded batch again and again."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(arrays), num_threads=4, device_id=place.device_id, prefetch_queue_depth=2)
    def define():
        jpegs = fn.external_source(source=lambda: arrays, batch=True, name="jpegs")
        images = fn.decoders.image_random_crop(
            jpegs, device=place.decoder, output_type=types.RGB, **place.decoder_kwargs()
        )
        images = fn.resize(images, size=[224, 224])
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)

    pipe = define()
    pipe.build()
    return pipe


# ================================================================================================ driver

CASES = {
    "env": lambda s, a: section_env(s),
    "attention": lambda s, a: section_attention(s),
    "train": lambda s, a: train_case(s, a["name"], a["batch"], a["ckpt"], a["peak_tflops"]),
    "checkpoint": lambda s, a: checkpoint_case(s, a["work"]),
    "determinism": lambda s, a: determinism_case(s, a["on"]),
    "decode": lambda s, a: section_decode(s, a.get("jpegs")),
}


class Runner:
    """Runs each case in its own process (GPU) or in this one (CPU twin), within the time budget."""

    def __init__(self, sizes: Sizes, isolate: bool, budget_s: float, work: Path):
        self.sizes, self.isolate, self.work = sizes, isolate, work
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, case: str, args: dict, cap_s: float) -> dict[str, Any]:
        timeout = min(cap_s, self.left() - 5)
        if timeout < 10:
            return {"skipped": f"the time budget was spent ({self.left():.0f} s left)"}
        start = time.monotonic()
        if self.isolate:
            result = self._in_child(case, args, timeout)
        else:
            try:
                result = CASES[case](self.sizes, args)
            except Exception as exc:
                result = _error(exc)
        result["section_s"] = time.monotonic() - start
        return result

    def _in_child(self, case: str, args: dict, timeout: float) -> dict[str, Any]:
        result_file = self.work / f"{case}-{time.monotonic_ns()}.json"
        spec = json.dumps({"case": case, "args": args, "sizes": asdict(self.sizes)})
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", spec, "--result", str(result_file)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": (exc.stderr or "")[-2000:]}
        if result_file.exists():
            return json.loads(result_file.read_text())
        return {"error": f"the case's process exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}


def child_main(spec_text: str, result: str) -> int:
    spec = json.loads(spec_text)
    sizes = Sizes(**{k: tuple(map(tuple, v)) if k == "models" else v for k, v in spec["sizes"].items()})
    try:
        out = CASES[spec["case"]](sizes, spec["args"])
    except Exception as exc:
        out = _error(exc)
    Path(result).write_text(json.dumps(out, default=str))
    return 0


def run_all(
    out_dir: Path, *, isolate: bool | None, budget_s: float, peak_tflops: float, jpegs: str | None
) -> dict:
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    sizes = Sizes.for_device(cuda)
    isolate = cuda if isolate is None else isolate
    report: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "twin": sizes.twin,
        "isolated_sections": isolate,
        "budget_s": budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        runner = Runner(sizes, isolate, budget_s, Path(tmp))
        report["env"] = runner.run("env", {}, 40)  # in a child too: the parent never holds a CUDA context
        report["attention"] = runner.run("attention", {}, 60)
        plans = {}
        for name, _ in sizes.models:
            try:
                plans[name] = plan_prediction(sizes, name)
            except Exception as exc:  # pretrain.plan needs PyYAML (pretrain.config)
                plans[name] = {"error": _error(exc)["error"]}
        report["train"] = []
        for name, batch in sizes.models:
            for ckpt in (False, True):
                case = runner.run(
                    "train", {"name": name, "batch": batch, "ckpt": ckpt, "peak_tflops": peak_tflops}, 75
                )
                plan = dict(plans[name].get(f"b{batch}_ckpt{int(ckpt)}", plans[name]))
                case["plan"] = {
                    **plan,
                    "compare_with": "memory_allocated_peak_gb (the plan's --reserve excluded)",
                }
                if not str(case.get("engine", "")).startswith("deepspeed"):
                    case["plan"]["note"] = "the plan models ZeRO-3 bf16; this case ran another engine"
                if "memory_allocated_peak_gb" in case and "peak_gib" in plan and cuda:
                    case["measured_over_plan"] = case["memory_allocated_peak_gb"] / plan["peak_gib"]
                report["train"].append(case)
        report["checkpoint"] = runner.run("checkpoint", {"work": str(Path(tmp) / "ckpt")}, 90)
        report["determinism"] = {
            "on": runner.run("determinism", {"on": True}, 50),
            "off": runner.run("determinism", {"on": False}, 50),
        }
        report["decode"] = runner.run("decode", {"jpegs": jpegs}, 45)
    report["errors"] = _failed_sections(report)
    report["elapsed_s"] = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _failed_sections(report: dict) -> list[str]:
    failed = [f"plan[{c.get('model')}]" for c in report.get("train", []) if "error" in c.get("plan", {})]
    for key, value in report.items():
        items = (
            value if isinstance(value, list) else list(value.values()) if key == "determinism" else [value]
        )
        for i, item in enumerate(items):
            if isinstance(item, dict) and ("error" in item or "skipped" in item):
                failed.append(f"{key}[{i}]" if len(items) > 1 else key)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's time limit")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)"
    )
    parser.add_argument("--jpegs", default=None, help="a folder of JPEGs for the decode section")
    iso = parser.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate", dest="isolate", action="store_true", default=None, help="one process per case"
    )
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="every case in this process")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return child_main(args.case, args.result)
    if not args.out:
        parser.error("--out DIR is required")
    report = run_all(
        Path(args.out),
        isolate=args.isolate,
        budget_s=args.budget_s,
        peak_tflops=args.peak_tflops,
        jpegs=args.jpegs,
    )
    print("\n".join(summary_lines(report)))
    print(f"gpu_check: {Path(args.out) / 'gpu_check.json'}; failed or skipped: {report['errors'] or 'none'}")
    return 0


def _fig(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def summary_lines(report: dict) -> list[str]:
    """The headline figures, one line per section (the JSON has everything)."""
    env, att = report.get("env", {}), report.get("attention", {})
    lines = [
        f"env: {env.get('name', env.get('device'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"bf16 matmul {_fig(env.get('matmul_bf16_tflops'), '.1f')} TFLOP/s"
        + (" (CPU twin: tiny sizes, figures not comparable)" if report.get("twin") else ""),
        f"attention: kernel {att.get('kernel_bf16', att.get('error'))}, bias-grad rel error bf16 "
        f"{_fig(att.get('bias_grad_rel_error_bf16_vs_fp32_math'), '.2e')}, match {att.get('bias_grad_matches')}",
    ]
    for case in report.get("train", []):
        plan = case.get("plan", {})
        head = (
            f"train {case.get('model')} @{case.get('image_size')} b{case.get('batch')} "
            f"ckpt={int(bool(case.get('grad_checkpointing')))}: "
        )
        if "error" in case or "skipped" in case:
            lines.append(head + str(case.get("error", case.get("skipped"))))
            continue
        peak = case.get("memory_allocated_peak_gb", case.get("memory_gb"))
        lines.append(
            head
            + f"{_fig(case.get('images_per_s'), '.0f')} img/s, {_fig(case.get('step_time_s'), '.3f')} s/step, "
            f"peak {_fig(peak, '.2f')} GiB (plan {_fig(plan.get('peak_gib'), '.2f')}), "
            f"MFU {_fig(case.get('mfu'), '.1%')}, {case.get('engine')}"
        )
    ckpt = report.get("checkpoint", {})
    lines.append(
        f"checkpoint: save {_fig(ckpt.get('save_s'), '.1f')} s, load {_fig(ckpt.get('load_s'), '.1f')} s, "
        f"resume bitwise {ckpt.get('bitwise', ckpt.get('error'))}"
    )
    for mode, det in report.get("determinism", {}).items():
        lines.append(
            f"determinism {mode}: losses bitwise {det.get('losses_bitwise', det.get('error'))}, "
            f"max loss diff {_fig(det.get('max_abs_loss_diff'), '.2e')}"
        )
    dec = report.get("decode", {})
    lines.append(
        f"decode: mixed {_fig(dec.get('mixed_images_per_s'), '.0f')} img/s, "
        f"cpu {_fig(dec.get('cpu_images_per_s'), '.0f')} img/s"
        + ("" if dec.get("available", True) else " (no DALI)")
    )
    return lines


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
