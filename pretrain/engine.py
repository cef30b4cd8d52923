"""Model and DeepSpeed engine construction: the model is built inside `deepspeed.zero.Init`.

Under ZeRO stage 3 every parameter is partitioned as soon as its module is constructed, so no rank
ever holds the whole of CoAtNet-7 (2.44B parameters = 4.9 GB in bf16 before optimizer state).

Precision: zero.Init creates every floating tensor of a module's `__init__` in bf16, buffers included,
and DeepSpeed 0.19.8 keeps buffers in whatever dtype they have (`data_types.buffer_dtype` unset).
CoAtNet's BatchNorm (`pretrain.model.layers.BatchNorm2d`) turns its running statistics back to fp32
in its own `__init__` and normalises bf16 activations with fp32 statistics; `batchnorm_dtypes` checks it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from pretrain.model import CoAtNet, create_model

if TYPE_CHECKING:  # importable with torch alone (benchmarks/gpu_check.py): the config needs PyYAML
    from pretrain.config import ModelConfig


def set_determinism(deterministic: bool) -> None:
    """`engine.deterministic`: bitwise-repeatable kernels on GPUs (docs/determinism.md), or the fast ones.

    On: cuBLAS with a fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, read when cuBLAS creates its handle,
    so this runs before the model touches the device), cuDNN's deterministic algorithms without
    autotuning, and torch's deterministic mode, which raises on an op that has no deterministic kernel
    (naming it) rather than silently breaking the guarantee. Off: cuDNN autotunes its convolutions
    (fixed input shapes: measured once per shape). CPU kernels are deterministic either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def batchnorm_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """Dtypes of every BatchNorm running statistic (expected: {torch.float32} under bf16 too)."""
    return {
        buf.dtype
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for buf in (m.running_mean, m.running_var)
        if buf is not None
    }


def build_model(cfg: ModelConfig, *, num_classes: int, ds_config: dict) -> CoAtNet:
    """The configured CoAtNet, partitioned at construction time under ZeRO-3."""
    import deepspeed  # imported after pretrain.dist.init_distributed has chosen the accelerator

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext()
    with ctx:
        model = create_model(
            cfg.name,
            num_classes=num_classes,
            image_size=cfg.image_size,
            drop_path_rate=cfg.drop_path_rate,
            **cfg.overrides(),
        )
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: dict,
    *,
    compile_model: bool = False,
    gather_unit_elements: int = 0,
):
    """DeepSpeed engine around the model, our optimizer and our schedule; compiled if `compile_model`.

    Compiling is `engine.compile()`, DeepSpeed's own path: the whole module, in place
    (`nn.Module.compile`: parameter names, state dicts and checkpoints are unchanged), inductor.
    The whole model rather than each block: a checkpointed block is then a region of the graph that
    the partitioner recomputes (a block compiled on its own under an eager checkpoint may save other
    tensors when recomputing than in its forward, which checkpoint rejects), and fusion does not stop
    at block boundaries. Under ZeRO-3, DeepSpeed's compiler-disabled parameter hooks cut the graph at
    every layer with parameters, and checkpointed blocks run eagerly (correctly: see
    `pretrain.model.coatnet.checkpoint_block`). The first step pays the compilation.
    """
    import deepspeed

    if ds_config["zero_optimization"]["stage"] == 3 and gather_unit_elements > 0:
        from deepspeed.utils import set_z3_leaf_modules_by_name

        units = zero3_gather_units(model, gather_unit_elements)
        if units:  # before initialize: it installs the gather hooks, and none below a unit
            set_z3_leaf_modules_by_name(model, units)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    fp32_gradients_without_flat_copy(engine.optimizer)
    if compile_model:
        engine.compile()
    return engine


def zero3_gather_units(model: torch.nn.Module, max_elements: int) -> list[str]:
    """Blocks ZeRO-3 gathers in one go (DeepSpeed "leaf" modules: one all-gather of all their parameters
    at entry, no hooks below): every block of at most `max_elements` parameter elements; larger blocks
    keep DeepSpeed's per-layer gathers (their layers are large tensors already). Why: ZeRO-3's cost on
    this model is per module, not per byte -- a hook pair and a gather for each of the ~15 parameterised
    layers of a block (convs, norms, the attention's projections and bias table) -- and a block is the
    unit activation checkpointing recomputes, so its parameters are needed together anyway. Not whole
    stages: a checkpointed block's recompute in the backward then runs before the stage's backward
    gather (measured: empty parameters); not the stem, whose input needs no gradient: DeepSpeed's
    backward gather of a leaf does not happen before its recompute there (the same error). On 2 CPU
    ranks (benchmarks/engine_overhead.py, CoAtNet-0 small): ZeRO-3's median step 0.124 s layer by layer, 0.093 s with blocks as units. The cap
    (engine.gather_unit_elements; 150M elements = 300 MB in bf16 covers every block of CoAtNet-0..7, the
    largest being CoAtNet-7's last stage's 113M) bounds what one unit holds gathered. Numerics: from
    batch 2 per rank the activations (values and strides) equal layer-by-layer ones bitwise. At batch 1
    they differ by rounding (fp32: 1 ulp of the first loss; bf16: its 5th digit): the block input that
    DeepSpeed's leaf-module hook hands on has another stride on its size-1 batch dimension, so the
    first block's pooling returns NCHW instead of channels-last and every later conv and norm runs the
    other memory format's kernels (measured with forward hooks on CoAtNet-5's widths, 1 block per
    stage). Off by default because it is not faster on 2 CPU ranks. Names as in `named_modules`."""
    return [
        f"stages.{i}.blocks.{j}"
        for i, stage in enumerate(getattr(model, "stages", []))
        if stage.kind != "stem"
        for j, block in enumerate(stage.blocks)
        if full_parameter_count(block) <= max_elements
    ]


