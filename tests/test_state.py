"""The resumable state outside DeepSpeed's checkpoint (pretrain/state.py), round-tripped in one process.

A small engine stand-in (a real CoAtNet and a real torch AdamW behind the few engine methods the state
needs) replaces DeepSpeed here; the multi-rank resume with the real engine is in test_checkpoint_resume.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pretrain.ema import NoEma
from pretrain.model import create_model
from pretrain.state import (
    BatchNormStats,
    Canary,
    ClientState,
    RngState,
    TrainState,
    derived_seed,
    optimizer_moments,
    seed_everything,
)

TINY = {"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}


class PlainEngine:
    """The engine methods the state uses, over a plain model and optimizer (one process, fp32)."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.module = create_model("coatnet_0", num_classes=10, image_size=32, **TINY)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3)
        self.global_steps = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def get_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def step_on(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(self.module(images), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_steps += 1

    def copy_from(self, other: PlainEngine) -> None:
        self.module.load_state_dict(other.module.state_dict())
        self.optimizer.load_state_dict(other.optimizer.state_dict())
        self.global_steps = other.global_steps


class CountingLoader:
    """A loader's state interface: a cursor."""

    def __init__(self) -> None:
        self.cursor = 0

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _client(engine: PlainEngine, loader: CountingLoader, train: TrainState | None = None) -> ClientState:
    return ClientState(
        train=train or TrainState(),
        loader=loader,
        batchnorm=BatchNormStats(engine.module),
        canary=Canary("single", torch.device("cpu"), tolerance=0.0),
        ema=NoEma(),
        rank=0,
        world_size=1,
        seed=7,
    )


def test_train_state_round_trip() -> None:
    state = TrainState(step=5, samples_seen=160, mlflow_run_id="abc", preemptions=1)
    other = TrainState()
    other.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert other == state
    with pytest.raises(TypeError):
        other.load_state_dict({"step": 1, "unknown": 2})


def test_rng_state_round_trip_restores_every_generator() -> None:
    seed_everything(3)
    saved = RngState.state_dict()
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seed_everything(99)
    RngState.load_state_dict(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws
    assert derived_seed(7, 10, 1) == derived_seed(7, 10, 1) != derived_seed(7, 10, 0)
    assert 0 <= derived_seed("x") < 2**63


def test_batchnorm_stats_round_trip() -> None:
    engine = PlainEngine()
    engine.module.train()
    engine.module(_batch()[0])  # moves the running statistics away from their initial values
    saved = BatchNormStats(engine.module).state_dict()
    assert saved and all(".running_mean" in k or ".running_var" in k or "num_batches" in k for k in saved)
    fresh = PlainEngine(seed=1)
    BatchNormStats(fresh.module).load_state_dict(saved)
    buffers = dict(fresh.module.named_buffers())
    assert all(torch.equal(buffers[k], v) for k, v in saved.items())
    assert BatchNormStats(engine.module).average_over_ranks() > 0  # one process: unchanged
    assert all(torch.equal(dict(engine.module.named_buffers())[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match="do not exist in this model"):
        BatchNormStats(fresh.module).load_state_dict({"nowhere.running_mean": torch.zeros(1)})


def test_client_state_round_trip_and_the_canary_passes() -> None:
    engine, loader = PlainEngine(), CountingLoader()
    client = _client(engine, loader, TrainState(step=2, samples_seen=16))
    for _ in range(2):
        images, targets = _batch()
        client.canary.observe(images, targets)
        engine.step_on(images, targets)
    loader.cursor = 16
    seed_everything(5)
    saved = client.state_dict(engine)
    after_save = torch.rand(3)
    assert set(saved) == {"shared", "rank"} and saved["shared"]["canary"]["engine_step"] == 2
    assert len(saved["shared"]["canary"]["moments"]) == 2 and saved["shared"]["canary"]["moments"][0] > 0

    restored, new_loader = PlainEngine(seed=4), CountingLoader()
    restored.copy_from(engine)  # what DeepSpeed's load_checkpoint does
    other = _client(restored, new_loader)
    other.load_state_dict(saved, restored, where="test")
    assert other.train == TrainState(step=2, samples_seen=16) and new_loader.cursor == 16
    assert torch.equal(torch.rand(3), after_save)  # RNG continues where it was saved


def test_canary_fails_on_damaged_moments_lr_or_steps() -> None:
    engine = PlainEngine()
    client = _client(engine, CountingLoader(), TrainState(step=1))
    images, targets = _batch()
    client.canary.observe(images, targets)
    engine.step_on(images, targets)
    saved = client.state_dict(engine)

    def restored() -> PlainEngine:
        e = PlainEngine(seed=4)
        e.copy_from(engine)
        return e

    damaged = restored()  # weights intact, Adam moments damaged (checksums recomputed by a buggy writer)
    for state in damaged.optimizer.state.values():
        state["exp_avg_sq"].mul_(1.01)
    with pytest.raises(ValueError, match=r"Adam moments' sums"):
        _client(damaged, CountingLoader()).load_state_dict(saved, damaged, where="ckpt")
    wrong_lr = restored()
    wrong_lr.optimizer.param_groups[0]["lr"] = 5e-4
    with pytest.raises(ValueError, match=r"learning rate 0\.001 -> 0\.0005"):
        _client(wrong_lr, CountingLoader()).load_state_dict(saved, wrong_lr, where="ckpt")
    lost_step = restored()
    lost_step.global_steps = 0
    with pytest.raises(ValueError, match="optimizer steps: saved 1, DeepSpeed restored 0"):
        _client(lost_step, CountingLoader()).load_state_dict(saved, lost_step, where="ckpt")
    other_weights = PlainEngine(seed=4)
    other_weights.optimizer.load_state_dict(engine.optimizer.state_dict())
    other_weights.global_steps = 1
    with pytest.raises(ValueError, match="resume canary failed for ckpt: a fixed batch's loss"):
        _client(other_weights, CountingLoader()).load_state_dict(saved, other_weights, where="ckpt")


def test_optimizer_moments_are_empty_before_the_first_step() -> None:
    assert optimizer_moments(PlainEngine()) == []


def test_abs_sum_adds_chunk_by_chunk_what_one_piece_would(monkeypatch: pytest.MonkeyPatch) -> None:
    from pretrain import state

    gen = torch.Generator().manual_seed(0)
    moment = torch.randn(1000, 37, generator=gen)  # 37000 elements: 9 chunks of 4096 and a remainder
    monkeypatch.setattr(state, "SUM_CHUNK", 4096)
    expected = moment.double().abs().sum()
    got = state.abs_sum(moment)
    assert got.dtype == torch.float64 and got.shape == ()
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    assert state.abs_sum(torch.zeros(0)).item() == 0.0
