"""The short fault set of `make test`: real deepspeed launches on 2 CPU ranks, judged by their losses.

A random SIGKILL between steps, the newest checkpoint corrupted, a second job on a live run folder,
resume=never on 2 ranks, and a full disk. Kills inside a save run at every point of the commit protocol in
tests/test_checkpoint_resume.py (deterministically); random ones in `make faults`. The long set (N random kills and every
other trial, with the table) is `make faults` (python -m tests.faults.run).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tests.faults import harness, trials
from tests.faults.run import table

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def ctx(
    tmp_path_factory: pytest.TempPathFactory, digits_shards: Path, reference_run: Path
) -> harness.Context:
    """The trials' reference is the checkpoint tests' uninterrupted run (tests/fixtures/training.py): the
    same schedule and batches; torchrun instead of the deepspeed launcher and no evaluation change no loss
    (`make faults` trains its own reference with the trials' exact command)."""
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(reference_run, root / "reference", ignore=shutil.ignore_patterns("LOCK"))
    return harness.Context(root=root, shards=digits_shards, reference=harness.reference_losses(reference_run))


def check(result: harness.Result) -> None:
    print("\n" + table([result]))
    assert result.ok, table([result])


def test_a_random_sigkill_loses_nothing_beyond_the_last_checkpoint(ctx: harness.Context) -> None:
    check(harness.random_kill(ctx, random.Random("step"), index=0, mode="step"))


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    ctx: harness.Context,
) -> None:
    check(trials.corrupt_newest(ctx))


def test_a_second_job_on_a_live_run_folder_is_refused_naming_the_holder(ctx: harness.Context) -> None:
    check(trials.second_job(ctx))


def test_resume_never_on_two_ranks_refuses_a_folder_that_holds_a_run(ctx: harness.Context) -> None:
    check(trials.resume_never(ctx))


def test_a_full_disk_refuses_the_save_naming_folder_and_bytes_then_resumes(ctx: harness.Context) -> None:
    result = trials.full_disk(ctx, "precheck")
    if "cannot mount" in result.note:
        pytest.skip(result.note)
    check(result)
