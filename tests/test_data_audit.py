"""Corrupt JPEGs and truncated shards: errors that name them, skipping, the audit and its blocklist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from data_pipeline.audit import audit
from data_pipeline.config import DataConfig
from data_pipeline.dataset import ShardedDataset
from data_pipeline.decode_probe import PROBE_BATCH, DecodeProbe, find_undecodable
from data_pipeline.loader import build_train_loader
from data_pipeline.manifest import load_blocklist, load_manifest
from data_pipeline.tarindex import read_index, read_member

CPU = torch.device("cpu")


def corrupt_jpeg(dataset: Path, shard: int, sample: int) -> str:
    """Overwrite the second two thirds of one sample's JPEG data in place; return its key."""
    manifest = load_manifest(dataset)[0]
    entry = read_index(dataset / manifest.shards[shard].index)[sample]
    _, offset, size, _ = entry.component("jpg")
    with open(dataset / manifest.shards[shard].name, "r+b") as f:
        f.seek(offset + size // 3)
        f.write(bytes(size - size // 3))
        f.seek(offset + 600)
        f.write(bytes(range(256)))
    return entry.key


def truncate_shard(dataset: Path, shard: int, sample: int) -> list[str]:
    """Cut a tar in the middle of one sample's JPEG; return the keys that no longer fit."""
    manifest = load_manifest(dataset)[0]
    entries = read_index(dataset / manifest.shards[shard].index)
    _, offset, size, _ = entries[sample].component("jpg")
    with open(dataset / manifest.shards[shard].name, "r+b") as f:
        f.truncate(offset + size // 2)
    return [e.key for e in entries[sample:]]


def epoch_ids(dataset: Path, **kw) -> tuple[list[str], object]:
    cfg = DataConfig(train=str(dataset), batch_size=8, num_threads=1, output_dtype="fp32", **kw)
    loader = build_train_loader(cfg, image_size=32, rank=0, world_size=1, seed=0, device=CPU)
    ids = []
    try:
        for _ in range(loader.micro_steps_per_epoch):
            images, _ = next(loader)
            assert images.shape[0] == 8
            ids.extend(loader.last_ids)
    finally:
        loader.close()
    return ids, loader


def test_corrupt_jpeg_stops_with_shard_and_key(digit_wds, copy_dataset):
    data = copy_dataset(digit_wds["train"])
    key = corrupt_jpeg(data, 1, 3)
    shard = load_manifest(data)[0].shards[1].name
    with pytest.raises(ValueError, match=rf"shard {shard} key {key}.*coatnet-data audit"):
        epoch_ids(data)


def test_corrupt_jpeg_is_skipped_counted_and_remembered(digit_wds, copy_dataset):
    data = copy_dataset(digit_wds["train"])
    key = corrupt_jpeg(data, 2, 5)
    shard = load_manifest(data)[0].shards[2].name
    ids, loader = epoch_ids(data, on_corrupt="skip")
    assert loader.skipped == [(shard, key)]
    assert f"{shard}/{key}" not in ids
    everything = {
        f"{s.name}/{e.key}" for s in load_manifest(data)[0].shards for e in read_index(data / s.index)
    }
    assert set(ids) == everything - {f"{shard}/{key}"}, "every other sample still arrives"
    assert loader.state_dict()["skipped"] == [(shard, key)]


def test_a_headerless_jpeg_in_a_full_batch_is_found_although_dali_may_crash_on_it(digit_wds):
    """DALI 2.4's CPU decoder can die of SIGSEGV on a 64-image batch that holds one JPEG without its
    header; the probe's child process takes the crash, and the bisection still names it."""
    data = digit_wds["train"]
    manifest = load_manifest(data)[0]
    blobs = []
    for info in manifest.shards:
        for entry in read_index(data / info.index):
            blobs.append(read_member(data / info.name, entry.component("jpg")))
    blobs = blobs[: PROBE_BATCH + 8]
    assert len(blobs) == PROBE_BATCH + 8
    blobs[5] = bytes(64) + blobs[5][64:]
    with DecodeProbe() as probe:
        for _ in range(3):  # a crash in any of them would have ended this process before the probe
            assert find_undecodable(blobs, probe) == [5]
        assert probe.decodes(blobs[6:PROBE_BATCH])  # and it still decodes after whatever happened


def test_a_probe_child_that_hangs_on_a_batch_is_killed_and_the_next_batch_gets_a_fresh_one(monkeypatch):
    """A decoder that hangs must not hang the error path that asked: the batch counts as a crash. The
    batch (8 photographs, ~1 MB) is larger than a pipe's buffer, so the hung child blocks the write too."""
    import io
    import signal

    from data_pipeline import decode_probe
    from data_pipeline.sample_data import photograph

    jpeg = io.BytesIO()
    photograph("china").save(jpeg, "JPEG", quality=95)
    blobs = [jpeg.getvalue()] * 8
    assert sum(map(len, blobs)) > 1 << 20
    monkeypatch.setattr(decode_probe, "BATCH_TIMEOUT_S", 3.0)
    with DecodeProbe() as probe:
        assert probe.decodes(blobs)
        hung = probe._child
        os.kill(hung.pid, signal.SIGSTOP)  # a real process that neither reads nor answers
        assert not probe.decodes(blobs)
        assert hung.returncode == -signal.SIGKILL and probe.crashes == 1
        assert probe.decodes(blobs) and probe._child is not hung


def test_truncated_shard_is_an_error_not_a_segfault(digit_wds, copy_dataset):
    data = copy_dataset(digit_wds["train"])
    truncate_shard(data, 0, 4)
    with pytest.raises(ValueError, match=r"is truncated.*coatnet-data audit"):
        epoch_ids(data)


def test_audit_blocklists_bad_samples_and_training_flows(digit_wds, copy_dataset):
    data = copy_dataset(digit_wds["train"])
    manifest = load_manifest(data)[0]
    bad = {
        (manifest.shards[1].name, corrupt_jpeg(data, 1, 0)),
        (manifest.shards[3].name, corrupt_jpeg(data, 3, 7)),
    }
    cut = {(manifest.shards[2].name, k) for k in truncate_shard(data, 2, 10)}
    report = audit(data, num_threads=1)
    assert set(report.corrupt) == bad
    assert set(report.truncated) == cut
    assert set(report.checksum_mismatch) == {manifest.shards[i].name for i in (1, 2, 3)}
    blocked = load_blocklist(data)
    assert len(blocked) == len(bad) + len(cut)
    ids, _ = epoch_ids(data)
    assert not {f"{s}/{k}" for s, k in bad | cut} & set(ids), "blocklisted samples never reach the decoder"
    assert len(set(ids)) == ShardedDataset(data).num_samples == manifest.num_samples - len(bad) - len(cut)


def test_skip_mode_resumes_exactly_around_a_corrupt_sample(digit_wds, copy_dataset):
    """A run that met the corrupt sample and one resumed from before or after it yield the same batches."""
    data = copy_dataset(digit_wds["train"])
    corrupt_jpeg(data, 0, 2)
    cfg = DataConfig(
        train=str(data), batch_size=8, num_threads=1, output_dtype="fp32", on_corrupt="skip", segment_shards=3
    )
    kw = dict(image_size=32, rank=0, world_size=1, seed=4, device=CPU)

    def batches(loader, n):
        return [(next(loader)[0].clone(), list(loader.last_ids)) for _ in range(n)]

    ref = build_train_loader(cfg, **kw)
    total = ref.micro_steps_per_epoch
    expected = batches(ref, total)
    assert len(ref.skipped) == 1
    ref.close()
    for stop in (1, total // 2, total - 1):
        first = build_train_loader(cfg, **kw)
        batches(first, stop)
        state = first.state_dict()
        first.close()
        resumed = build_train_loader(cfg, **kw)
        resumed.load_state_dict(state)
        got = batches(resumed, total - stop)
        resumed.close()
        for (ei, eid), (gi, gid) in zip(expected[stop:], got):
            assert eid == gid and torch.equal(ei, gi)
