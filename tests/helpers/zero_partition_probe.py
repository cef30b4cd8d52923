"""Started by torchrun in tests: build a full-size CoAtNet under ZeRO-3's zero.Init and report the shard sizes."""

import json
import sys
import time
from pathlib import Path

from pretrain import dist
from pretrain.config import EngineConfig, ModelConfig, OptimConfig
from pretrain.ds_config import deepspeed_config
from pretrain.engine import build_model, full_parameter_count, local_parameter_count


def main() -> None:
    out_dir, name = Path(sys.argv[1]), sys.argv[2]
    info = dist.detect()
    dist.init_distributed(info, timeout_minutes=10)
    ds = deepspeed_config(EngineConfig(), OptimConfig(), micro_batch=1, world_size=info.world_size)
    t0 = time.perf_counter()
    model = build_model(ModelConfig(name=name, image_size=224), num_classes=1000, ds_config=ds)
    (out_dir / f"rank{info.rank}.json").write_text(
        json.dumps(
            {
                "full": full_parameter_count(model),
                "local": local_parameter_count(model),
                "seconds": time.perf_counter() - t0,
            }
        )
    )
    dist.destroy()


if __name__ == "__main__":
    dist.run_and_exit(main)  # not the interpreter's teardown: gloo's threads can abort it
