"""Started by torchrun in tests: parameter all-gathers per ZeRO-3 training step, with and without an eval
forward (the resume canary) before the first training step. Writes rank<R>.json into argv[1].

Each variant builds its own engine from configs/smoke.yaml's model/engine/optim sections (the trainer's
builders), optionally runs the canary-like forward (eval mode, no_grad, 4 images), then trains STEPS steps
on fixed random bf16 batches and counts `torch.distributed.all_gather_into_tensor` calls per step.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch

from pretrain import dist
from pretrain.config import load_config
from pretrain.ds_config import deepspeed_config
from pretrain.engine import build_engine, build_model, untraced_forward
from pretrain.optim import build_optimizer

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
CALLS = [0]

_gather = torch.distributed.all_gather_into_tensor


def counting_gather(*args, **kwargs):
    CALLS[0] += 1
    return _gather(*args, **kwargs)


# DeepSpeed's comm backend keeps a reference to this function when the process group starts.
torch.distributed.all_gather_into_tensor = counting_gather


def gathers_per_step(cfg, world_size: int, canary) -> list[int]:
    ds = deepspeed_config(cfg.engine, cfg.optim, micro_batch=cfg.data.batch_size, world_size=world_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, ds_config=ds)
    engine = build_engine(
        model,
        build_optimizer(model, cfg.optim),
        None,
        ds,
        gather_unit_elements=cfg.engine.gather_unit_elements,
    )
    size = cfg.model.image_size
    images = torch.randn(cfg.data.batch_size, 3, size, size, dtype=torch.bfloat16)
    targets = torch.randint(0, 10, (cfg.data.batch_size,))
    if canary is not None:
        engine.eval()
        with torch.no_grad(), canary(engine):
            engine(images[:4])
        engine.train()
    counts = []
    for _ in range(STEPS):
        before = CALLS[0]
        loss = torch.nn.functional.cross_entropy(engine(images).float(), targets)
        engine.backward(loss)
        engine.step()
        counts.append(CALLS[0] - before)
    return counts


def main() -> None:
    info = dist.detect()
    dist.init_distributed(info, timeout_minutes=10)
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    report = {
        "fresh": gathers_per_step(cfg, info.world_size, None),
        "canary_untraced": gathers_per_step(cfg, info.world_size, untraced_forward),
        "canary_plain": gathers_per_step(cfg, info.world_size, lambda engine: contextlib.nullcontext()),
    }
    (Path(sys.argv[1]) / f"rank{info.rank}.json").write_text(json.dumps(report))
    dist.destroy()


if __name__ == "__main__":
    dist.run_and_exit(main)  # not the interpreter's teardown: gloo's threads can abort it
