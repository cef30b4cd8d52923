"""Everything a resume restores that DeepSpeed's own checkpoint does not: one object per concern.

DeepSpeed saves the model (ZeRO-3 partitions), the optimizer (fp32 master + Adam moments), the LR
schedule and its step counters. The rest travels in the checkpoint's client state, built here:

    {"shared": {...}, "rank": {...}}

`shared` is identical on every rank (counters, canary, BatchNorm statistics), so any rank can resume from
rank 0's copy: after a world-size change DeepSpeed's universal load hands every rank rank 0's client
state. `rank` is this rank's own (data loader, RNG, EMA shard), restored as is at the same world size; at
another one only the loader's global cursor is taken from it and the RNG is reseeded from
(seed, step, rank).

Each part has `state_dict()` / `load_state_dict()`; `ClientState` composes them in one order, used for
saving and restoring alike. Everything here round-trips in one process (tests/test_state.py).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from pretrain import dist
from pretrain.engine import untraced_forward

log = logging.getLogger(__name__)


# ==================================================================================================== counters


@dataclass
class TrainState:
    """Counters that are saved with every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    mlflow_run_id: str | None = None
    preemptions: int = 0
    elapsed_s: float = 0.0  # wall-clock seconds of every job of this run up to the last save
    productive_s: float = 0.0  # time in training steps that this checkpoint keeps (goodput)
    started_at: float | None = None  # wall-clock time the run's first job started

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in TrainState(**state).__dict__.items():
            setattr(self, key, value)


# ==================================================================================================== RNG


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. run seed, step, rank): stable across processes and machines."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (CPU and every CUDA device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds CUDA


class RngState:
    """Python, numpy, torch CPU and (where present) the current CUDA generator."""

    @staticmethod
    def state_dict() -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def load_state_dict(state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


# ==================================================================================================== BatchNorm


def _batchnorm_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


class BatchNormStats:
    """The running statistics of every BatchNorm layer of a model.

    A universal checkpoint load restores parameters, not buffers, and DeepSpeed's consolidation (export)
    keeps rank 0's buffers only; so the statistics are averaged over ranks before every save and carried
    in the client state's shared part.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> CPU copy of every BatchNorm buffer (running mean/var, batches tracked)."""
        return {
            f"{name}.{key}": buf.detach().cpu().clone()
            for name, m in _batchnorm_layers(self.module)
            for key, buf in m.named_buffers(recurse=False)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        buffers = dict(self.module.named_buffers())
        missing = sorted(set(state) - set(buffers))
        if missing:
            raise ValueError(f"checkpoint BatchNorm buffers {missing[:3]} do not exist in this model")
        for name, value in state.items():
            buffers[name].copy_(value)

    def average_over_ranks(self) -> int:
        """Replace every running mean/var by its mean over ranks, in place (one all_reduce). Returns layers.

        Each rank's statistics come from its own batches; averaging makes every rank's saved copy, the
        export and the evaluation of every rank agree. The training loss does not depend on them
        (training mode normalises with the batch statistics).
        """
        layers = _batchnorm_layers(self.module)
        stats = [b for _, m in layers for b in (m.running_mean, m.running_var) if b is not None]
        world = dist.world_size()
        if not stats or world == 1:
            return len(layers)
        flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in stats])  # [2 x channels]
        dist.all_reduce_sum(flat)
        flat /= world
        offset = 0
        for b in stats:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
        return len(layers)


# ==================================================================================================== canary


class Engine(Protocol):
    """What the canary needs of a DeepSpeed engine (or of any module wrapper with the same methods)."""

    optimizer: object

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
    def eval(self) -> object: ...
    def train(self) -> object: ...
    def get_lr(self) -> list[float]: ...


