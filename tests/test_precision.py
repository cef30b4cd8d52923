"""bf16 under ZeRO-3 keeps BatchNorm statistics in fp32; the determinism switch sets what it promises.

The ZeRO-3 part runs as a script in a fresh process (DeepSpeed CPU accelerator, gloo, one rank), the
way tests/test_model_zero3.py does: deepspeed is only imported there, never at collection time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = {"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}


def zero3_bf16_run(save_dir: str) -> None:
    """Build through pretrain.engine as the trainer does, train 3 steps on bf16 input, save, inspect."""
    import deepspeed

    from pretrain.config import EngineConfig, ModelConfig, OptimConfig
    from pretrain.ds_config import deepspeed_config
    from pretrain.engine import batchnorm_dtypes, build_engine, build_model
    from pretrain.state import BatchNormStats

    deepspeed.init_distributed(dist_backend="gloo")
    engine_cfg = EngineConfig(precision="bf16", zero_stage=3, param_persistence_threshold=0)
    ds = deepspeed_config(engine_cfg, OptimConfig(), micro_batch=4, world_size=1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=32, **TINY), num_classes=10, ds_config=ds)
    assert batchnorm_dtypes(model) == {torch.float32}, f"after zero.Init: {batchnorm_dtypes(model)}"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, "parameters are bf16 shards"
    engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds)
    assert batchnorm_dtypes(engine.module) == {torch.float32}, "after deepspeed.initialize"
    before = BatchNormStats(engine.module).state_dict()
    x, y = torch.randn(4, 3, 32, 32).bfloat16(), torch.tensor([1, 2, 3, 4])
    for _ in range(3):
        logits = engine(x)
        assert logits.dtype == torch.bfloat16, "the activations stay bf16 around the fp32 statistics"
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        engine.backward(loss)
        engine.step()
    after = BatchNormStats(engine.module).state_dict()
    moved = [k for k in after if "running_" in k and not torch.equal(after[k], before[k])]
    assert moved, "the running statistics were updated"
    assert all(after[k].dtype == torch.float32 for k in after if "running_" in k)
    assert batchnorm_dtypes(engine.module) == {torch.float32}, "after 3 steps"
    engine.save_checkpoint(save_dir, tag="t")
    states = torch.load(
        Path(save_dir) / "t" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    saved = {k: v for k, v in states["module"].items() if "running_" in k}
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}, "the checkpoint holds fp32 stats"
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    print("BN-FP32-OK")


def test_batchnorm_statistics_stay_fp32_under_zero3_bf16(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
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
    assert proc.returncode == 0 and "BN-FP32-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_batchnorm_matches_plain_batchnorm_when_dtypes_agree():
    """fp32 everywhere (or bf16 everywhere): the subclass is nn.BatchNorm2d, bit for bit."""
    from pretrain.model.layers import BatchNorm2d

    torch.manual_seed(0)
    ours, plain = BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 5, 5)
    assert torch.equal(ours(x), plain(x)) and torch.equal(ours.running_var, plain.running_var)
    # bf16 weights with fp32 statistics (what ZeRO-3 bf16 holds): close to the fp32 computation.
    mixed = BatchNorm2d(8)
    mixed.weight.data, mixed.bias.data = mixed.weight.data.bfloat16(), mixed.bias.data.bfloat16()
    reference = torch.nn.BatchNorm2d(8)
    out = mixed(x.bfloat16())
    assert out.dtype == torch.bfloat16 and mixed.running_mean.dtype == torch.float32
    assert torch.allclose(out.float(), reference(x), atol=3e-2)
    assert torch.allclose(mixed.running_var, reference.running_var, atol=1e-2)
    assert int(mixed.num_batches_tracked) == 1


def test_determinism_switch_sets_torch_flags():
    from pretrain.engine import set_determinism

    saved = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", saved)
        set_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    finally:
        set_determinism(False)
        torch.backends.cudnn.benchmark = False
        if saved is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(lambda: zero3_bf16_run(sys.argv[1]))
