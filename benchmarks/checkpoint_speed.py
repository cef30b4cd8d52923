"""Checkpoint save/load GB/s against a plain sequential write/read of the same bytes on the same disk.

One real ZeRO-3 engine (bf16, torch AdamW with its moments after one step, the trainer's own builders)
saves through `CheckpointManager.save` twice per iteration, side by side:
- synchronously (checkpoint.async_save=false), phases timed: DeepSpeed's per-rank files (write), each
  rank's fsync + digest of its own files (seal), gather + manifest + pointer + prune (commit);
- async (the default): the seconds until `save` returns (what training is blocked for: DeepSpeed's
  state gathering and the copy into host memory), and until the background write is committed
  (`finish` called at once: nothing else running meanwhile).
Then it loads with `engine.load_checkpoint`. The baseline writes each rank's share of the same number of
bytes as one file in 64 MiB blocks and reads it back, in the same iteration (the machine's load drifts).
Like for like: DeepSpeed's write (torch.save, no fsync) against the plain write; the whole committed save
(durable: fsynced) against the plain write + fsync; the async save's blocked seconds against the
synchronous save's. One untimed save of each kind first (DeepSpeed's first-save set-up, the host
buffers' pages: what a run pays once). Reads come from the page cache when the machine has the memory
for it (said in the output).

Usage: python benchmarks/checkpoint_speed.py [--model coatnet_1] [--image-size 224] [--dir DIR] [--repeat 3]
   or: torchrun --nproc_per_node 2 benchmarks/checkpoint_speed.py ...   (every rank writes its share)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pretrain import dist
from pretrain.checkpoint import CheckpointManager, tag_for
from pretrain.config import CheckpointConfig, EngineConfig, ModelConfig, OptimConfig
from pretrain.ds_config import deepspeed_config
from pretrain.engine import build_engine, build_model, full_parameter_count
from pretrain.optim import build_optimizer

BLOCK = 64 << 20
_DATA = os.urandom(BLOCK)  # incompressible, like trained weights; made once, outside every timing


def build(model_name: str, image_size: int, info: dist.RankInfo):
    """A ZeRO-3 engine whose optimizer holds fp32 master weights and both Adam moments (one step taken)."""
    engine_cfg, optim_cfg = EngineConfig(global_batch_size=None), OptimConfig()
    ds_config = deepspeed_config(engine_cfg, optim_cfg, micro_batch=1, world_size=info.world_size)
    model = build_model(
        ModelConfig(name=model_name, image_size=image_size), num_classes=1000, ds_config=ds_config
    )
    engine = build_engine(
        model,
        build_optimizer(model, optim_cfg),
        None,
        ds_config,
        gather_unit_elements=engine_cfg.gather_unit_elements,
    )
    images = torch.randn(1, 3, image_size, image_size, dtype=torch.bfloat16)
    loss = engine(images).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    return engine, full_parameter_count(model)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn, managers: tuple[CheckpointManager, ...] = ()) -> float:
    """Seconds `fn` takes on the slowest rank (barriers on both sides).

    Starts from a settled machine, as a save in a run finds it minutes after the previous one: the
    retention deletions of `managers` ended (they run in the background; here the saves follow one
    another at once) and a clean page cache (os.sync). Otherwise the previous measurement's deletions and
    dirty pages are worked off during this one and charged to it.
    """
    for manager in managers:
        manager.close()
    os.sync()
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def save_async(manager: CheckpointManager, engine, step: int) -> tuple[float, object]:
    """An async save of `step` to its commit: (seconds until `save` returned, the commit)."""
    start = time.perf_counter()
    manager.save(engine, step, {}, meta={}, wait=False)
    blocked = time.perf_counter() - start
    return blocked, manager.finish()


def plain_write(path: Path, nbytes: int, fsync: bool) -> None:
    view = memoryview(_DATA)
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(view[: min(BLOCK, left)])
            left -= BLOCK
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def plain_read(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(BLOCK)
        while fh.readinto(buf):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="coatnet_1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    info = dist.detect()
    if info.launcher == "single":
        os.environ.setdefault("MASTER_PORT", str(dist.free_port()))  # for the one-process group
    dist.init_distributed(info, timeout_minutes=30)
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    root = Path(dist.broadcast_object(str(root)))
    engine, params = build(args.model, args.image_size, info)
    sync = CheckpointManager(CheckpointConfig(keep_last=1, async_save=False), root / "sync", info)
    background = CheckpointManager(CheckpointConfig(keep_last=1, async_save=True), root / "async", info)
    for manager in (sync, background):  # untimed: DeepSpeed's first-save set-up, the host buffers' pages
        manager.save(engine, 0, {}, meta={})

    keys = (
        "write",
        "seal",
        "commit",
        "managed",
        "blocked",
        "background",
        "async",
        "load",
        "plain",
        "fsync",
        "read",
    )
    rows: dict[str, list[float]] = {k: [] for k in keys}
    total = 0
    settled = (sync, background)
    for i in range(1, args.repeat + 1):
        saved = []
        rows["managed"].append(timed(lambda: saved.append(sync.save(engine, i, {}, meta={})), settled))  # noqa: B023
        for phase in ("write", "seal", "commit"):  # slowest rank per phase
            rows[phase].append(float(dist.all_reduce_max(torch.tensor([saved[0].timings[phase]]))))
        # Async, timed as one span (a sync between the two parts would flush the background write's
        # pages untimed): what training waits for (until save returns), then the background write to
        # the commit (`finish`, nothing else running meanwhile).
        outcome = []
        rows["async"].append(timed(lambda: outcome.append(save_async(background, engine, i)), settled))  # noqa: B023
        blocked, committed = outcome[0]
        rows["blocked"].append(float(dist.all_reduce_max(torch.tensor([blocked]))))
        rows["background"].append(float(dist.all_reduce_max(torch.tensor([committed.timings["seal"]]))))
        tag = root / "sync" / tag_for(i)
        rows["load"].append(timed(lambda: engine.load_checkpoint(str(tag.parent), tag=tag.name), settled))  # noqa: B023
        total = folder_bytes(tag)
        mine = total // info.world_size  # every rank writes its share, as DeepSpeed's ranks do
        plain = root / f"plain.rank{info.rank}"
        rows["plain"].append(timed(lambda: plain_write(plain, mine, fsync=False), settled))  # noqa: B023
        rows["fsync"].append(timed(lambda: plain_write(plain, mine, fsync=True)))  # noqa: B023
        rows["read"].append(timed(lambda: plain_read(plain)))  # noqa: B023

    if info.is_main:
        gb = total / 1e9
        rate = {k: gb / statistics.median(v) for k, v in rows.items()}
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        print(
            f"{args.model} @ {args.image_size}: {params / 1e6:.1f}M parameters, {info.world_size} rank(s), "
            f"checkpoint {gb:.2f} GB in {root} ({mem:.0f} GB RAM: reads likely from the page cache); "
            f"median of {args.repeat}"
        )
        blocked, sync_s = statistics.median(rows["blocked"]), statistics.median(rows["managed"])
        print(f"  committed save, synchronous          {rate['managed']:6.2f} GB/s   (seconds per phase:")
        print(
            f"     write {statistics.median(rows['write']):.2f}, seal {statistics.median(rows['seal']):.2f}, "
            f"commit {statistics.median(rows['commit']):.2f}; DeepSpeed's write alone {rate['write']:.2f} GB/s)"
        )
        print(
            f"  committed save, async                {rate['async']:6.2f} GB/s   (training blocked "
            f"{blocked:.2f} s; background write {statistics.median(rows['background']):.2f} s; committed "
            f"{statistics.median(rows['async']):.2f} s after the save began)"
        )
        print(f"  load (engine.load_checkpoint)        {rate['load']:6.2f} GB/s")
        print(f"  plain sequential write               {rate['plain']:6.2f} GB/s")
        print(f"  plain sequential write + fsync       {rate['fsync']:6.2f} GB/s")
        print(f"  plain sequential read                {rate['read']:6.2f} GB/s")
        print(
            f"  ratio: training blocked by an async save / by a synchronous one {blocked / sync_s:.2f}; "
            f"committed save / plain write + fsync: async {rate['async'] / rate['fsync']:.2f}, synchronous "
            f"{rate['managed'] / rate['fsync']:.2f}; DeepSpeed write / plain write "
            f"{rate['write'] / rate['plain']:.2f}; load / plain read {rate['load'] / rate['read']:.2f}"
        )
        print(f"  load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    dist.destroy()


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(main)
