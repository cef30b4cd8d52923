"""Images/s of the DALI CPU training loader against webdataset + PIL + numpy in a torch DataLoader.

Same work on both sides: 256x256 JPEG photographs -> random resized crop (scale 0.08-1, ratio 3/4-4/3)
to 224 -> horizontal flip -> normalise -> float32 NCHW batches of 64. DALI with 1 and 2 threads, the
DataLoader with 0 and 2 workers, in one run on the same shards. Also measures what a resume costs: a
DALI checkpoint (size, time to take, time to rebuild + restore) against replaying the batches, and
where DALI's CPU time goes (the graph cut after each stage), and
what a segment switch costs: with one shard per segment (a switch every 4 batches here) the slowest
batch at a switch over the median batch, with the next segment built ahead and without (goal <= 1.5).

Usage: python benchmarks/data_speed.py [--images 2048] [--batches 24] [--keep DIR] [--only segment]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.build import build
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.pipeline import MEAN, STD
from data_pipeline.sample_data import photograph

BATCH, CROP, SIDE = 64, 224, 256
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # random resized crop, on both sides


def write_photos(out: Path, count: int) -> Path:
    """`count` random 256x256 crops of the two bundled photographs, as JPEG, in two class folders."""
    rng = np.random.default_rng(0)
    photos = {name: photograph(name) for name in ("china", "flower")}
    for i in range(count):
        name = ("china", "flower")[i % 2]
        photo = photos[name]
        side = int(rng.integers(200, min(photo.size)))
        left, top = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
        (out / name).mkdir(parents=True, exist_ok=True)
        photo.crop((left, top, left + side, top + side)).resize((SIDE, SIDE)).save(
            out / name / f"{i:05d}.jpg", quality=90
        )
    return out


def time_batches(batches, count: int, warmup: int = 3) -> float:
    """Images/s over `count` batches after `warmup` batches."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    return count * BATCH / (time.perf_counter() - start)


def dali_rate(train: Path, threads: int, count: int) -> float:
    cfg = DataConfig(
        train=str(train), batch_size=BATCH, num_threads=threads, output_dtype="fp32", segment_shards=1024
    )
    loader = build_train_loader(
        cfg, image_size=CROP, rank=0, world_size=1, seed=0, device=torch.device("cpu")
    )
    try:
        return time_batches(loader, count)
    finally:
        loader.close()


def dali_raw_rate(train: Path, threads: int, count: int) -> float:
    """The same DALI graph run bare over the shards' own indexes: the loader's overhead is the gap."""
    from data_pipeline.dataset import ShardedDataset
    from data_pipeline.pipeline import TrainAugment, placement, train_pipeline

    ds = ShardedDataset(train)
    pipe = train_pipeline(
        TrainAugment(CROP, SCALE, RATIO, True, 0, 9),
        placement("cpu", torch.device("cpu")),
        paths=[str(p) for p in ds.tar_paths],
        index_paths=[str(p) for p in ds.index_paths],
        exts=["jpg", "cls"],
        batch_size=BATCH,
        num_threads=threads,
        prefetch=2,
        seed=0,
    )
    return time_batches(iter(pipe.run, None), count)


def dali_stage_rates(train: Path, count: int) -> dict[str, float]:
    """Images/s of the training graph's CPU operators cut after each stage, one thread: where DALI's CPU
    time goes (the reader and crop decode, then the resize to 224, then flip + normalise to float CHW)."""
    from nvidia.dali import fn, pipeline_def, types

    from data_pipeline.dataset import ShardedDataset
    from data_pipeline.pipeline import _reader

    ds = ShardedDataset(train)
    paths, index_paths = [str(p) for p in ds.tar_paths], [str(p) for p in ds.index_paths]

    def graph(stage: str):
        @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, prefetch_queue_depth=2, seed=0)
        def define():
            jpegs, _ = _reader(paths, index_paths, ["jpg", "cls"])
            images = fn.decoders.image_random_crop(
                jpegs,
                device="cpu",
                output_type=types.RGB,
                random_area=list(SCALE),
                random_aspect_ratio=list(RATIO),
                num_attempts=10,  # as pipeline.train_pipeline
            )
            if stage == "decode":
                return images
            images = fn.resize(images, size=[CROP, CROP])
            if stage == "resize":
                return images
            mirror = fn.random.coin_flip(probability=0.5)
            return fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD, mirror=mirror
            )

        pipe = define()
        pipe.build()
        return time_batches(iter(pipe.run, None), count)

    return {stage: graph(stage) for stage in ("decode", "resize", "normalise")}


def random_resized_crop(im: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision's RandomResizedCrop sampling, written with PIL (10 tries, then the whole image)."""
    width, height = im.size
    for _ in range(10):
        area = width * height * rng.uniform(*SCALE)
        ratio = math.exp(rng.uniform(*map(math.log, RATIO)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return im.resize((CROP, CROP), Image.BILINEAR, box=(left, top, left + w, top + h))
    return im.resize((CROP, CROP), Image.BILINEAR)


class PilTransform:
    """Decode + crop + flip + normalise one webdataset sample -> (float32 [3, 224, 224], label)."""

    def __init__(self) -> None:
        self.rng = random.Random(0)
        self.mean = np.array(MEAN, np.float32)
        self.std = np.array(STD, np.float32)

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        import io

        im = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        im = random_resized_crop(im, self.rng)
        if self.rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = (np.asarray(im, np.float32) - self.mean) / self.std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)), int(sample["cls"])


def pil_rate(train: Path, workers: int, count: int) -> float:
    import webdataset as wds

    shards = sorted(str(p) for p in train.glob("*.tar"))
    dataset = wds.WebDataset(
        shards, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker
    )
    dataset = dataset.repeat().map(PilTransform())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0
    )
    return time_batches(loader, count)


