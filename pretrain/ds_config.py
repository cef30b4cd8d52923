"""DeepSpeed's JSON config, generated from the typed config (never kept by hand beside it)."""

from __future__ import annotations

from pretrain.config import EngineConfig, OptimConfig
from pretrain.configlib import ConfigError


def grad_accum_steps(global_batch_size: int | None, micro_batch: int, world_size: int) -> int:
    """Accumulation steps so that micro-batch x accumulation x world size = global batch (checked)."""
    if global_batch_size is None:
        return 1
    per_step = micro_batch * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"engine.global_batch_size={global_batch_size} is not a multiple of data.batch_size x world size "
            f"= {micro_batch} x {world_size} = {per_step}"
        )
    return global_batch_size // per_step


def deepspeed_config(
    engine: EngineConfig,
    optim: OptimConfig,
    *,
    micro_batch: int,
    world_size: int,
    load_universal: bool = False,
) -> dict:
    """The dict handed to `deepspeed.initialize(config=...)`.

    The optimizer and the schedule are not in it: the trainer passes torch's AdamW and its own
    schedule as objects, because DeepSpeed's CPU Adam does not resume bit-exactly (its bias correction
    is accumulated in a long-lived process but recomputed after a reload: measured 2e-3 loss drift 20
    steps after a resume) and the paper's schedules are not all among DeepSpeed's.
    """
    accum = grad_accum_steps(engine.global_batch_size, micro_batch, world_size)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": engine.precision == "bf16"},
        "zero_optimization": {
            "stage": engine.zero_stage,
            "overlap_comm": engine.overlap_comm,
            "contiguous_gradients": engine.contiguous_gradients,
            "reduce_bucket_size": engine.reduce_bucket_size,
            "stage3_prefetch_bucket_size": engine.prefetch_bucket_size,
            "stage3_param_persistence_threshold": engine.param_persistence_threshold,
            "stage3_max_live_parameters": engine.max_live_parameters,
            "stage3_max_reuse_distance": engine.max_reuse_distance,
            # Exports consolidate fp32 weights from the checkpoint instead (pretrain.export).
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        # torch.optim.AdamW is a "client" optimizer DeepSpeed has not tested with ZeRO; it works (measured).
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # our own metrics line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
