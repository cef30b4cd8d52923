"""Initial weights under ZeRO-3 on two ranks: every partition ends up holding the export's values.

Rank 0 alone reads the partitioned parameters from the export (GatheredParameters broadcasts its values),
so a mistake in who reads what shows as rank 1's slices keeping their random initialisation. The script
runs under torchrun (gloo, DeepSpeed's CPU accelerator); deepspeed is imported only there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import run_script, tail

TINY = {"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}


def load_on_ranks(folder: str) -> None:
    import deepspeed
    from safetensors.torch import save_file

    from pretrain import dist
    from pretrain.config import EngineConfig, InitConfig, ModelConfig, OptimConfig
    from pretrain.ds_config import deepspeed_config
    from pretrain.engine import build_model
    from pretrain.model import create_model
    from pretrain.model.relative_bias import TABLE_SUFFIX, interpolate_table
    from pretrain.transfer import load_initial_weights

    deepspeed.init_distributed(dist_backend="gloo")
    export = Path(folder) / "pre.safetensors"
    torch.manual_seed(1)
    source = create_model("coatnet_0", num_classes=10, image_size=32, **TINY)
    for module in source.modules():  # BatchNorm statistics that differ from a fresh model's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    weights = source.state_dict()
    if dist.rank() == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(export))
    dist.barrier()

    engine_cfg = EngineConfig(precision="fp32", zero_stage=3, param_persistence_threshold=0)
    ds = deepspeed_config(engine_cfg, OptimConfig(), micro_batch=2, world_size=dist.world_size())
    torch.manual_seed(2)
    model = build_model(ModelConfig(image_size=64, **TINY), num_classes=2, ds_config=ds)
    report = load_initial_weights(model, InitConfig(path=str(export)))
    assert report.reinitialised == ["head.fc.bias", "head.fc.weight"], report
    assert len(report.resized) == 2 and not report.missing and not report.unexpected, report

    checked = 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            value = param.detach().clone()
        if name.startswith("head.fc."):
            continue
        expected = weights[name]
        if name.endswith(TABLE_SUFFIX) and expected.shape != value.shape:
            expected = interpolate_table(expected, (value.shape[1], value.shape[2]))
        assert torch.equal(value, expected), f"rank {dist.rank()}: {name} differs from the export"
        checked += 1
    for name, buf in model.state_dict().items():
        if "running_" in name:
            assert torch.equal(buf, weights[name]), f"rank {dist.rank()}: {name}"
            checked += 1
    print(f"rank {dist.rank()}: {checked} tensors equal the export", flush=True)
    print("LOAD-OK", flush=True)
    dist.destroy()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_initial_weights_reach_every_zero3_partition_on_two_ranks(tmp_path: Path) -> None:
    proc = run_script(Path(__file__), str(tmp_path), nproc=2, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("LOAD-OK") == 2, tail(proc)


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(lambda: load_on_ranks(sys.argv[1]))
