"""The checkpoint commit protocol, retention and integrity checks, in one process.

The multi-rank behaviour with DeepSpeed (exact resume, SIGKILL inside a save, another world size) is in
test_checkpoint_resume.py. Here a small file-writing engine stands in for DeepSpeed's `save_checkpoint`
(the manager only needs the files to appear under <root>/<tag>), so every case runs in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import blake3
import pytest
import torch

from pretrain import dist
from pretrain.checkpoint import (
    MANIFEST,
    POINTER,
    CheckpointManager,
    Committed,
    _fault_point,
    _owner_rank,
    read_manifest,
    structural_problem,
    tag_for,
)
from pretrain.config import CheckpointConfig
from pretrain.export import resolve_checkpoint

SINGLE = dist.RankInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")
MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_FILE = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FileWritingEngine:
    """Writes what one ZeRO-3 rank writes (a model-states and an optimizer-states file) per save."""

    def __init__(self, optim_bytes: int = 1 << 16) -> None:
        self.optim_bytes = optim_bytes

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest  # the manager owns the pointer; DeepSpeed's in-place `latest` is not atomic
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, folder / MODEL_FILE)
        (folder / OPTIM_FILE).write_bytes(os.urandom(self.optim_bytes))


def manager(root: Path, **cfg) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(**cfg), root, SINGLE)


def test_save_commits_manifest_with_sizes_checksums_meta_and_pointer(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    path = mgr.save(FileWritingEngine(), 7, {"x": 1}, meta={"model": {"name": "m"}}).path
    assert path == tmp_path / tag_for(7)
    manifest = read_manifest(path)
    assert manifest["step"] == 7 and manifest["world_size"] == 1 and manifest["meta"]["model"]["name"] == "m"
    assert set(manifest["files"]) == {MODEL_FILE, OPTIM_FILE}
    assert manifest["files"][OPTIM_FILE]["bytes"] == 1 << 16
    assert (tmp_path / POINTER).read_text().strip() == tag_for(7)
    assert mgr.candidates() == [Committed(7, path)]
    assert mgr.verify(path) == []  # checksums recomputed: no error
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_incomplete_checkpoints_are_ignored_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = manager(tmp_path, keep_last=10)
    for step in (10, 20, 30, 40):
        mgr.save(FileWritingEngine(), step, {"step": step})
    (tmp_path / tag_for(40) / MANIFEST).unlink()  # a save that died before its commit point
    truncated = tmp_path / tag_for(30) / OPTIM_FILE  # a torn file under a manifest (storage lost a write)
    truncated.write_bytes(truncated.read_bytes()[:100])
    (tmp_path / tag_for(20) / MODEL_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert mgr.candidates() == [Committed(10, tmp_path / tag_for(10))]
    text = caplog.text
    assert f"{tag_for(40)}: no MANIFEST.json" in text
    assert f"{tag_for(30)}: {OPTIM_FILE} has 100 bytes, the manifest says 65536" in text
    assert f"{tag_for(20)}: {MODEL_FILE} is missing" in text


def test_a_flipped_byte_fails_verification_naming_the_file(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    path = mgr.save(FileWritingEngine(), 5, {}).path
    data = bytearray((path / OPTIM_FILE).read_bytes())
    data[1000] ^= 0xFF  # same size: only the checksum can tell
    (path / OPTIM_FILE).write_bytes(bytes(data))
    assert structural_problem(path) is None
    assert mgr.verify(path) == [OPTIM_FILE]


def test_a_save_waits_for_retentions_deletions_only_when_short_of_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow deletion of pruned checkpoints (a disk that frees slowly) stalls neither the next save nor
    its commit; only a save that lacks room waits for it, since what it frees counts."""
    import shutil
    import threading

    import pretrain.checkpoint as ckpt

    release, rmtree, usage = threading.Event(), shutil.rmtree, shutil.disk_usage(tmp_path)

    def slow_rmtree(path, *args, **kwargs):
        if str(path).endswith(ckpt.PRUNED_SUFFIX):
            release.wait(60)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", slow_rmtree)
    mgr = manager(tmp_path, keep_last=1)
    for step in (1, 2, 3):  # the commits of 2 and 3 prune 1 and 2: both deletions hang
        mgr.save(FileWritingEngine(), step, {})
    pruned = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(ckpt.PRUNED_SUFFIX))
    assert pruned == [f".{tag_for(1)}{ckpt.PRUNED_SUFFIX}", f".{tag_for(2)}{ckpt.PRUNED_SUFFIX}"]
    assert (tmp_path / POINTER).read_text().strip() == tag_for(3)

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    threading.Timer(0.5, release.set).start()
    with pytest.raises(ckpt.SaveFailed, match="no space"):
        mgr.save(FileWritingEngine(), 4, {})
    assert release.is_set()  # refused only after the deletions it waited for
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(ckpt.PRUNED_SUFFIX)]


