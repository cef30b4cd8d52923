"""Model and DeepSpeed engine construction: the model is built inside `deepspeed.zero.Init`.

Under ZeRO stage 3 every parameter is partitioned as soon as its module is constructed, so no rank
ever holds the whole of CoAtNet-7 (2.44B parameters = 4.9 GB in bf16 before optimizer state).
"""

from __future__ import annotations

import contextlib

import torch

from pretrain.config import ModelConfig
from pretrain.model import CoAtNet, create_model


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

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if compile_model:
        engine.compile()
    return engine


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
