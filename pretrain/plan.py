"""``coatnet-plan``: will a recipe fit a cluster, and how fast will it run? Answered before renting it.

    coatnet-plan --config configs/coatnet7_jft.yaml --nodes 8 --gpus-per-node 8 --gpu-memory 80GiB

Per-GPU memory under DeepSpeed ZeRO-3 with bf16 compute and fp32 master weights (what the trainer runs):

- model states, partitioned over the W ranks: bf16 parameters 2 B/param (parameters smaller than
  ``engine.param_persistence_threshold`` stay whole on every rank), fp32 master weights + Adam m and v
  12 B/param, bf16 gradient partition 2 B/param; at the optimizer step DeepSpeed also upcasts the
  gradient partition to fp32 (4 B/param, per sub-group), when activations are already freed.
- the gathered-parameter working set, in bf16: with prefetching or reuse on (``engine.prefetch_bucket_size``
  or ``engine.max_reuse_distance`` above 0, DeepSpeed's defaults) up to ``engine.max_live_parameters`` of
  the partitioned parameters, the whole model when it is smaller (``gathered_parameter_elements``); else
  the largest layer. Plus the largest layer's full bf16 gradient and one reduce bucket.
- activations, measured, not guessed: the model is run once on the meta device (no memory, no compute)
  with a saved-tensor hook that records every tensor autograd keeps for backward, block by block, at two
  batch sizes (activation bytes are affine in the batch). Attention is accounted as the GPU's
  memory-efficient SDPA kernel keeps it (q, k, v, bias, output and the log-sum-exp), not as the meta
  device's reference implementation, which would keep the N x N attention matrix.
  With activation checkpointing only each block's input stays alive, plus one block's recomputed
  activations during its backward.
- a fixed reserve (``--reserve``) for the CUDA context, NCCL and cuBLAS buffers and allocator slack.

Speed: a training image costs 6 x the model's multiply-accumulates (forward 2, backward 4: the MFU
convention of ``pretrain.metrics``; checkpointing's recompute is part of what MFU loses), so
step time = images per GPU per step x 6 x MACs / (peak x MFU). Communication: ZeRO-3 moves about 3 x the
bf16 parameter bytes per micro-step per rank (all-gather in forward, all-gather in backward,
reduce-scatter of gradients), times (W - 1) / W on a ring.

What can starve the GPUs, budgeted against that step time (``Budgets``; a line starting "WARNING" when it
does not fit):

- JPEG decoding per GPU. The step consumes ``images/s / W`` per GPU. DALI sends ``data.hw_decoder_load`` of
  the JPEGs to the GPU's hardware decoders (NVJPG engines: ``NVJPG_ENGINES``), which decode about
  ``NVJPG_IMAGES_S`` ImageNet-sized images per second per engine; the rest need CPU work (the whole decode
  on DALI's CPU backend, the Huffman stage in nvJPEG's hybrid path), costed at a full CPU decode
  (``CPU_DECODE_MPIX_S`` megapixels per second per core, measured here), an upper bound. Decode time
  scales with the source JPEG's pixels (``--jpeg-megapixels``), not with the training resolution.
- The checkpoint write: each rank writes its fp32 master + Adam shard (12 B/param / W; + 4 B/param / W
  with an EMA), at the slower of the filesystem's aggregate bandwidth and each node's own, divided by
  the commit protocol's efficiency (``SAVE_EFFICIENCY``, benchmarks/checkpoint_speed.py). That save must
  fit in the Slurm warning lead (``#SBATCH --signal=...@N`` of cluster/pretrain.sbatch) after the stop
  request's latency (``run.stop_check_s`` + ``run.log_every`` steps), and the periodic saves
  (``checkpoint.every_steps``) cost the share of the run they block.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pretrain.config import EngineConfig, ModelConfig, TrainConfig, load_config
from pretrain.configlib import ConfigError
from pretrain.ds_config import grad_accum_steps
from pretrain.engine import zero3_gather_units
from pretrain.model import count_macs, create_model

BF16 = 2  # bytes per bf16 element
FP32 = 4
# fp32 master weights + Adam exp_avg + exp_avg_sq, bytes per parameter.
MASTER_AND_ADAM = 3 * FP32
# DeepSpeed's zero_optimization.sub_group_size default (elements): the fp32 gradient upcast at the
# optimizer step covers at most one sub-group at a time. The trainer does not change it.
DS_SUB_GROUP_SIZE = 1_000_000_000
GIB = 2**30

# Hardware JPEG decoders per GPU, from NVIDIA's architecture whitepapers: A100's NVJPG has 5 cores, GH100
# (H100, H200) 7 NVJPG engines; V100 and most others have none. --jpeg-engines covers other GPUs.
NVJPG_ENGINES = {"a100": 5, "h100": 7, "h200": 7, "none": 0}
# Images of ImageNet-1k's mean size (~0.18 MP) one NVJPG engine decodes per second: A100 decodes about
# 5000/s with every JPEG on its 5-core hardware decoder (NVIDIA's A100 decoding blog, as quoted in DALI
# issue 5362). An estimate; hardware decode time also scales with pixels.
NVJPG_IMAGES_S = 1000.0
IMAGENET_MEGAPIXELS = 0.18
# Megapixels per second one CPU core decodes, random-resized-crops and flips with DALI's CPU backend:
# 670-780 images/s of 256x256 JPEGs per thread on this project's 2-core machines
# (DALI CPU pipeline, random resized crop to 224 and flip), i.e. about 47 MP/s. Server cores are
# faster; a conservative figure.
CPU_DECODE_MPIX_S = 47.0
# CPU cores per GPU a node has when --cpus-per-node is not given: DGX H100/H200 (112 cores, 8 GPUs).
DEFAULT_CORES_PER_GPU = 14
# A committed save (write, fsync, per-file digest, manifest) runs at about half a plain write + fsync
# of the same bytes (benchmarks/checkpoint_speed.py on this project's 2-core VMs, coatnet_1: async save
# from host buffers, the stop save of a run that saves periodically, 0.51 with SHA-256 digests and 0.56
# with BLAKE3 in one session's runs of the same benchmark, then 0.60 with its timing corrected; coatnet_3
# 0.62 with SHA-256; synchronous 0.25-0.49). Kept at 0.5: conservative.
SAVE_EFFICIENCY = 0.5
# GB/s at which one rank copies its checkpoint share into host memory during an async save (torch.save of
# its GPU tensors into a host buffer: a device-to-host copy, then a copy into the buffer). A conservative
# figure, not measured on a GPU here; the CPU twin serializes at 5-6 GB/s (benchmarks/checkpoint_speed.py).
HOST_COPY_GBYTES = 3.0
# The warning lead of cluster/pretrain.sbatch (#SBATCH --signal=B:USR1@N), read from that file when the
# checkout has it; this value otherwise.
SBATCH = Path(__file__).resolve().parents[1] / "cluster" / "pretrain.sbatch"
DEFAULT_WARNING_LEAD_S = 180


# ---------------------------------------------------------------------------------------------- inputs


def parse_memory(text: str) -> int:
    """'80GiB' -> bytes. Units: KiB/MiB/GiB/TiB (powers of 2) or KB/MB/GB/TB (powers of 10)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"memory size {text!r}: expected a number and a unit, e.g. 80GiB, 80GB or 141GB")
    value, unit = float(match.group(1)), match.group(2).upper()
    power = "KMGT".index(unit[0]) + 1
    return int(value * (1024**power if "I" in unit else 1000**power))


