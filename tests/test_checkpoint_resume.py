"""Checkpoints under real training: exact resume, SIGKILL inside a save, resume at another world size.

Every run is the real `pretrain.train` on configs/smoke.yaml (tiny CoAtNet-0, ZeRO-3, bf16, activation
checkpointing) over the digits shards, launched by torchrun (2 ranks) or as a plain process (1 rank).
All runs share one schedule and global batch (tests/fixtures/training.py: STEPS, K, COMMON), so any two
runs see the same samples at the same step and their per-step losses can be compared.

The reference and the interrupted run are session fixtures (tests/fixtures/training.py), shared with
test_export.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import HASH_KEY, MANIFEST, POINTER, file_digest, read_manifest, tag_for
from pretrain.export import consolidated_state_dict
from pretrain.signing import sign
from tests.fixtures.training import STEPS, STOP_AT_K, K, assert_stopped_for_requeue
from tests.fixtures.training import smoke_train as train
from tests.helpers.launch import losses, rank0_log, tail

# Another world size: the same samples and weights at the first resumed step, then gradients summed in
# another order (all-reduce over 2 ranks vs 2 accumulation steps) and rounded to bf16 weights. Measured
# here: the per-step loss difference stays at or below 1e-3 for ~8 steps, then grows as bf16 rounding
# flips weights (up to 0.02-0.08 on single steps by 20 steps, mean ~0.01). Per-step losses move by
# ~0.05 from batch to batch, so a wrong model, optimizer state, schedule or data position shows up far
# above the early tolerance; the late bounds only say the run stays on the same trajectory.
EARLY_STEPS, EARLY_TOL = 8, 5e-3
LATE_MAX, LATE_MEAN = 0.15, 0.03


def seeded_run_dir(root: Path, name: str, snapshot: Path) -> Path:
    """A fresh run folder whose checkpoint folder holds a copy of the committed checkpoint `snapshot`."""
    run_dir = root / name
    shutil.copytree(snapshot, run_dir / "checkpoints" / snapshot.name)
    (run_dir / "checkpoints" / POINTER).write_text(snapshot.name + "\n")
    return run_dir


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_stopped_and_resumed_match_an_uninterrupted_run_bitwise(
    reference_run: Path, interrupted_run: tuple[Path, Path]
) -> None:
    reference = reference_run
    resumed, _ = interrupted_run
    assert f"resumed from {resumed / 'checkpoints' / tag_for(K)} at step {K}" in rank0_log(resumed)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    after = range(K + 1, STEPS + 1)  # the stopped job logged one mean over 1..K; every later step is compared
    assert {s: losses(resumed)[s] for s in after} == {s: expected[s] for s in after}  # bitwise float equality
    final = tag_for(STEPS)
    a = consolidated_state_dict(reference / "checkpoints" / final)
    b = consolidated_state_dict(resumed / "checkpoints" / final)
    assert a.keys() == b.keys()
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"final weights differ: {unequal[:5]}"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_inside_a_save_resumes_from_the_previous_committed_checkpoint(
    reference_run: Path, interrupted_run: tuple[Path, Path], digits_shards: Path, tmp_path: Path
) -> None:
    reference = reference_run
    _, snapshot = interrupted_run
    run_dir = seeded_run_dir(tmp_path, "killed", snapshot)
    ckpts = run_dir / "checkpoints"
    partial = ckpts / tag_for(2 * K)
    # The save of step 2K is cut short at each point before its commit that leaves a different folder
    # behind: rank 1 killed by its background writer after its first file, while its training thread
    # runs the steps after 2K (checkpoint.async_save, the default); every file there without a manifest
    # ("written" and "hashed" leave the same, digests live in memory until the manifest); an unrenamed
    # manifest. Every restart must resume from step K (never from the partial folder) and redo steps
    # K+1..2K identically.
    for point in ("writing:1", "manifest_tmp:0"):
        proc = train(2, run_dir, digits_shards, env={"COATNET_CHECKPOINT_FAULT": point})
        assert proc.returncode != 0, f"{point}: the run was not killed\n{tail(proc)}"
        log = rank0_log(run_dir)
        assert f"resumed from {ckpts / tag_for(K)} at step {K}" in log.split("run folder")[-1], point
        assert partial.is_dir() and not (partial / MANIFEST).exists(), point
        assert (ckpts / POINTER).read_text().strip() == tag_for(K), point
        assert {s: losses(run_dir)[s] for s in range(K + 1, 2 * K + 1)} == {
            s: losses(reference)[s] for s in range(K + 1, 2 * K + 1)
        }, point
    assert "ignoring incomplete checkpoint" in rank0_log(run_dir)
    assert list(partial.glob(".MANIFEST.json.tmp*")), "the last kill left its unrenamed manifest"

    # Killed right after the manifest's rename: that checkpoint is committed (LATEST is stale) and used.
    proc = train(2, run_dir, digits_shards, env={"COATNET_CHECKPOINT_FAULT": "committed:0"})
    assert proc.returncode != 0, tail(proc)
    assert (partial / MANIFEST).exists() and (ckpts / POINTER).read_text().strip() == tag_for(K)

    proc = train(2, run_dir, digits_shards)
    assert proc.returncode == 0, tail(proc)
    assert f"resumed from {partial} at step {2 * K}" in rank0_log(run_dir).split("run folder")[-1]
    got, expected = losses(run_dir), losses(reference)
    assert {s: got[s] for s in range(K + 1, STEPS + 1)} == {s: expected[s] for s in range(K + 1, STEPS + 1)}


def assert_close_trajectory(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    """Tight over the first EARLY_STEPS steps, loose (same level, small mean) over the rest."""
    diffs = {s: abs(got[s] - expected[s]) for s in steps}
    shown = {s: f"{d:.1e}" for s, d in diffs.items()}
    assert max(diffs[s] for s in steps[:EARLY_STEPS]) < EARLY_TOL, shown
    assert max(diffs.values()) < LATE_MAX and sum(diffs.values()) / len(diffs) < LATE_MEAN, shown


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_to_one_through_the_universal_checkpoint(
    reference_run: Path, interrupted_run: tuple[Path, Path], digits_shards: Path, tmp_path: Path
) -> None:
    reference = reference_run
    _, snapshot = interrupted_run

    other_model = seeded_run_dir(tmp_path, "other-model", snapshot)
    proc = train(1, other_model, digits_shards, "model.dims=[16,16,32,64,64]")
    assert proc.returncode != 0
    assert "was saved with another config than this run's" in proc.stderr, tail(proc)
    assert "model.dims: [16, 16, 32, 64, 128] -> [16, 16, 32, 64, 64]" in proc.stderr  # old -> new

    run_dir = seeded_run_dir(tmp_path, "two-to-one", snapshot)
    proc = train(1, run_dir, digits_shards)
    assert proc.returncode == 0, tail(proc)
    universal = run_dir / "checkpoints" / (tag_for(K) + "_universal")
    assert f"checkpoint of 2 rank(s) loaded into 1 through {universal}" in rank0_log(run_dir)
    assert universal.is_dir()
    got, expected = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(K + 1, STEPS + 1))
    assert_close_trajectory(got, expected, range(K + 1, STEPS + 1))
    assert got != {s: expected[s] for s in got}  # another world size really ran (not bitwise)
    # The data position carried over: the first resumed step has seen (K + 1) x 64 samples, not 64.
    manifest = json.loads((digits_shards / "train" / "manifest.json").read_text())
    per_epoch = sum(shard["samples"] for shard in manifest["shards"])
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == K + 1 and first["epoch"] == pytest.approx((K + 1) * 64 / per_epoch)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_rank_to_two_through_the_universal_checkpoint(
    reference_run: Path, digits_shards: Path, tmp_path: Path
) -> None:
    reference = reference_run
    run_dir, stop = tmp_path / "one-to-two", tmp_path / "stop"
    stop.touch()
    proc = train(1, run_dir, digits_shards, STOP_AT_K, env={"COATNET_STOP_FILE": str(stop)})
    assert_stopped_for_requeue(proc, run_dir)
    expected = losses(reference)
    # Same samples at 1 rank: the mean loss of steps 1..K is the reference's, to bf16 summation order.
    assert abs(losses(run_dir)[K] - sum(expected[s] for s in range(1, K + 1)) / K) < EARLY_TOL
    stop.unlink()
    proc = train(2, run_dir, digits_shards)
    assert proc.returncode == 0, tail(proc)
    assert "checkpoint of 1 rank(s) loaded into 2 through" in rank0_log(run_dir)
    assert_close_trajectory(losses(run_dir), expected, range(K + 1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_canary_refuses_a_checkpoint_that_does_not_reproduce_its_model(
    interrupted_run: tuple[Path, Path], digits_shards: Path, tmp_path: Path
) -> None:
    _, snapshot = interrupted_run
    run_dir = seeded_run_dir(tmp_path, "canary", snapshot)
    tag = run_dir / "checkpoints" / tag_for(K)
    # Stands for a writer bug: the canary loss recorded at save disagrees with the saved weights, while
    # every file matches the manifest (sizes and digests rewritten), so only the canary can notice.
    manifest = read_manifest(tag)
    for path in tag.glob("zero_pp_rank_*_model_states.pt"):
        state = torch.load(path, weights_only=False)
        state["trainer"]["shared"]["canary"]["loss"] += 0.01
        torch.save(state, path)
        manifest["files"][path.name] = {"bytes": path.stat().st_size, HASH_KEY: file_digest(path)}
    (tag / MANIFEST).write_text(json.dumps(sign(manifest)))  # the buggy writer is this user's own
    proc = train(2, run_dir, digits_shards)
    assert proc.returncode != 0
    assert "resume canary failed" in proc.stderr and "a fixed batch's loss" in proc.stderr, tail(proc)
    assert not (run_dir / "checkpoints" / tag_for(K + 10)).exists()  # no step was trained