def canary_loss(logits: torch.Tensor, targets: torch.Tensor, label_kind: str) -> torch.Tensor:
    """Cross-entropy of the canary batch in fp32: logits [N, C]; targets class ids [N] or (multi-hot or
    mixed) probabilities [N, C]; multi-label: binary cross-entropy."""
    logits = logits.float()
    if label_kind == "multi":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    if targets.dtype == torch.int64:
        return torch.nn.functional.cross_entropy(logits, targets)
    return -(targets.float() * logits.log_softmax(-1)).sum(-1).mean()


def _base_optimizer(engine: Engine) -> torch.optim.Optimizer | None:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO-3's holds the fp32 partitions' Adam state)."""
    opt = getattr(engine, "optimizer", None)
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer) and opt.state:
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


# Elements summed at a time by `abs_sum`: 32 MiB of float64 temporaries, whatever the moment's size.
SUM_CHUNK = 1 << 22


def abs_sum(tensor: torch.Tensor) -> torch.Tensor:
    """sum(|x|) in float64, chunk by chunk (a 0-dim tensor on the tensor's device).

    `tensor.abs().sum(dtype=torch.float64)` in one piece materialises |x| and then its float64 cast: 12
    bytes per element of a 4-byte moment, 4.1 GB per rank for CoAtNet-5's Adam state on 2 ranks, at every
    save and resume (measured by benchmarks/memory_breakdown.py; the full-size run was OOM-killed there).
    """
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(SUM_CHUNK):
        total += chunk.abs().sum(dtype=torch.float64)
    return total


def optimizer_moments(engine: Engine) -> list[float]:
    """Sum of |m| and of v over every Adam moment of every rank (float64; collective).

    Independent of the world size up to summation order: each rank sums its own partitions (ZeRO pads
    them with zeros), then one all_reduce adds the ranks. Empty before the first optimizer step.
    """
    opt = _base_optimizer(engine)
    if opt is None:
        return []
    sums = torch.zeros(2, dtype=torch.float64)
    for state in opt.state.values():
        for i, key in enumerate(("exp_avg", "exp_avg_sq")):
            if key in state:
                sums[i] += abs_sum(state[key]).cpu()
    return dist.all_reduce_sum(sums).tolist()


class Canary:
    """A fixed batch whose loss, and the optimizer state behind it, are checked after every resume.

    At save time: the loss of rank 0's first batch in eval mode (deterministic, no RNG, no BatchNorm
    update), the learning rate, the step and the Adam moments' sums. After a load the same figures are
    recomputed; a difference beyond the tolerance means the checkpoint does not reproduce what was saved
    (damaged moments whose checksums were recomputed, a wrong scheduler position, a model that loaded
    other weights) and the resume stops on every rank at once.

    A fixed criterion (`canary_loss`), not the configured loss: a resumed run may change e.g. label
    smoothing, and the canary is about the model reproducing, not about the objective.
    """

    def __init__(self, label_kind: str, device: torch.device, tolerance: float):
        self.label_kind, self.device, self.tolerance = label_kind, device, tolerance
        self.batch: dict[str, torch.Tensor] | None = None
        self.saved: dict | None = None

    def observe(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep the first micro-batch seen (four samples, on the CPU)."""
        if self.batch is None:
            self.batch = {"images": images[:4].detach().cpu(), "targets": targets[:4].detach().cpu()}

    def _loss(self, engine: Engine) -> float:
        assert self.batch is not None
        engine.eval()
        try:
            # After a resume this is the process's first forward: ZeRO-3 must not take it as its trace
            # (a resumed run then gathered every module twice per step and trained at 0.4-0.6x speed).
            with torch.no_grad(), untraced_forward(engine):
                logits = engine(self.batch["images"].to(self.device, non_blocking=True))
                loss = canary_loss(logits, self.batch["targets"].to(self.device), self.label_kind)
        finally:
            engine.train()
        return loss.item()  # host-device sync point (saves and resumes only)

    def figures(self, engine: Engine) -> dict:
        """What is compared across a resume (collective: a ZeRO-3 forward and an all_reduce)."""
        return {
            "loss": self._loss(engine),
            "lr": float(engine.get_lr()[0]),
            "engine_step": int(getattr(engine, "global_steps", -1)),  # DeepSpeed's own optimizer-step count
            "moments": optimizer_moments(engine),
        }

    def state_dict(self, engine: Engine) -> dict | None:
        """Rank 0's batch on every rank (one canary that any world size can check) and its figures."""
        self.batch = dist.broadcast_object(self.batch)
        if self.batch is None:
            return None
        return {**self.batch, **self.figures(engine)}

    def load_state_dict(self, state: dict | None) -> None:
        self.saved = state
        self.batch = None if state is None else {"images": state["images"], "targets": state["targets"]}

    def check(self, engine: Engine, step: int, where: str) -> None:
        """Recompute the figures after a load; raise on every rank when any moved beyond the tolerance.

        `step` is the trainer's restored step counter, which DeepSpeed's restored counter must equal.
        """
        if self.saved is None:
            return
        now = self.figures(engine)
        problems = []
        if abs(now["loss"] - self.saved["loss"]) > self.tolerance:
            problems.append(f"a fixed batch's loss {self.saved['loss']:.6f} -> {now['loss']:.6f}")
        if not _close(now["lr"], self.saved["lr"], 1e-9):
            problems.append(f"learning rate {self.saved['lr']:.6g} -> {now['lr']:.6g}")
        if not self.saved["engine_step"] == now["engine_step"] == step:
            problems.append(
                f"optimizer steps: saved {self.saved['engine_step']}, DeepSpeed restored {now['engine_step']}, "
                f"trainer restored {step}"
            )
        saved_m = self.saved.get("moments") or []
        if len(saved_m) != len(now["moments"]) or not all(
            _close(a, b, 1e-5) for a, b in zip(saved_m, now["moments"])
        ):
            problems.append(f"Adam moments' sums {_fmt(saved_m)} -> {_fmt(now['moments'])}")
        # The figures are the same on every rank (collective results, a shared batch): all fail together.
        if problems:
            raise ValueError(
                f"resume canary failed for {where}: {'; '.join(problems)} "
                f"(checkpoint.canary_tolerance={self.tolerance}); the checkpoint does not reproduce the "
                "saved state"
            )


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