@dataclass
class Cluster:
    """The machines a plan is made for."""

    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU
    peak_tflops: float  # dense bf16 per GPU
    mfu: float  # assumed model-FLOPs utilisation, 0..1
    link_gbytes: float  # per-GPU network bandwidth, GB/s, for the communication time
    reserve: int  # bytes per GPU outside the model: CUDA context, NCCL/cuBLAS buffers, fragmentation
    jpeg_engines: int = NVJPG_ENGINES["h100"]  # hardware JPEG decoders per GPU
    cpus_per_node: int = 0  # 0: DEFAULT_CORES_PER_GPU per GPU
    fs_gbytes: float = 20.0  # the checkpoint filesystem's aggregate write bandwidth, GB/s
    node_write_gbytes: float = 5.0  # what one node can write to it, GB/s
    warning_lead_s: float = DEFAULT_WARNING_LEAD_S  # Slurm's warning signal before the time limit

    @property
    def cores_per_gpu(self) -> float:
        return (self.cpus_per_node or DEFAULT_CORES_PER_GPU * self.gpus_per_node) / self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# ---------------------------------------------------------------------------------------------- model profile


@dataclass
class BlockActivations:
    """Bytes autograd keeps for one block's backward: ``fixed + per_image * batch`` (affine in batch)."""

    name: str
    saved_fixed: int
    saved_per_image: int
    input_per_image: int  # what activation checkpointing keeps of this block
    output_per_image: int

    def saved(self, batch: int) -> int:
        return self.saved_fixed + self.saved_per_image * batch


@dataclass
class ModelProfile:
    """Everything the plan needs to know about one model at one resolution."""

    name: str
    image_size: int
    params: int
    persistent_params: int  # parameters below the persistence threshold, kept whole on every rank
    largest_layer: str
    largest_layer_params: int
    macs_per_image: int
    blocks: list[BlockActivations] = field(default_factory=list)
    persistent_tensors: int = 0
    gather_units: int = 0  # blocks ZeRO-3 gathers in one go (pretrain.engine.zero3_gather_units)
    largest_unit_params: int = 0
    hooked_modules: int = 0  # modules with ZeRO-3's gather hooks, with those units
    hooked_modules_per_layer: int = 0  # the same, DeepSpeed's default (every module)


def model_parameter_stats(model: nn.Module) -> tuple[int, str, int]:
    """(total parameters, name of the largest layer, its parameters).

    A "layer" is one module's own parameters (not its children's): the unit ZeRO-3 gathers, and the
    definition DeepSpeed's estimator uses (``deepspeed.runtime.zero.stage3.model_to_params``).
    """
    total = sum(p.numel() for p in model.parameters())
    name, largest = "", 0
    for module_name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own > largest:
            name, largest = module_name, own
    return total, name, largest


