"""The model under DeepSpeed ZeRO-3 on the CPU accelerator (world size 1, gloo), in a fresh process.

Pins what the trainer relies on: building inside ``deepspeed.zero.Init`` keeps the spec's initialisation,
config-derived table shapes equal the shards' ``ds_shape``, the pure resize works from ``ds_shape``,
``no_weight_decay`` ignores the empty shard shapes, and activation checkpointing under a ZeRO-3 bf16
engine gives the same losses as no checkpointing, and `build_engine`'s step (fp32 gradients cast
from a view) the same losses and master weights as DeepSpeed's own. Run as a script by the test below (deepspeed is only
imported there, never at collection time).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from pretrain.dist import free_port
from pretrain.model import create_model, resize_relative_bias_tables
from tests.helpers.launch import REPO

SMALL = {"depths": [1, 1, 1, 2, 1], "dims": [32, 32, 64, 128, 256], "head_dim": 32, "num_classes": 10}
DS = {
    "train_micro_batch_size_per_gpu": 4,
    "bf16": {"enabled": True},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def sharded(image_size: int, seed: int, config: dict = DS):
    import deepspeed

    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=config):
        return create_model("coatnet_0", image_size=image_size, **SMALL)


def check_init_and_shapes() -> None:
    import deepspeed

    model = sharded(128, 0, {**DS, "bf16": {"enabled": False}})  # fp32 shards: compared exactly below
    params = dict(model.named_parameters())
    assert all(p.numel() == 0 for p in params.values()), "parameters are not partitioned"
    # Config-derived table shapes match the real (ds_shape) shapes of the shards.
    shapes = model.relative_bias_table_shapes()
    assert shapes and all(params[k].ds_shape == s for k, s in shapes.items())
    # no_weight_decay does not depend on (empty) shapes.
    plain = create_model("coatnet_0", image_size=128, **SMALL)
    assert model.no_weight_decay() == plain.no_weight_decay()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        w = params["stages.3.blocks.0.mlp.fc1.weight"]
        # nn.Linear's default init would give std 1/sqrt(3 * 128) = 0.051; ours is 0.02 cut at 2 std.
        assert abs(w.std().item() - 0.0176) < 0.002 and w.abs().max() <= 0.04 + 1e-6
        assert params["stages.3.blocks.0.mlp.fc1.bias"].abs().max() == 0
        assert params["stages.3.blocks.0.attn.relative_position_bias_table"].abs().max() > 0

    # A 64-pixel checkpoint resized with the shards' ds_shape, then loaded into the gathered model.
    source = create_model("coatnet_0", image_size=64, **SMALL).state_dict()
    resized_state, keys = resize_relative_bias_tables(source, {n: p.ds_shape for n, p in params.items()})
    assert sorted(keys) == sorted(shapes)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.load_state_dict(resized_state)
    reference = create_model("coatnet_0", image_size=128, **SMALL)
    reference.load_state_dict(source)  # the model's own load resizes the same way
    x = torch.randn(2, 3, 128, 128)
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)


def hooked_modules(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if m._forward_pre_hooks)


def losses(
    checkpointing: bool, save_dir: str | None = None, ours: bool = False, units: int = 0
) -> list[float]:
    """Three steps' losses (and one after a save and load) of DeepSpeed's own engine, or with `ours` of
    `build_engine`'s (its fp32 gradients cast from a view of the partitions), whose updated master
    weights are then kept in MASTERS."""
    import deepspeed

    from pretrain.engine import build_engine

    model = sharded(64, 1)
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if ours:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        engine = build_engine(model, optimizer, scheduler, DS, gather_unit_elements=units)
        HOOKED[units] = hooked_modules(engine.module)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS)
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 64, 64).bfloat16(), torch.tensor([1, 2, 3, 4])
    out = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    if save_dir:
        # DeepSpeed's own ZeRO-3 resume loads a state dict of empty placeholders through the model's
        # load_state_dict: the table-resize hook must leave those alone.
        engine.save_checkpoint(save_dir, tag="t")
        engine.load_checkpoint(save_dir, tag="t")
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        out.append(loss.item())
    MASTERS[ours] = [t.clone() for t in engine.optimizer.fp32_partitioned_groups_flat]
    if ours:
        assert engine.optimizer.fp32_grads_cast_from_view == 3, "the view path did not run at every step"
    return out


MASTERS: dict[bool, list[torch.Tensor]] = {}
HOOKED: dict[int, int] = {}  # gather_unit_elements -> modules with ZeRO-3 forward hooks


def main() -> int:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    check_init_and_shapes()
    plain, ckpt = losses(False, save_dir=sys.argv[1]), losses(True, save_dir=sys.argv[1])
    print("losses", plain, ckpt)
    assert plain == ckpt, (plain, ckpt)
    theirs = MASTERS[False]
    assert losses(True, ours=True) == ckpt[:3]
    assert all(torch.equal(a, b) for a, b in zip(MASTERS[True], theirs, strict=True)), "master weights differ"
    # Gather units (here every block): the same arithmetic, ZeRO-3's hooks on the blocks, not their layers.
    assert losses(True, ours=True, units=2_000_000) == ckpt[:3]
    assert all(torch.equal(a, b) for a, b in zip(MASTERS[True], theirs, strict=True)), "master weights differ"
    assert HOOKED[2_000_000] < HOOKED[0] / 3, HOOKED
    assert plain[-1] < plain[0]
    print("ZERO3-OK")
    return 0


def test_model_under_zero3_init_and_engine(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",  # a small model; two spin-waiting threads crawl on a loaded machine
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "ckpt")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "ZERO3-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(main)