def test_retention_keeps_last_k_and_every_mth_and_drops_universal_and_debris(tmp_path: Path) -> None:
    mgr = manager(tmp_path, keep_last=2, keep_every=30)
    mgr.save(FileWritingEngine(), 10, {})
    (tmp_path / (tag_for(10) + "_universal")).mkdir()  # its universal form, made by a resume
    (tmp_path / ".step_000000020_universal.tmp99").mkdir()  # a conversion that died half-way
    (tmp_path / tag_for(15)).mkdir()  # a partial save, older than the newest commit below
    for step in range(20, 80, 10):
        mgr.save(FileWritingEngine(), step, {})
    mgr.close()  # retention deletes in a thread
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER, tag_for(30), tag_for(60), tag_for(70)]


def test_a_partial_save_at_the_same_step_is_replaced_and_a_committed_one_is_kept(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    debris = tmp_path / tag_for(10)
    debris.mkdir()
    (debris / "zero_pp_rank_7_mp_rank_00_model_states.pt").write_bytes(b"from a dead run of 8 ranks")
    path = mgr.save(FileWritingEngine(), 10, {}).path
    assert set(read_manifest(path)["files"]) == {MODEL_FILE, OPTIM_FILE}  # the stale rank-7 file is gone
    before = (path / MANIFEST).read_text()
    assert mgr.holds(10)
    assert mgr.save(FileWritingEngine(optim_bytes=10), 10, {}) is None  # e.g. a stop right after a save
    assert (path / MANIFEST).read_text() == before
    # Another job that redoes step 10 (resumed on purpose from an earlier one) keeps the old one aside.
    again = manager(tmp_path).save(FileWritingEngine(optim_bytes=10), 10, {}).path
    assert read_manifest(again)["files"][OPTIM_FILE]["bytes"] == 10
    (aside,) = tmp_path.glob(tag_for(10) + ".superseded-*")
    assert (aside / MANIFEST).read_text() == before


def test_resume_setting_never_or_an_explicit_folder(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    path = mgr.save(FileWritingEngine(), 3, {}).path
    assert manager(tmp_path, resume="never").candidates() == []
    assert manager(tmp_path, resume="never").select({}) is None
    assert manager(tmp_path / "elsewhere", resume=str(path)).candidates() == [Committed(3, path)]
    (path / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"checkpoint.resume=.*not a committed checkpoint \(no MANIFEST"):
        manager(tmp_path, resume=str(path)).candidates()
    assert manager(tmp_path).candidates() == []


INVARIANTS = {"run.seed": 0, "data.batch_size": 32, "model.dims": [16, 32]}


def _flip_a_byte(path: Path) -> None:
    data = bytearray((path / OPTIM_FILE).read_bytes())
    data[100] ^= 0x01
    (path / OPTIM_FILE).write_bytes(bytes(data))


def test_select_sets_a_corrupt_newest_checkpoint_aside_and_resumes_from_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = manager(tmp_path, keep_last=5)
    for step in (10, 20):
        mgr.save(FileWritingEngine(), step, {}, meta={"resume_invariants": INVARIANTS})
    _flip_a_byte(tmp_path / tag_for(20))
    with caplog.at_level(logging.ERROR, logger="pretrain.checkpoint"):
        point = manager(tmp_path).select(INVARIANTS)
    assert point.ckpt == Committed(10, tmp_path / tag_for(10)) and not point.universal
    assert f"{tag_for(20)} FAILS ITS CHECKSUMS ({OPTIM_FILE})" in caplog.text
    (aside,) = tmp_path.glob(tag_for(20) + ".corrupt-*")  # kept for a person, not deleted
    assert (aside / MANIFEST).exists() and not (tmp_path / tag_for(20)).exists()
    # Named explicitly, a corrupt checkpoint stops the run instead.
    _flip_a_byte(tmp_path / tag_for(10))
    with pytest.raises(ValueError, match=f"checkpoint.resume=.*fails its checksums \\({OPTIM_FILE}\\)"):
        manager(tmp_path, resume=str(tmp_path / tag_for(10))).select(INVARIANTS)
    assert manager(tmp_path).select(INVARIANTS) is None  # nothing verified is left: a fresh start


def test_select_names_every_changed_invariant(tmp_path: Path) -> None:
    manager(tmp_path).save(FileWritingEngine(), 4, {}, meta={"resume_invariants": INVARIANTS})
    changed = {**INVARIANTS, "data.batch_size": 64, "model.dims": [16, 64]}
    with pytest.raises(ValueError) as err:
        manager(tmp_path).select(changed)
    assert "data.batch_size: 32 -> 64" in str(err.value) and "model.dims: [16, 32] -> [16, 64]" in str(
        err.value
    )
    assert "run.seed" not in str(err.value)
    assert manager(tmp_path).select(INVARIANTS).ckpt.step == 4


def test_export_refuses_incomplete_or_missing_checkpoints(tmp_path: Path) -> None:
    mgr = manager(tmp_path / "run" / "checkpoints")
    first = mgr.save(FileWritingEngine(), 1, {}).path
    second = mgr.save(FileWritingEngine(), 2, {}).path
    (second / MANIFEST).unlink()
    assert resolve_checkpoint(tmp_path / "run") == first  # the newest committed one, not the newest folder
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        resolve_checkpoint(second)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")
    (first / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="holds no committed checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_fault_injection_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COATNET_CHECKPOINT_FAULT", "halfway:1")
    with pytest.raises(ValueError, match="COATNET_CHECKPOINT_FAULT='halfway:1'"):
        _fault_point("written", 0)
    monkeypatch.setenv("COATNET_CHECKPOINT_FAULT", "written:1")
    _fault_point("written", 0)  # another rank: nothing happens
    _fault_point("hashed", 1)  # another point: nothing happens


def test_each_rank_seals_the_files_it_wrote() -> None:
    # Sorting by name would interleave ranks 1, 10, 11, 2, ...: ownership comes from the name itself.
    assert _owner_rank("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert _owner_rank("zero_pp_rank_3_mp_rank_00_model_states.pt") == 3
    assert _owner_rank("mp_rank_00_model_states.pt") == 0  # ZeRO-1/2: written by rank 0


@pytest.mark.parametrize(
    "key, new", [("blake3_16mib_chunks", blake3.blake3), ("sha256_16mib_chunks", hashlib.sha256)]
)
def test_file_digest_is_a_hash_over_chunk_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key, new
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import pretrain.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "HASH_CHUNK", 1000)
    data = os.urandom(2500)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    chunks = b"".join(new(data[i : i + 1000]).digest() for i in (0, 1000, 2000))
    with ThreadPoolExecutor(2) as pool:
        assert ckpt.file_digest(tmp_path / "f", pool, key) == new(chunks).hexdigest()
    assert ckpt.file_digest(tmp_path / "f", key=key) == new(chunks).hexdigest()
    assert ckpt.file_digest(tmp_path / "empty", key=key) == new(new(b"").digest()).hexdigest()


def test_a_manifest_written_with_sha256_still_verifies_and_a_changed_byte_is_found(tmp_path: Path) -> None:
    """Checkpoints from before BLAKE3 carry the SHA-256 key: they resume; an unknown key never passes."""
    from pretrain.checkpoint import checksum_mismatches, file_digest

    names = ["a.pt", "b.pt", "c.pt"]
    for name in names:
        (tmp_path / name).write_bytes(os.urandom(3000))
    old = "sha256_16mib_chunks"
    files = {n: {"bytes": 3000, old: file_digest(tmp_path / n, key=old)} for n in names}
    files["c.pt"] = {"bytes": 3000, "md5": "0" * 32}
    (tmp_path / MANIFEST).write_text(json.dumps({"files": files}))
    assert checksum_mismatches(tmp_path) == ["c.pt"]
    with open(tmp_path / "b.pt", "r+b") as fh:
        fh.seek(1234)
        byte = fh.read(1)[0]
        fh.seek(1234)
        fh.write(bytes([byte ^ 1]))
    assert checksum_mismatches(tmp_path) == ["b.pt", "c.pt"]