class _SavedTensorRecorder:
    """Adds up the bytes of the distinct tensors autograd saves, attributed to the running block.

    A tensor saved twice (or through two views) counts once, for the block that saved it first: a
    block's output that the next block saves is that next block's memory. Parameters and buffers are
    not activations and are skipped.
    """

    def __init__(self, model: nn.Module) -> None:
        self.excluded = {id(t) for t in (*model.parameters(), *model.buffers())}
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # holds the tensors so their ids stay unique
        self.current = "other"
        self.saved: dict[str, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        base = tensor if tensor._base is None else tensor._base
        if id(base) in self.excluded or id(base) in self.seen:
            return
        self.seen.add(id(base))
        self.keep.append(base)
        self.saved[self.current] = self.saved.get(self.current, 0) + base.numel() * base.element_size()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor


class _MemoryEfficientAttention(TorchFunctionMode):
    """Replaces SDPA during the meta forward by what the GPU's memory-efficient kernel saves.

    Saved: q, k, v (B, heads, N, d), the additive bias (heads, N, N), the output (B, heads, N, d) and
    the fp32 log-sum-exp (B, heads, N). The meta device would otherwise run the reference math path,
    which saves the (B, heads, N, N) softmax as well.
    """

    def __init__(self, recorder: _SavedTensorRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        out = q.clone()  # same shape (B, heads, N, d); clone saves nothing itself
        logsumexp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        for tensor in (q, k, v, mask, out, logsumexp):
            if tensor is not None:
                self.recorder.add(tensor)
        return out


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The checkpointing units: every block of every stage, then the head (never checkpointed)."""
    units = [
        (f"stages.{s}.blocks.{b}", block)
        for s, stage in enumerate(model.stages)
        for b, block in enumerate(stage.blocks)
    ]
    return [*units, ("head", model.head)]


def _measure(
    model: nn.Module, batch: int, image_size: int, efficient_attention: bool = True
) -> tuple[dict[str, int], dict[str, tuple]]:
    """One meta forward: saved bytes per unit, and (input numel, output numel) per unit.

    ``efficient_attention=False`` records what the device's own SDPA saves (tests compare the two).
    """
    recorder = _SavedTensorRecorder(model)
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, unit in _blocks(model):

        def pre(module, inputs, name=name):
            recorder.current = name

        def post(module, inputs, output, name=name):
            sizes[name] = (inputs[0].numel(), output.numel())
            recorder.current = "other"

        handles += [unit.register_forward_pre_hook(pre), unit.register_forward_hook(post)]
    x = torch.empty(batch, model.config.in_chans, image_size, image_size, device="meta", dtype=torch.bfloat16)
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t),
            _MemoryEfficientAttention(recorder) if efficient_attention else contextlib.nullcontext(),
        ):
            model(x.requires_grad_(False))
    finally:
        for handle in handles:
            handle.remove()
    return recorder.saved, sizes


def traffic_bytes(profile: ModelProfile, micro_steps: int, world: int) -> int:
    """ZeRO-3 bytes per rank per step: a partitioned parameter is all-gathered in the forward and again in
    the backward and its gradient reduce-scattered (3 x bf16, each moving (W-1)/W of the tensor); a
    parameter kept whole (below the persistence threshold) is never gathered, its gradient all-reduced
    (2 x). Gather units change the number of collectives and hooks, not the bytes."""
    partitioned = profile.params - profile.persistent_params
    return int(BF16 * micro_steps * (world - 1) / world * (3 * partitioned + 2 * profile.persistent_params))


def profile_model(
    cfg: ModelConfig, num_classes: int, persistence_threshold: int, gather_unit_elements: int = 0
) -> ModelProfile:
    """Parameters, MACs and per-block activation bytes of the configured model, on the meta device.

    The model is built in bf16 (as ZeRO-3 holds it) in training mode; the input does not require
    grad, like a real image batch.
    """
    with torch.device("meta"):
        model = create_model(
            cfg.name,
            num_classes=num_classes,
            image_size=cfg.image_size,
            drop_path_rate=cfg.drop_path_rate,
            **cfg.overrides(),
        )
    model = model.to(torch.bfloat16).train()
    total, largest_name, largest = model_parameter_stats(model)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < persistence_threshold)
    persistent_tensors = sum(1 for p in model.parameters() if p.numel() < persistence_threshold)
    modules = dict(model.named_modules())
    units = zero3_gather_units(model, gather_unit_elements)
    below_units = sum(len(list(modules[u].modules())) - 1 for u in units)
    saved1, sizes1 = _measure(model, 1, cfg.image_size)
    saved2, _ = _measure(model, 2, cfg.image_size)
    blocks = []
    for name, _ in _blocks(model):
        per_image = saved2.get(name, 0) - saved1.get(name, 0)
        blocks.append(
            BlockActivations(
                name=name,
                saved_fixed=saved1.get(name, 0) - per_image,
                saved_per_image=per_image,
                input_per_image=sizes1[name][0] * BF16,
                output_per_image=sizes1[name][1] * BF16,
            )
        )
    return ModelProfile(
        name=cfg.name,
        image_size=cfg.image_size,
        params=total,
        persistent_params=persistent,
        largest_layer=largest_name,
        largest_layer_params=largest,
        macs_per_image=count_macs(model, cfg.image_size).macs,
        persistent_tensors=persistent_tensors,
        gather_units=len(units),
        largest_unit_params=max((sum(p.numel() for p in modules[u].parameters()) for u in units), default=0),
        hooked_modules=len(modules) - below_units,
        hooked_modules_per_layer=len(modules),
        blocks=blocks,
    )


# ---------------------------------------------------------------------------------------------- memory


@dataclass
class ModelStates:
    """Per-GPU bytes of the ZeRO-3 model states and working buffers (independent of the batch)."""

    params_bf16: int
    master_and_adam: int
    grads_bf16: int
    gathered_params: int
    gathered_grads: int
    step_fp32_grads: int  # only at the optimizer step, when activations are freed

    @property
    def during_backward(self) -> int:
        """What is alive next to the activations."""
        return (
            self.params_bf16
            + self.master_and_adam
            + self.grads_bf16
            + self.gathered_params
            + self.gathered_grads
        )

    @property
    def at_step(self) -> int:
        return self.params_bf16 + self.master_and_adam + self.grads_bf16 + self.step_fp32_grads


def gathered_parameter_elements(profile: ModelProfile, engine: EngineConfig) -> int:
    """Parameter elements a rank may hold gathered (whole) at once under ZeRO-3.

    DeepSpeed prefetches along the module trace it recorded in the first step and keeps a gathered
    parameter whose next use is near, under ``stage3_max_live_parameters``. With activation
    checkpointing every block's parameters are used again by its recompute in the backward, so from the
    second step on a rank keeps the partitioned parameters gathered from their forward to their backward:
    measured with benchmarks/memory_breakdown.py on 2 CPU ranks, +0.14 GiB per rank for CoAtNet-5's
    widths at one block per stage (74.8M parameters) and +1.36 GiB for CoAtNet-5 (686.7M), the whole model
    in bf16 either time, with DeepSpeed's defaults; with reuse distance 0 alone, or prefetching off alone,
    the same; with both off, none (only the running layer, which then is gathered again in the backward).
    """
    partitioned = profile.params - profile.persistent_params
    running = profile.largest_layer_params
    if engine.prefetch_bucket_size > 0 or engine.max_reuse_distance > 0:
        kept = min(engine.max_live_parameters, partitioned)
        return max(kept, min(partitioned, running + engine.prefetch_bucket_size))
    return running


def model_states(profile: ModelProfile, engine: EngineConfig, world_size: int) -> ModelStates:
    """ZeRO-3 model-state bytes per GPU for ``world_size`` ranks (see the module docstring)."""
    partitioned = profile.params - profile.persistent_params
    shard = math.ceil(profile.params / world_size)
    largest = profile.largest_layer_params
    return ModelStates(
        params_bf16=BF16 * (math.ceil(partitioned / world_size) + profile.persistent_params),
        master_and_adam=MASTER_AND_ADAM * shard,
        grads_bf16=BF16 * shard,
        gathered_params=BF16 * gathered_parameter_elements(profile, engine),
        gathered_grads=BF16 * (largest + engine.reduce_bucket_size),
        step_fp32_grads=FP32 * min(shard, DS_SUB_GROUP_SIZE),
    )


def deepspeed_estimate(profile: ModelProfile, world_size: int) -> int:
    """The per-GPU figure of DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (no offload).

    18 B/param/world (bf16 params 2, fp32 master + Adam 12, fp32 gradients 4) + 4 B x the largest
    layer (its gathered bf16 parameters and gradients). Restated here so that planning does not import
    DeepSpeed; tests/test_plan.py checks it against DeepSpeed's own function.
    """
    return 4 * profile.largest_layer_params + int(18 * profile.params / world_size)


def activation_bytes(profile: ModelProfile, batch: int, checkpointing: bool) -> int:
    """Peak activation bytes per GPU during backward at micro-batch ``batch``.

    Without checkpointing every block's saved tensors are alive at the start of backward, plus the
    gradients flowing through the block being differentiated (d output and d input). With it, only
    each block's input is kept; the block being differentiated recomputes its saved tensors.
    """
    blocks, head = profile.blocks[:-1], profile.blocks[-1]
    flowing = max((b.input_per_image + b.output_per_image) * batch for b in blocks)
    if not checkpointing:
        return sum(b.saved(batch) for b in profile.blocks) + flowing
    inputs = sum(b.input_per_image * batch for b in blocks)
    recomputed = max(b.saved(batch) + (b.input_per_image + b.output_per_image) * batch for b in blocks)
    return inputs + recomputed + head.saved(batch)


def peak_bytes(profile: ModelProfile, states: ModelStates, cluster: Cluster, batch: int, ckpt: bool) -> int:
    """Per-GPU peak: the larger of (states + activations in backward) and (states at the step)."""
    backward = states.during_backward + activation_bytes(profile, batch, ckpt)
    return cluster.reserve + max(backward, states.at_step)


def largest_fitting_batch(
    profile: ModelProfile, states: ModelStates, cluster: Cluster, ckpt: bool, limit: int = 1 << 16
) -> int:
    """The largest micro-batch whose peak fits in the GPU's memory (0: not even one image)."""
    fits = lambda b: peak_bytes(profile, states, cluster, b, ckpt) <= cluster.gpu_memory  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The figures ``coatnet-plan`` prints, for one config on one cluster."""

    config: str
    cluster: Cluster
    profile: ModelProfile
    states: ModelStates
    deepspeed_bytes: int
    micro_batch: int
    checkpointing: bool
    global_batch: int
    accumulation: int  # micro-batches per rank per optimizer step
    activations: dict[bool, int]  # checkpointing -> bytes at micro_batch
    peak: dict[bool, int]
    max_batch: dict[bool, int]
    max_usable_batch: dict[bool, int]  # largest fitting micro-batch that divides global / world
    step_seconds: float
    images_per_second: float
    comm_bytes_per_step: int  # per rank
    comm_seconds: float
    total_steps: int | None  # schedule.steps, or schedule.epochs x --train-images / global batch
    budgets: Budgets | None = None  # decode and checkpoint write against the step (None: not computed)


@dataclass
class Budgets:
    """What can starve the GPUs, against the planned step time (see the module docstring)."""

    images_s_per_gpu: float  # what the step consumes
    jpeg_megapixels: float
    hw_decoder_load: float  # data.hw_decoder_load: the share DALI sends to the hardware decoders
    hw_capacity: float  # images/s the GPU's hardware decoders can take
    cpu_images_s: float  # images/s per GPU that need CPU work
    cores_needed: float  # per GPU, for cpu_images_s
    cores_free: float  # per GPU, one left for the training process
    save_bytes_per_rank: int
    save_bytes: int  # the whole checkpoint
    save_seconds: float
    stop_latency_s: float  # from the warning signal to the save's start: stop-file poll + log_every steps
    warning_lead_s: float
    save_share: float  # of the run's time, blocked by periodic saves (0: none configured)
    blocked_seconds: float = 0.0  # what a periodic save blocks training for (async: the host copy)
    host_bytes_per_node: int = 0  # async saves' host buffers on one node (0: synchronous saves)

    @property
    def hw_oversubscribed(self) -> bool:
        """The configured share sends the hardware decoders more than they can decode."""
        return self.hw_decoder_load * self.images_s_per_gpu > self.hw_capacity

    @property
    def decode_fits(self) -> bool:
        return self.cores_needed <= self.cores_free and not self.hw_oversubscribed

    @property
    def stop_fits(self) -> bool:
        return self.stop_latency_s + self.save_seconds <= self.warning_lead_s

    def warnings(self) -> list[str]:
        out = []
        if self.hw_oversubscribed:
            share = self.hw_capacity / self.images_s_per_gpu
            out.append(
                f"WARNING: data.hw_decoder_load={self.hw_decoder_load:g} sends "
                f"{self.hw_decoder_load * self.images_s_per_gpu:.0f} JPEGs/s per GPU to hardware decoders "
                f"that take about {self.hw_capacity:.0f}: the GPUs wait for data; set "
                f"data.hw_decoder_load={share:.2f} or lower"
            )
        if self.cores_needed > self.cores_free:
            out.append(
                f"WARNING: decoding needs {self.cores_needed:.1f} CPU cores per GPU beside the hardware "
                f"decoders and the node has {self.cores_free:.1f} free per GPU: the GPUs wait for data "
                "(shards of smaller JPEGs, GPUs with hardware decoders, or more CPU cores per GPU)"
            )
        if not self.stop_fits:
            out.append(
                f"WARNING: after Slurm's warning signal the job needs {self.stop_latency_s:.0f} s to stop "
                f"and {self.save_seconds:.0f} s to save, more than the {self.warning_lead_s:.0f} s lead: "
                "the time limit kills the save (raise --signal's lead in cluster/pretrain.sbatch, or lower "
                "run.log_every)"
            )
        return out


def warning_lead(sbatch: Path = SBATCH) -> float:
    """Seconds of Slurm's warning signal before the time limit in `sbatch` (its #SBATCH --signal=...@N)."""
    try:
        text = sbatch.read_text()
    except OSError:
        return DEFAULT_WARNING_LEAD_S
    match = re.search(r"^#SBATCH\s+--signal=\S*@(\d+)", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else DEFAULT_WARNING_LEAD_S


def budgets(
    cfg: TrainConfig,
    cluster: Cluster,
    params: int,
    step_seconds: float,
    images_s: float,
    jpeg_megapixels: float = IMAGENET_MEGAPIXELS,
) -> Budgets:
    """Decode and checkpoint-write budgets of `cfg` on `cluster` at the planned step time, for source
    JPEGs of `jpeg_megapixels` on average."""
    world = cluster.world_size
    per_gpu = images_s / world
    hw_capacity = cluster.jpeg_engines * NVJPG_IMAGES_S * IMAGENET_MEGAPIXELS / jpeg_megapixels
    share = cfg.data.hw_decoder_load if cluster.jpeg_engines else 0.0
    cpu_images = per_gpu - min(share * per_gpu, hw_capacity)
    shard = math.ceil(params / world)
    per_rank = (MASTER_AND_ADAM + (FP32 if cfg.ema.decay > 0 else 0)) * shard
    write = max(
        per_rank * world / (cluster.fs_gbytes * 1e9),
        per_rank * cluster.gpus_per_node / (cluster.node_write_gbytes * 1e9),
    )
    save_seconds = write / SAVE_EFFICIENCY
    # Async: a periodic save blocks for the copy into host memory, the write runs beside the steps.
    blocked = per_rank / (HOST_COPY_GBYTES * 1e9) if cfg.checkpoint.async_save else save_seconds
    every = cfg.checkpoint.every_steps
    return Budgets(
        images_s_per_gpu=per_gpu,
        jpeg_megapixels=jpeg_megapixels,
        hw_decoder_load=share,
        hw_capacity=hw_capacity,
        cpu_images_s=cpu_images,
        cores_needed=cpu_images * jpeg_megapixels / CPU_DECODE_MPIX_S,
        cores_free=max(cluster.cores_per_gpu - 1, 0.0),
        save_bytes_per_rank=per_rank,
        save_bytes=per_rank * world,
        save_seconds=save_seconds,
        stop_latency_s=cfg.run.stop_check_s + cfg.run.log_every * step_seconds,
        warning_lead_s=cluster.warning_lead_s,
        save_share=blocked / (blocked + every * step_seconds) if every else 0.0,
        blocked_seconds=blocked,
        host_bytes_per_node=per_rank * cluster.gpus_per_node if cfg.checkpoint.async_save else 0,
    )


def _usable(global_batch: int, world: int, fitting: int) -> int:
    """Largest micro-batch <= fitting with global_batch = micro x accumulation x world (0: none)."""
    per_rank, rest = divmod(global_batch, world)
    if rest:
        return 0
    return max((b for b in range(1, min(fitting, per_rank) + 1) if per_rank % b == 0), default=0)


def make_plan(
    cfg: TrainConfig,
    cluster: Cluster,
    config_name: str = "",
    num_classes: int | None = None,
    train_images: int | None = None,
    jpeg_megapixels: float = IMAGENET_MEGAPIXELS,
) -> Plan:
    """Profile the configured model and lay out memory, speed, traffic and budgets on ``cluster``.

    ``train_images`` (the corpus size) turns an epoch-based schedule into a number of steps;
    ``jpeg_megapixels`` is the source JPEGs' mean size, for the decode budget.
    """
    classes = num_classes or cfg.model.num_classes
    if classes is None:
        raise ValueError(f"{config_name or 'config'}: model.num_classes is null; pass --num-classes")
    world = cluster.world_size
    profile = profile_model(
        cfg.model, classes, cfg.engine.param_persistence_threshold, cfg.engine.gather_unit_elements
    )
    states = model_states(profile, cfg.engine, world)
    micro = cfg.data.batch_size
    global_batch = cfg.engine.global_batch_size or micro * world
    # What the trainer would refuse, refused here with the trainer's message (pretrain.ds_config).
    accumulation = grad_accum_steps(cfg.engine.global_batch_size, micro, world)
    both = (False, True)
    max_batch = {c: largest_fitting_batch(profile, states, cluster, c) for c in both}
    images_per_gpu = global_batch / world
    flops_per_image = 6.0 * profile.macs_per_image
    step_seconds = images_per_gpu * flops_per_image / (cluster.peak_tflops * 1e12 * cluster.mfu)
    micro_steps = accumulation
    comm = traffic_bytes(profile, micro_steps, world)
    return Plan(
        config=config_name,
        cluster=cluster,
        profile=profile,
        states=states,
        deepspeed_bytes=deepspeed_estimate(profile, world),
        micro_batch=micro,
        checkpointing=cfg.model.grad_checkpointing,
        global_batch=global_batch,
        accumulation=accumulation,
        activations={c: activation_bytes(profile, micro, c) for c in both},
        peak={c: peak_bytes(profile, states, cluster, micro, c) for c in both},
        max_batch=max_batch,
        max_usable_batch={c: _usable(global_batch, world, max_batch[c]) for c in both},
        step_seconds=step_seconds,
        images_per_second=global_batch / step_seconds,
        comm_bytes_per_step=comm,
        comm_seconds=comm / (cluster.link_gbytes * 1e9),
        total_steps=_total_steps(cfg, global_batch, train_images),
        budgets=budgets(
            cfg, cluster, profile.params, step_seconds, global_batch / step_seconds, jpeg_megapixels
        ),
    )


def _total_steps(cfg: TrainConfig, global_batch: int, train_images: int | None) -> int | None:
    if cfg.schedule.steps is not None:
        return cfg.schedule.steps
    if train_images is None:
        return None
    return max(1, round(cfg.schedule.epochs * train_images / global_batch))


# ---------------------------------------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_plan(plan: Plan) -> str:
    """The plan as a fixed-width report (what ``coatnet-plan`` prints)."""
    p, c, s = plan.profile, plan.cluster, plan.states
    accum = str(plan.accumulation)
    lines = [
        f"{plan.config}: {p.name} at {p.image_size}x{p.image_size}, {p.params:,} parameters, "
        f"{_count(p.macs_per_image)} MACs/image",
        f"cluster: {c.nodes} nodes x {c.gpus_per_node} GPUs = {c.world_size} ranks, "
        f"{c.gpu_memory / GIB:.1f} GiB each, {c.peak_tflops:g} TFLOP/s peak, MFU {c.mfu:.0%}",
        f"batch: global {plan.global_batch} = micro {plan.micro_batch} x accumulation {accum} x "
        f"{c.world_size} ranks",
        "",
        "memory per GPU (ZeRO-3, bf16, fp32 master weights)",
        f"  bf16 parameter shard         {_gib(s.params_bf16)}   (2 B/param / {c.world_size}"
        f"; {_count(p.persistent_params)} small params kept whole)",
        f"  fp32 master + Adam m, v      {_gib(s.master_and_adam)}   (12 B/param / {c.world_size})",
        f"  bf16 gradient shard          {_gib(s.grads_bf16)}   (2 B/param / {c.world_size})",
        f"  gathered parameters          {_gib(s.gathered_params)}   "
        f"(kept from forward to backward, up to engine.max_live_parameters; largest layer "
        f"{p.largest_layer or '-'}: {_count(p.largest_layer_params)})",
        f"  gathered gradients           {_gib(s.gathered_grads)}   (largest layer + reduce bucket)",
        f"  model states, total          {_gib(s.during_backward)}",
        f"    DeepSpeed's estimator      {_gib(plan.deepspeed_bytes)}   "
        "(estimate_zero3_model_states_mem_needs, no offload)",
        f"  fp32 gradients at the step   {_gib(s.step_fp32_grads)}   (activations freed by then)",
        f"  reserve                      {_gib(c.reserve)}   (CUDA context, NCCL, allocator slack)",
        "",
        f"{'':29}{'no checkpointing':>18}{'checkpointing':>16}",
        _row("activations", plan.activations, _gib),
        _row("peak", plan.peak, _gib),
        _row("fits", {k: v <= c.gpu_memory for k, v in plan.peak.items()}, lambda ok: "yes" if ok else "NO"),
        _row("largest micro-batch", plan.max_batch, str),
        _row(f"  dividing {plan.global_batch}/{c.world_size}", plan.max_usable_batch, str),
        f"  (the config {'uses' if plan.checkpointing else 'does not use'} activation checkpointing)",
        "",
        "ZeRO-3 partitioning (rule: pretrain.engine.zero3_gather_units)",
        f"  kept whole on every rank     {_count(p.persistent_params)} params in {p.persistent_tensors} tensors "
        "(below engine.param_persistence_threshold)",
        (
            f"  gather units                 {p.gather_units} blocks of <= engine.gather_unit_elements, largest "
            f"{_count(p.largest_unit_params)} (one all-gather each; other layers one by one)"
            if p.gather_units
            else "  gather units                 none: layer by layer (engine.gather_unit_elements=0)"
        ),
        f"  modules with gather hooks    {p.hooked_modules} (layer by layer: {p.hooked_modules_per_layer})",
        "",
        "speed",
        f"  model FLOPs per image        {6 * p.macs_per_image / 1e9:10.1f} GFLOP   (6 x MACs)",
        f"  step time                    {plan.step_seconds:10.3f} s",
        f"  throughput                   {plan.images_per_second:10.0f} images/s   "
        f"({plan.images_per_second / c.world_size:.1f} per GPU, "
        f"{plan.images_per_second / c.nodes:.0f} per node to decode)",
        f"  ZeRO-3 traffic per rank      {plan.comm_bytes_per_step / 1e9:10.2f} GB/step   "
        f"(3 x bf16 partitioned params, 2 x whole ones, x {plan.accumulation or '?'} micro-steps)",
        f"  at {c.link_gbytes:g} GB/s per GPU        {plan.comm_seconds:10.3f} s   "
        f"({'hidden behind' if plan.comm_seconds < plan.step_seconds else 'LONGER than'} compute if overlapped)",
    ]
    if plan.total_steps is not None:
        days = plan.total_steps * max(plan.step_seconds, plan.comm_seconds) / 86400
        lines.append(f"  whole run                    {plan.total_steps:10d} steps   ({days:.1f} days)")
    if plan.budgets is not None:
        lines += ["", *format_budgets(plan.budgets, c)]
    return "\n".join(lines)


def format_budgets(b: Budgets, c: Cluster) -> list[str]:
    lines = [
        f"JPEG decoding per GPU (source JPEGs of {b.jpeg_megapixels:g} MP on average)",
        f"  images/s the step consumes   {b.images_s_per_gpu:10.0f}",
        f"  hardware decoders            {b.hw_capacity:10.0f} images/s   ({c.jpeg_engines} NVJPG engines; "
        f"data.hw_decoder_load={b.hw_decoder_load:g} sends them {b.hw_decoder_load * b.images_s_per_gpu:.0f})",
        f"  CPU cores for the rest       {b.cores_needed:10.1f}   ({b.cpu_images_s:.0f} images/s; "
        f"{b.cores_free:.1f} free per GPU: {'fits' if b.decode_fits else 'DOES NOT FIT'})",
        "checkpoint",
        f"  per rank / whole             {_gib(b.save_bytes_per_rank)} / {b.save_bytes / GIB:.1f} GiB   "
        "(fp32 master + Adam m, v + EMA when on)",
        f"  save                         {b.save_seconds:10.1f} s   ({c.fs_gbytes:g} GB/s filesystem, "
        f"{c.node_write_gbytes:g} GB/s per node, commit at {SAVE_EFFICIENCY:g} of a plain write)",
        f"  periodic saves block         {b.save_share:10.1%}   of the run ({b.blocked_seconds:.1f} s each; "
        + (
            f"async: host copy at {HOST_COPY_GBYTES:g} GB/s, then written beside the steps, "
            f"{b.host_bytes_per_node / GIB:.1f} GiB host memory per node)"
            if b.host_bytes_per_node
            else "synchronous: checkpoint.async_save=false)"
        ),
        f"  stop + save after warning    {b.stop_latency_s + b.save_seconds:10.1f} s   "
        f"(of Slurm's {b.warning_lead_s:.0f} s lead: {'fits' if b.stop_fits else 'DOES NOT FIT'})",
    ]
    return lines + b.warnings()


def _row(label: str, values: dict[bool, object], fmt) -> str:
    return f"  {label:<27}{fmt(values[False]):>18}{fmt(values[True]):>16}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coatnet-plan",
        description="Per-GPU memory, largest micro-batch, step time and ZeRO-3 traffic of a training "
        "config on a GPU cluster, from the model measured on the meta device (no GPU needed).",
    )
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    parser.add_argument("--gpu-memory", required=True, help="memory per GPU, e.g. 80GiB, 80GB, 141GB")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="dense bf16 TFLOP/s per GPU (default: the config's engine.peak_tflops)",
    )
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation (default 0.4)"
    )
    parser.add_argument(
        "--link-gbytes",
        type=float,
        default=50.0,
        help="network GB/s per GPU (default 50: 400 Gb/s InfiniBand)",
    )
    parser.add_argument("--reserve", default="4GiB", help="per-GPU memory outside the model (default 4GiB)")
    parser.add_argument(
        "--gpu-model",
        choices=sorted(NVJPG_ENGINES),
        default="h100",
        help="sets the hardware JPEG decoders per GPU (a100: 5, h100/h200: 7, none: 0; default h100)",
    )
    parser.add_argument(
        "--jpeg-engines", type=int, help="hardware JPEG decoders per GPU (overrides --gpu-model)"
    )
    parser.add_argument(
        "--jpeg-megapixels",
        type=float,
        default=IMAGENET_MEGAPIXELS,
        help=f"mean size of the source JPEGs in the shards (default {IMAGENET_MEGAPIXELS}: ImageNet-1k's)",
    )
    parser.add_argument(
        "--cpus-per-node",
        type=int,
        default=0,
        help=f"CPU cores per node (default {DEFAULT_CORES_PER_GPU} per GPU, a DGX H100's)",
    )
    parser.add_argument(
        "--fs-gbytes",
        type=float,
        default=Cluster.fs_gbytes,
        help=f"checkpoint filesystem's aggregate write GB/s (default {Cluster.fs_gbytes:g})",
    )
    parser.add_argument(
        "--node-write-gbytes",
        type=float,
        default=Cluster.node_write_gbytes,
        help=f"write GB/s one node reaches (default {Cluster.node_write_gbytes:g})",
    )
    parser.add_argument(
        "--warning-lead",
        type=float,
        help="seconds of Slurm's warning signal before the time limit (default: the --signal=...@N of "
        f"cluster/pretrain.sbatch, else {DEFAULT_WARNING_LEAD_S})",
    )
    parser.add_argument("--num-classes", type=int, help="classifier size when the config leaves it null")
    parser.add_argument(
        "--train-images", type=int, help="training images per epoch: adds the whole run's steps and days"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=32")
    return parser


def _cluster(args: argparse.Namespace, cfg: TrainConfig) -> Cluster:
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    peak = args.peak_tflops if args.peak_tflops is not None else cfg.engine.peak_tflops
    if peak <= 0:
        raise ValueError("--peak-tflops must be positive (the config's engine.peak_tflops is 0)")
    for name in ("jpeg_megapixels", "fs_gbytes", "node_write_gbytes"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if (args.jpeg_engines or 0) < 0 or args.cpus_per_node < 0:
        raise ValueError("--jpeg-engines and --cpus-per-node cannot be negative")
    return Cluster(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory=parse_memory(args.gpu_memory),
        peak_tflops=peak,
        mfu=args.mfu,
        link_gbytes=args.link_gbytes,
        reserve=parse_memory(args.reserve),
        jpeg_engines=NVJPG_ENGINES[args.gpu_model] if args.jpeg_engines is None else args.jpeg_engines,
        cpus_per_node=args.cpus_per_node,
        fs_gbytes=args.fs_gbytes,
        node_write_gbytes=args.node_write_gbytes,
        warning_lead_s=warning_lead() if args.warning_lead is None else args.warning_lead,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``coatnet-plan``."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(
            cfg,
            _cluster(args, cfg),
            Path(args.config).name,
            args.num_classes,
            args.train_images,
            args.jpeg_megapixels,
        )
    except (ConfigError, ValueError) as err:
        print(f"coatnet-plan: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
