"""The sample order of an epoch and how it is cut between ranks: pure functions of integers.

Order of epoch e (seed s): the shards in a permutation drawn from (s, e); inside each shard its samples in
a permutation drawn from (s, e, shard). Position p in [0, N) of the epoch is one sample; the build
shuffles the corpus before sharding, so each shard is a random sample of it and this two-level order
mixes classes within every batch. Only the shards actually touched are ever permuted (O(shard) memory).

Cut between ranks: global step t of an epoch plan starting at position `origin` covers positions
[origin + t*G, origin + (t+1)*G) with G = batch_size * world_size; rank r takes the r-th run of
batch_size positions. Positions >= N wrap to the start of the epoch's order (padding: at most G-1
repeated samples at the end of an epoch, all ranks get the same number of steps).

A global cursor (positions consumed) is therefore enough to carry an epoch over to another world size
or batch size: the new plan starts with origin = cursor, and every sample of the epoch is still seen
exactly once (up to the padding of the last step).
"""

from __future__ import annotations

import math

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([k & 0xFFFFFFFF for k in key])))


def derive_seed(*key: int) -> int:
    """A 31-bit seed (what DALI accepts) that is a pure function of the integers in `key`."""
    return int(_rng(*key).integers(0, 2**31 - 1))


class EpochOrder:
    """Position -> (shard, sample) for one epoch; shard permutations are computed on first use."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int) -> None:
        self.counts, self.seed, self.epoch = counts, seed, epoch
        # salt 1 = shard order, salt 2 = within-shard order: independent streams of the same key
        self.shards = _rng(seed, epoch, 1).permutation(len(counts))
        self.ends = np.cumsum(counts[self.shards])  # [num_shards] end position of each shard in the order
        self.total = int(self.ends[-1]) if len(self.ends) else 0
        self._within: dict[int, np.ndarray] = {}

    def _perm(self, shard: int) -> np.ndarray:
        if shard not in self._within:
            self._within[shard] = _rng(self.seed, self.epoch, 2, shard).permutation(int(self.counts[shard]))
        return self._within[shard]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard ids and within-shard sample numbers of `positions` ([K] int64; >= N wraps around)."""
        if self.total == 0:
            raise ValueError("the dataset has no readable samples")
        pos = positions % self.total
        slot = np.searchsorted(self.ends, pos, side="right")
        starts = self.ends[slot] - self.counts[self.shards[slot]]
        shard, within = self.shards[slot], pos - starts
        sample = np.empty_like(within)
        for s in np.unique(shard):  # one vectorised lookup per shard touched
            mask = shard == s
            sample[mask] = self._perm(int(s))[within[mask]]
        return shard, sample


def steps_in_plan(total: int, origin: int, global_batch: int) -> int:
    """Steps (per rank) needed to cover positions [origin, total) in global batches."""
    return math.ceil(max(total - origin, 0) / global_batch)


def rank_positions(
    origin: int, first_step: int, num_steps: int, batch_size: int, world_size: int, rank: int
) -> np.ndarray:
    """Epoch positions rank `rank` reads in steps [first_step, first_step + num_steps): [num_steps * B]."""
    steps = np.arange(first_step, first_step + num_steps, dtype=np.int64)[:, None]
    within = np.arange(batch_size, dtype=np.int64)[None, :]
    return (origin + steps * batch_size * world_size + rank * batch_size + within).reshape(-1)


def segment_steps(counts: np.ndarray, segment_shards: int, global_batch: int) -> int:
    """Steps per pipeline segment, so that a segment touches about `segment_shards` shards."""
    mean = float(counts.mean()) if len(counts) else 1.0
    return max(1, math.ceil(segment_shards * mean / global_batch))


def eval_positions(
    total: int, batch_size: int, world_size: int, rank: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """One evaluation pass in dataset order: rank r reads a contiguous slice.

    Returns (positions [steps*B], valid mask [steps*B], steps); padding positions repeat position 0 of the
    slice (or of the dataset) and are marked invalid; every rank gets the same number of steps.
    """
    per_rank = math.ceil(total / world_size)
    steps = max(1, math.ceil(per_rank / batch_size))
    start, stop = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    positions = np.full(steps * batch_size, start if stop > start else 0, dtype=np.int64)
    positions[: stop - start] = np.arange(start, stop)
    valid = np.zeros(steps * batch_size, dtype=bool)
    valid[: stop - start] = True
    return positions, valid, steps