def adjacent_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view over `tensors` when they lie end to end in one storage (in order, same dtype), else None."""
    if not tensors or any(t is None or t.dim() != 1 or not t.is_contiguous() for t in tensors):
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def fp32_gradients_without_flat_copy(optimizer) -> bool:
    """ZeRO-3's step turns each sub-group's gradient partitions into the fp32 gradient of its master
    partition as `flatten(partitions).to(fp32)` (deepspeed 0.19.8, `_prepare_fp32_grad_for_sub_group`).
    The partitions are already consecutive slices of one flat bf16 buffer, so the flatten is a second
    bf16 copy of the whole partition at the step's peak: 0.64 GiB per rank for CoAtNet-5 on 2 ranks,
    2.3 GiB on CoAtNet-7 over 2 ranks. Here the fp32 gradient is cast from a view of those slices: the
    same values (one cast of the same elements), one allocation fewer. Installed when the optimizer is
    ZeRO-3 without optimizer offload; falls back to DeepSpeed's own code for a sub-group whose partitions
    are not one span (a frozen parameter) or whose dtype needs no cast (fp32 training: the cast would
    return the buffer itself, which the step then modifies in place). Returns whether it was installed."""
    needed = ("_prepare_fp32_grad_for_sub_group", "averaged_gradients", "fp32_partitioned_groups_flat")
    if not all(hasattr(optimizer, name) for name in needed) or getattr(optimizer, "offload_optimizer", True):
        return False
    deepspeeds_own = optimizer._prepare_fp32_grad_for_sub_group

    def prepare(sub_group_id: int) -> None:
        master = optimizer.fp32_partitioned_groups_flat[sub_group_id]
        span = adjacent_span(optimizer.averaged_gradients[sub_group_id])
        if span is None or span.dtype == master.dtype or span.numel() != master.numel():
            deepspeeds_own(sub_group_id)
            return
        master.grad = span.to(master.dtype)
        optimizer.averaged_gradients[sub_group_id] = None
        optimizer.fp32_grads_cast_from_view = getattr(optimizer, "fp32_grads_cast_from_view", 0) + 1

    optimizer._prepare_fp32_grad_for_sub_group = prepare
    return True


@contextlib.contextmanager
def untraced_forward(engine) -> Iterator[None]:
    """Run a forward that is not a training step (the resume canary) without ZeRO-3 adopting it as its trace.

    ZeRO-3 records the module order of the first forward it sees and, at the start of the next one, freezes
    it as the trace that drives prefetching and releasing. Its release decisions are memoised per (module,
    position in the trace) and outlive a re-recorded trace (deepspeed 0.19.8, `__params_to_release` under
    `lru_cache`). When the first forward of a process is an eval forward (the canary after a resume), the
    first training step runs on that forward-only trace, caches "release after use" for every forward
    position, and every later step keeps releasing parameters after their forward use and gathering them
    again one module at a time: on the smoke model 37 all-gathers of 2x the weights per step instead of one,
    and 0.4-0.6x the speed of an uninterrupted run. Dropping this forward's recording makes the first
    training step record the real trace, as in a fresh process. A forward that runs under a complete trace
    (the canary at a save, evaluation) records nothing and is left alone.
    """
    offload = getattr(engine.optimizer, "parameter_offload", None)  # only ZeRO-3 has a coordinator
    coordinator = offload.get_param_coordinator() if offload is not None else None
    try:
        yield
    finally:
        # Recording after the forward means the trace was invalid when it started: this forward is the
        # recording. `_invalidate_trace` is what DeepSpeed itself calls when a module's hooks change.
        if coordinator is not None and coordinator.is_record_trace():
            coordinator._invalidate_trace()


def full_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model, also when ZeRO-3 holds only a shard of each (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameter elements this rank stores: its ZeRO-3 partitions, plus the whole tensors of parameters
    below `stage3_param_persistence_threshold` that ZeRO-3 keeps on every rank (everything without ZeRO-3)."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
        else:
            total += p.numel()
    return total


def training_flops_per_image(cfg: ModelConfig, num_classes: int) -> float:
    """Training FLOPs per image: 3 (forward + 2 x backward) x 2 FLOPs per multiply-accumulate (on meta)."""
    from pretrain.model import count_macs

    with torch.device("meta"):
        meta = create_model(cfg.name, num_classes=num_classes, image_size=cfg.image_size, **cfg.overrides())
    return 6.0 * count_macs(meta, cfg.image_size).macs
