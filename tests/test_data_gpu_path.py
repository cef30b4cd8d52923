"""The loader's GPU-facing behaviour that a CPU can check: segments built ahead, decoder sizing, hand-over.

Segments built ahead must change nothing but the stall: the same batches (ids and pixels) as the
synchronous path, across segment switches and the epoch boundary, and a state taken while a segment is
being prepared resumes bit for bit.
"""

from __future__ import annotations

import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import TrainLoader, build_train_loader, gpu_decoder_args, model_input
from data_pipeline.pipeline import Placement, placement, to_device

CPU = torch.device("cpu")
KW = dict(image_size=32, rank=0, world_size=1, seed=3, device=CPU)


def make_cfg(train, **kw) -> DataConfig:
    base = dict(train=str(train), batch_size=8, num_threads=1, output_dtype="fp32", segment_shards=1)
    return DataConfig(**{**base, **kw})


def stream(cfg: DataConfig, steps: int) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    loader = build_train_loader(cfg, **KW)
    try:
        return [(*(t.clone() for t in next(loader)), list(loader.last_ids)) for _ in range(steps)]
    finally:
        loader.close()


def same(a, b) -> bool:
    return all(torch.equal(x, y) and torch.equal(t, u) and i == j for (x, t, i), (y, u, j) in zip(a, b))


def test_segments_built_ahead_give_the_same_stream_without_synchronous_opens(digit_wds, monkeypatch):
    cfg = make_cfg(digit_wds["train"], mixup_alpha=0.4)
    probe = build_train_loader(cfg, **KW)
    steps = probe.micro_steps_per_epoch + 4  # every segment switch of an epoch, and into the next one
    assert probe.seg_steps < probe.micro_steps_per_epoch, "the test needs segment switches"
    probe.close()
    reference = stream(make_cfg(digit_wds["train"], mixup_alpha=0.4, segment_ahead=False), steps)
    opens = []
    original = TrainLoader._open_segment
    monkeypatch.setattr(TrainLoader, "_open_segment", lambda self: opens.append(1) or original(self))
    ahead = stream(cfg, steps)
    assert same(reference, ahead)
    assert len(opens) == 1, f"{len(opens)} segments were opened on the step's path, expected only the first"


def test_a_state_taken_while_a_segment_is_prepared_resumes_bitwise(digit_wds):
    cfg = make_cfg(digit_wds["train"])
    probe = build_train_loader(cfg, **KW)
    seg = probe.seg_steps
    probe.close()
    expected = stream(cfg, 3 * seg + 2)
    for stop in (seg, seg + 1):  # at a switch (nothing live, the next one pending) and inside a segment
        first = build_train_loader(cfg, **KW)
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        first.close()
        resumed = build_train_loader(cfg, **KW)
        resumed.load_state_dict(state)
        got = [
            (*(t.clone() for t in next(resumed)), list(resumed.last_ids)) for _ in range(len(expected) - stop)
        ]
        resumed.close()
        assert same(expected[stop:], got), f"resume after {stop} batches"


def test_nvjpeg_sizing_reaches_only_the_mixed_decoder():
    cfg = DataConfig()
    args = gpu_decoder_args(cfg)
    assert args == {
        "device_memory_padding": 211_025_920,
        "host_memory_padding": 140_544_512,
        "hw_decoder_load": 0.65,
    }
    assert placement("auto", CPU, args) == Placement("cpu", "cpu", None), "the CPU decoder takes none of them"
    assert placement("cpu", CPU, args).decoder_kwargs() == {}
    mixed = Placement("mixed", "gpu", 0, tuple(sorted(args.items())))
    assert mixed.decoder_kwargs() == args
    assert placement("cpu", CPU).consumer_stream() is None


def test_host_hand_over_and_the_one_cast():
    labels = torch.tensor([1, 2, 3])
    assert to_device(labels, CPU) is labels, "no copy on the CPU"
    images = torch.randn(2, 3, 4, 4)
    assert model_input(images, "bf16").dtype == torch.bfloat16
    assert model_input(images, None) is images and model_input(images, "fp32") is images


def test_a_loader_reloading_its_own_state_reopens_the_same_segment_cleanly(digit_wds):
    """The played segment is released in the background; reopening it by the same name must not race."""
    cfg = make_cfg(digit_wds["train"])
    expected = stream(cfg, 6)
    loader = build_train_loader(cfg, **KW)
    try:
        got = [(*(t.clone() for t in next(loader)), list(loader.last_ids)) for _ in range(3)]
        loader.load_state_dict(loader.state_dict())
        got += [(*(t.clone() for t in next(loader)), list(loader.last_ids)) for _ in range(3)]
    finally:
        loader.close()
    assert same(expected, got)
