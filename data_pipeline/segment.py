"""A segment: the exact list of samples one rank's DALI pipeline plays, written as DALI index files.

Consecutive samples from the same tar form a run; each run becomes one (tar path, index file) pair of
`fn.readers.webdataset`, whose lines list that run's samples in play order. Blocklisted samples are not in
the universe at all (see dataset.py), so they never reach the decoder; a sample that is skipped at run
time is replaced by its predecessor in the segment, which keeps every batch full and every rank in step.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.dataset import ShardedDataset
from data_pipeline.tarindex import IndexedSample, write_index


@dataclass
class Segment:
    """The samples one pipeline plays (`entries[i]` = (shard, sample)), and its files."""

    entries: list[tuple[int, IndexedSample]]
    directory: Path
    paths: list[str] = field(default_factory=list)
    index_paths: list[str] = field(default_factory=list)

    def write(self, dataset: ShardedDataset) -> None:
        """(Re)write the run index files for the current entries."""
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self.paths, self.index_paths = [], []
        start = 0
        while start < len(self.entries):
            shard = self.entries[start][0]
            stop = start
            while stop < len(self.entries) and self.entries[stop][0] == shard:
                stop += 1
            index = self.directory / f"run{len(self.paths):06d}.idx"
            write_index(index, [sample for _, sample in self.entries[start:stop]])
            self.paths.append(str(dataset.tar_paths[shard]))
            self.index_paths.append(str(index))
            start = stop

    def substitute(self, skipped: set[tuple[str, str]], dataset: ShardedDataset) -> int:
        """Replace every entry in `skipped` ((shard name, key) pairs) by the nearest earlier (else later)
        entry that is not skipped; return how many were replaced."""
        bad = [i for i, (s, x) in enumerate(self.entries) if (dataset.shard_name(s), x.key) in skipped]
        if not bad:
            return 0
        good = [i for i in range(len(self.entries)) if i not in set(bad)]
        if not good:
            raise ValueError(f"every sample of the pipeline segment in {self.directory} failed to decode")
        for i in bad:
            earlier = [g for g in good if g < i]
            self.entries[i] = self.entries[earlier[-1] if earlier else good[0]]
        return len(bad)

    def remove(self) -> None:
        """Delete the index files (the tars are never touched)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def natural_locate(counts: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dataset order (shards as listed, samples in index order): position -> (shard, sample)."""
    ends = np.cumsum(counts)
    shard = np.searchsorted(ends, positions, side="right")
    return shard, positions - (ends[shard] - counts[shard])


def make_segment(
    dataset: ShardedDataset, shards: np.ndarray, samples: np.ndarray, directory: Path
) -> Segment:
    """A segment playing sample `samples[i]` of shard `shards[i]`, in this order."""
    entries = [(int(s), dataset.samples(int(s))[int(j)]) for s, j in zip(shards, samples)]
    segment = Segment(entries=entries, directory=directory)
    segment.write(dataset)
    return segment
