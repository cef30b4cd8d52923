"""A sharded dataset as the loaders see it: shards, the samples that may be read, and their index entries.

The sample universe of a dataset is every sample of every shard in the manifest minus the audit's
blocklist. Sample `j` of shard `s` means the j-th non-blocklisted sample of that shard's index file.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from data_pipeline.manifest import Blocklist, Manifest, dataset_fingerprint, load_blocklist, load_manifest
from data_pipeline.tarindex import IndexedSample, check_bounds, read_index, read_member


class ShardedDataset:
    """Manifest + blocklist of one dataset directory, with lazily parsed, bounds-checked index files."""

    def __init__(self, dataset_dir: str | Path) -> None:
        manifest, shard_dir, index_dir = load_manifest(dataset_dir)
        self.root = Path(dataset_dir)
        self.manifest: Manifest = manifest
        self.blocklist: Blocklist = load_blocklist(dataset_dir)
        self.tar_paths = [shard_dir / s.name for s in manifest.shards]
        self.index_paths = [index_dir / s.index for s in manifest.shards]
        for path in self.tar_paths:
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {self.root / 'manifest.json'} is missing")
        for path in self.index_paths:
            if not path.is_file():
                raise FileNotFoundError(
                    f"index file {path} of {self.root / 'manifest.json'} is missing (coatnet-data index rebuilds it)"
                )
        blocked = [len(self.blocklist.blocked(s.name)) for s in manifest.shards]
        # [num_shards] samples per shard that may be read; the order plan is built on these counts
        self.counts = np.array([s.samples - b for s, b in zip(manifest.shards, blocked)], dtype=np.int64)
        if (self.counts < 0).any():
            raise ValueError(f"{self.root}: blocklist.json blocks more samples than a shard holds")
        self.fingerprint = dataset_fingerprint(manifest, self.blocklist)
        # a segment visits shards one after another, so a few parsed indexes suffice (~0.5 KB per sample)
        self._samples = lru_cache(maxsize=16)(self._load_samples)

    @property
    def num_samples(self) -> int:
        """Samples the loaders may read (blocklisted ones excluded)."""
        return int(self.counts.sum())

    def shard_name(self, shard: int) -> str:
        """File name of shard number `shard`."""
        return self.manifest.shards[shard].name

    def samples(self, shard: int) -> list[IndexedSample]:
        """The readable samples of one shard, in index order (cached)."""
        return self._samples(shard)

    def _load_samples(self, shard: int) -> list[IndexedSample]:
        name, tar, index = self.shard_name(shard), self.tar_paths[shard], self.index_paths[shard]
        entries = read_index(index)
        blocked = self.blocklist.blocked(name)
        keep = [e for e in entries if e.key not in blocked]
        outside = set(check_bounds(keep, tar))
        if outside:
            raise ValueError(
                f"shard {tar} is truncated or does not match its index {index}: samples "
                f"{sorted(outside)[:5]} end past the end of the file; run `coatnet-data audit {self.root}`"
            )
        if len(keep) != self.counts[shard]:
            raise ValueError(
                f"index {index} has {len(keep)} readable samples but the manifest and blocklist of "
                f"{self.root} promise {self.counts[shard]}; rebuild the index or rerun the audit"
            )
        return keep

    def read_image(self, shard: int, sample: IndexedSample) -> bytes:
        """The encoded image bytes of one sample (for the audit and to locate a corrupt sample)."""
        comp = sample.component(self.manifest.image_ext)
        if comp is None:
            raise ValueError(
                f"shard {self.tar_paths[shard]}: sample {sample.key} has no .{self.manifest.image_ext}"
            )
        return read_member(self.tar_paths[shard], comp)
