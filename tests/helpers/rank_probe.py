"""Started by a launcher in tests: reports what pretrain.dist sees and proves the process group works."""

import json
import logging
import os
import sys
from pathlib import Path

import torch

from pretrain import dist
from pretrain.logs import setup_logging


def main() -> None:
    # The deepspeed launcher adds --local_rank=N to the arguments; the rank comes from the environment.
    out_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    info = dist.detect()
    setup_logging(info, out_dir / "logs")
    dist.init_distributed(info, timeout_minutes=2)
    total = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    dist.barrier()  # every rank is past its shm clean-up
    port = os.environ["MASTER_PORT"]
    shm_left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    logging.getLogger("pretrain.probe").info("hello from rank %d", info.rank)
    (out_dir / f"probe{info.rank}.json").write_text(
        json.dumps(
            {
                **info.__dict__,
                "is_main": info.is_main,
                "sum": total.item(),
                "torch_rank": torch.distributed.get_rank(),
                "torch_world": torch.distributed.get_world_size(),
                "shm_left": shm_left,
            }
        )
    )
    dist.destroy()


if __name__ == "__main__":
    dist.run_and_exit(main)  # not the interpreter's teardown: gloo's threads can abort it