def resume_costs(train: Path, k: int) -> dict[str, float]:
    """Take a loader state after k batches; time restoring it against replaying k batches."""
    cfg = DataConfig(
        train=str(train), batch_size=BATCH, num_threads=2, output_dtype="fp32", segment_shards=1024
    )
    kw = dict(image_size=CROP, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    loader = build_train_loader(cfg, **kw)
    for _ in range(k):
        next(loader)
    start = time.perf_counter()
    state = loader.state_dict()
    take = time.perf_counter() - start
    loader.close()
    start = time.perf_counter()
    restored = build_train_loader(cfg, **kw)
    restored.load_state_dict(state)
    next(restored)
    restore = time.perf_counter() - start
    restored.close()
    start = time.perf_counter()
    replay = build_train_loader(cfg, **kw)
    for _ in range(k + 1):
        next(replay)
    replayed = time.perf_counter() - start
    replay.close()
    return {
        "state_bytes": len(state["dali"] or b""),
        "take_ms": take * 1e3,
        "restore_s": restore,
        "replay_s": replayed,
    }


def segment_switch_cost(train: Path, ahead: bool, batches: int, threads: int = 2) -> dict[str, float]:
    """Per-batch times with a pipeline segment per shard: the slowest batch at a switch / the median."""
    cfg = DataConfig(
        train=str(train),
        batch_size=BATCH,
        num_threads=threads,
        output_dtype="fp32",
        segment_shards=1,
        segment_ahead=ahead,
    )
    loader = build_train_loader(
        cfg, image_size=CROP, rank=0, world_size=1, seed=0, device=torch.device("cpu")
    )
    try:
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            next(loader)
            times.append(time.perf_counter() - start)
        seg = loader.seg_steps
    finally:
        loader.close()
    # Batch 0 builds the first pipeline in any case; every later multiple of `seg` opens a new segment.
    at_switch = [times[i] for i in range(seg, batches, seg)]
    median = statistics.median(times[1:])
    return {
        "segment_steps": seg,
        "switches": len(at_switch),
        "median_s": median,
        "slowest_switch_s": max(at_switch),
        "ratio": max(at_switch) / median,
    }


def print_segment_lines(train: Path, batches: int) -> None:
    for ahead in (True, False):
        cost = segment_switch_cost(train, ahead, batches)
        print(
            f"segment switch ({'built ahead' if ahead else 'in place'}, every {cost['segment_steps']} batches, "
            f"{cost['switches']} switches): slowest batch at a switch / median batch = {cost['ratio']:.2f} "
            f"({cost['slowest_switch_s'] * 1e3:.0f} ms / {cost['median_s'] * 1e3:.0f} ms)"
        )
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--keep", default=None, help="build the shards here instead of a temporary directory")
    parser.add_argument("--only", choices=["segment"], default=None, help="run only the segment-switch lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        train = build(write_photos(root / "photos", args.images), root / "wds", shard_size=256)["train"]
        if args.only == "segment":
            print_segment_lines(train, max(args.batches, 40))
            return
        results = {
            "dali_1_thread": dali_rate(train, 1, args.batches),
            "dali_2_threads": dali_rate(train, 2, args.batches),
            "dali_raw_2_thr": dali_raw_rate(train, 2, args.batches),
            "pil_0_workers": pil_rate(train, 0, args.batches),
            "pil_2_workers": pil_rate(train, 2, args.batches),
        }
        for name, rate in results.items():
            print(f"{name:16s} {rate:7.0f} images/s")
        print(
            f"ratio DALI 1 thread / PIL 0 workers: {results['dali_1_thread'] / results['pil_0_workers']:.2f}"
        )
        print(
            f"ratio DALI 2 threads / PIL 2 workers: {results['dali_2_threads'] / results['pil_2_workers']:.2f}"
        )
        stages = dali_stage_rates(train, args.batches)
        per_image = {k: 1 / v for k, v in stages.items()}  # seconds per image after each stage
        resize_share = (per_image["resize"] - per_image["decode"]) / per_image["normalise"]
        print(
            f"DALI CPU, 1 thread, cut after each stage: read + crop-decode {stages['decode']:.0f} images/s, "
            f"+ resize {stages['resize']:.0f}, + flip/normalise {stages['normalise']:.0f}: the resize is "
            f"{resize_share:.0%} of the time"
        )
        cost = resume_costs(train, k=args.batches)
        print(
            f"resume after {args.batches} batches: DALI checkpoint {cost['state_bytes']} bytes taken in "
            f"{cost['take_ms']:.1f} ms, rebuild+restore+1 batch {cost['restore_s']:.2f} s, "
            f"replay of {args.batches}+1 batches {cost['replay_s']:.2f} s"
        )
        print_segment_lines(train, max(args.batches, 40))


if __name__ == "__main__":
    main()