# ==================================================================================================== client state


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class ClientState:
    """The client state of a checkpoint: its parts, saved and restored in one order (see module doc)."""

    train: TrainState
    loader: Stateful
    batchnorm: BatchNormStats
    canary: Canary
    ema: Stateful
    rank: int
    world_size: int
    seed: int

    def state_dict(self, engine: Engine) -> dict:
        """Collective (the canary is a ZeRO-3 forward; BatchNorm statistics are averaged first)."""
        self.batchnorm.average_over_ranks()
        return {
            "shared": {
                "state": self.train.state_dict(),
                "world_size": self.world_size,
                "canary": self.canary.state_dict(engine),
                "batchnorm": self.batchnorm.state_dict(),
            },
            "rank": {
                "rank": self.rank,
                "loader": self.loader.state_dict(),
                "rng": RngState.state_dict(),
                "ema": self.ema.state_dict(),
            },
        }

    def load_state_dict(self, saved: dict, engine: Engine, where: str) -> None:
        """Restore in the order of `state_dict`, then check the canary (collective)."""
        shared, own = saved["shared"], saved["rank"]
        same_world = shared["world_size"] == self.world_size
        self.train.load_state_dict(shared["state"])
        self.loader.load_state_dict(own["loader"])  # at another world size: from the global cursor
        if same_world:
            RngState.load_state_dict(own["rng"])
        else:
            seed_everything(derived_seed(self.seed, self.train.step, self.rank))
        self.ema.load_state_dict(own["ema"])  # a shard of this rank's; at another world size it restarts
        self.batchnorm.load_state_dict(shared["batchnorm"])
        self.canary.load_state_dict(shared["canary"])
        self.canary.check(engine, self.train.step, where)
