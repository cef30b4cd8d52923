"""The fault trials other than random SIGKILLs; each returns a harness.Result (one row of the table).

Every trial ends like a random kill: the same command again until it exits 0, every logged loss equal to
the reference's. Trials that expect a refusal (a second job, resume=never) check the refusal and that the
run folder was left as it was.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from data_pipeline.tarindex import read_index
from pretrain.checkpoint import FAULT_ENV, MANIFEST, POINTER, tag_for
from tests.faults.harness import (
    Context,
    Launch,
    Result,
    committed_step,
    compare_losses,
    finish,
    logged_step,
    loss_lines,
    resumed_steps,
    wait_until,
)
from tests.fixtures.training import STEPS, K

HUNG_TIMEOUT_MINUTES = 1
HUNG_LIMIT_S = 180  # a hung rank must end the job within this long of the hang (1 min timeout + 30 s grace)


def copy_reference(ctx: Context, name: str, keep_until: int = STEPS) -> Path:
    """A run folder holding the reference's checkpoints and metric lines up to step `keep_until`."""
    run_dir = ctx.run_dir(name)
    src = ctx.root / "reference"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("LOCK", "logs"))
    ckpts = run_dir / "checkpoints"
    for tag_dir in ckpts.glob("step_*"):
        if int(tag_dir.name.split("_")[1]) > keep_until:
            shutil.rmtree(tag_dir)
    (ckpts / POINTER).write_text(tag_for(keep_until) + "\n")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(ln for ln in lines if json.loads(ln)["step"] <= keep_until)
    )
    return run_dir


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "logs" not in p.parts and p.name != "LOCK"
    }


def _first_line(output: str, needle: str) -> str:
    return next((line.strip() for line in output.splitlines() if needle in line), "")


def _finish_and_measure(ctx: Context, result: Result, run_dir: Path, committed: int, *overrides: str) -> None:
    finish(ctx, result, run_dir, *overrides)
    resumed = resumed_steps(run_dir)
    result.lost = committed - (resumed[0] if resumed else 0)


# ------------------------------------------------------------------------------------------------ trials


def sigterm_job(ctx: Context) -> Result:
    """SIGTERM to every process of the job at once (as Slurm signals a job step): save, exit, resume."""
    run_dir = ctx.run_dir("sigterm-job")
    result = Result(trial="sigterm-job")
    t0 = time.monotonic()
    launch = Launch(run_dir, ctx.shards)
    target = random.Random(1).randint(3, STEPS - 5)
    wait_until(lambda: logged_step(run_dir) >= target, launch)
    at = logged_step(run_dir)
    launch.signal_group(signal.SIGTERM)
    result.statuses.append(launch.wait())
    result.launches = 1
    log = (run_dir / "logs" / "rank0.log").read_text()
    stopped = _first_line(log, "stop requested: checkpoint at step")
    committed = committed_step(run_dir / "checkpoints")
    result.note = f"TERM after step {at}: {stopped.split('I pretrain.trainer: ')[-1][:60] or 'NO STOP SAVE'};"
    _finish_and_measure(ctx, result, run_dir, committed)
    result.redone = max(0, at - committed)
    if not stopped or committed < at:
        result.losses_equal = False
        result.note += " the stop did not save the step it stopped at;"
    result.seconds = time.monotonic() - t0
    return result


def hung_rank(ctx: Context) -> Result:
    """SIGSTOP one rank with engine.timeout_minutes=1: the job must end non-zero within HUNG_LIMIT_S."""
    run_dir = ctx.run_dir("hung-rank")
    result = Result(trial="hung-rank-sigstop")
    t0 = time.monotonic()
    timeout = f"engine.timeout_minutes={HUNG_TIMEOUT_MINUTES}"
    launch = Launch(run_dir, ctx.shards, timeout)
    wait_until(lambda: logged_step(run_dir) >= K + 3, launch)
    stopped = launch.signal_rank(1, signal.SIGSTOP)
    hung_at = time.monotonic()
    at = logged_step(run_dir)
    rc = launch.wait(timeout=HUNG_LIMIT_S + 120)
    ended = time.monotonic() - launch.started
    after_hang = time.monotonic() - hung_at
    launch.kill()  # whatever is left (a stopped rank the launcher gave up on)
    result.statuses.append(rc)
    result.launches = 1
    committed = committed_step(run_dir / "checkpoints")
    result.note = (
        f"rank 1 SIGSTOPped after step {at}{'' if stopped else ' (NOT FOUND)'}; job ended {rc} "
        f"{after_hang:.0f} s after the hang began ({ended:.0f} s after the job's start);"
    )
    _finish_and_measure(ctx, result, run_dir, committed, timeout)
    result.redone = max(0, at - committed)
    if rc == 0 or after_hang > HUNG_LIMIT_S:
        result.losses_equal = False
        result.note += f" NOT ended non-zero within {HUNG_LIMIT_S} s;"
    result.seconds = time.monotonic() - t0
    return result


def kill_background_write(ctx: Context) -> Result:
    """Rank 1 SIGKILLed by its background writer after the first file of the async save of step 2K, while
    its training thread runs the steps after 2K: the folder stays without a manifest, the next launch
    resumes from step K and loses nothing committed."""
    name = "kill-writing"
    run_dir = copy_reference(ctx, name, keep_until=K)
    ckpts = run_dir / "checkpoints"
    result = Result(trial=name)
    t0 = time.monotonic()
    launch = Launch(run_dir, ctx.shards, env={FAULT_ENV: "writing:1"})
    result.statuses.append(launch.wait())
    result.launches = 1
    rank1_log = run_dir / "logs" / "rank1.log"  # the console shows rank 0 only
    killed = "killing rank 1 at checkpoint point 'writing'" in rank1_log.read_text(errors="replace")
    partial = ckpts / tag_for(2 * K)
    uncommitted = partial.is_dir() and not (partial / MANIFEST).exists()
    committed = committed_step(ckpts)
    logged_at_kill = logged_step(run_dir)
    result.note = (
        f"killed in the background write: {killed}; {partial.name} without a manifest: {uncommitted}; "
        f"committed left: step {committed};"
    )
    _finish_and_measure(ctx, result, run_dir, committed)
    resumed = resumed_steps(run_dir)
    result.redone = max(0, logged_at_kill - K)
    result.losses_equal = (
        result.losses_equal and killed and uncommitted and committed == K and resumed[:1] == [K]
    )
    result.seconds = time.monotonic() - t0
    return result


def corrupt_newest(ctx: Context) -> Result:
    """Flip one byte of the newest checkpoint: it is set aside, the previous verified one resumes."""
    run_dir = copy_reference(ctx, "corrupt-newest")
    result = Result(trial="corrupt-newest")
    t0 = time.monotonic()
    victim = run_dir / "checkpoints" / tag_for(STEPS) / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # the run had finished: nothing to do, unless resume notices that its last checkpoint is bad
    _finish_and_measure(ctx, result, run_dir, STEPS - K)  # newest *verified* is the one before
    aside = list((run_dir / "checkpoints").glob(f"{tag_for(STEPS)}.corrupt-*"))
    result.redone = K
    result.note = f"{tag_for(STEPS)} set aside: {'yes' if aside else 'NO'};" + result.note
    result.losses_equal = result.losses_equal and bool(aside)
    result.seconds = time.monotonic() - t0
    return result


def second_job(ctx: Context) -> Result:
    """A second job on a live run folder: refused at once with one line naming the holder."""
    run_dir = ctx.run_dir("second-job")
    result = Result(trial="second-job")
    t0 = time.monotonic()
    first = Launch(run_dir, ctx.shards)
    wait_until(lambda: logged_step(run_dir) >= 3, first)
    # Hold the first job mid-run, however slowly the second starts on loaded cores: rank 1 paused, rank 0
    # waits for it in a collective while its lock heartbeat (a thread) goes on, as in a live job.
    first.signal_rank(1, signal.SIGSTOP)
    second = Launch(run_dir, ctx.shards)
    rc2 = second.wait(timeout=300)
    first.signal_rank(1, signal.SIGCONT)
    refusal = _first_line(second.output(), "is in use by a live job")
    result.statuses.append(first.wait())
    result.launches = 1
    result.losses_equal, why = compare_losses(run_dir, ctx.reference)
    refused_ok = rc2 == 2 and "pid " in refusal and " on " in refusal
    lines = sum("is in use by a live job" in line for line in second.output().splitlines())
    result.note = f"second job exit {rc2}, {lines} line(s) per-rank: {refusal[:110]!r}; {why}"
    if rc2 != 2:  # the launcher reports the first rank that failed: show how the ranks ended
        ended = [line for line in second.output().splitlines() if "exit" in line or "terminate" in line]
        result.note += f" launcher: {' | '.join(ended[-4:])[:600]!r}"
    result.losses_equal = result.losses_equal and refused_ok
    result.seconds = time.monotonic() - t0
    return result


def resume_never(ctx: Context) -> Result:
    """checkpoint.resume=never on a folder that holds a run, on 2 ranks: refused everywhere, nothing touched."""
    run_dir = copy_reference(ctx, "resume-never")
    result = Result(trial="resume-never-2-ranks")
    t0 = time.monotonic()
    before = _digests(run_dir)
    launch = Launch(run_dir, ctx.shards, "checkpoint.resume=never")
    rc = launch.wait(timeout=300)
    out = launch.output()
    refusals = sum(
        "checkpoint.resume=never" in line and "already holds a run" in line for line in out.splitlines()
    )
    untouched = _digests(run_dir) == before
    result.statuses.append(rc)
    result.launches = 1
    result.losses_equal = (
        compare_losses(run_dir, ctx.reference)[0] and untouched and rc == 2 and refusals >= 2
    )
    result.note = (
        f"exit {rc}, refused on {refusals} rank(s) in {time.monotonic() - launch.started:.0f} s; "
        f"run folder untouched: {untouched};"
    )
    # and then the command a person or a scheduler would rerun: resume=auto finds the run finished
    finish(ctx, result, run_dir)
    result.seconds = time.monotonic() - t0
    return result


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def full_disk(ctx: Context, mode: str) -> Result:
    """checkpoint.dir on a small tmpfs. `precheck`: the second save does not fit (refused before writing);
    `write`: not even the first fits (the write fails). Then the disk grows and the command resumes."""
    name = f"full-disk-{mode}"
    run_dir, mnt = ctx.run_dir(name), ctx.root / f"{name}-mnt"
    result = Result(trial=name)
    t0 = time.monotonic()
    try:
        _mount_tmpfs(mnt, "5m" if mode == "precheck" else "1m")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        result.note = f"cannot mount a tmpfs here ({exc}): trial not run"
        return result
    try:
        ckpt = f"checkpoint.dir={mnt}"
        launch = Launch(run_dir, ctx.shards, ckpt)
        rc = launch.wait()
        out = launch.output()
        needle = "no space for the checkpoint" if mode == "precheck" else "writing the checkpoint"
        line = _first_line(out, needle)
        result.statuses.append(rc)
        result.launches = 1
        committed = committed_step(mnt)
        message_ok = rc != 0 and str(mnt) in line and "bytes" in line
        result.note = f"exit {rc}: {line.split('error: ')[-1][:150]!r};"
        _remount(mnt, "64m")  # the cluster's clean-up (or a person) frees space
        _finish_and_measure(ctx, result, run_dir, committed, ckpt)
        result.redone = max(0, logged_step_at_failure(out) - committed)
        result.losses_equal = result.losses_equal and message_ok
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    result.seconds = time.monotonic() - t0
    return result


def logged_step_at_failure(output: str) -> int:
    """The last step the console reported ("step N/M ...") before a failure."""
    found = re.findall(r" step (\d+)/\d+ ", output)
    return max(map(int, found), default=0)


def universal_interrupted(ctx: Context) -> Result:
    """A 2-rank checkpoint resumed on 1 rank; the universal conversion is SIGKILLed half-way, then redone."""
    run_dir = copy_reference(ctx, "universal-interrupted", keep_until=K)
    result = Result(trial="universal-interrupted")
    t0 = time.monotonic()
    ckpts = run_dir / "checkpoints"
    launch = Launch(run_dir, ctx.shards, nproc=1)
    seen = wait_until(lambda: bool(list(ckpts.glob(f".{tag_for(K)}_universal.tmp*"))), launch)
    time.sleep(random.Random(2).uniform(0.0, 1.5))
    launch.kill()  # the node dies: rank 0 and its converter subprocess
    result.statuses.append(launch.wait())
    result.launches = 1
    half_done = not (ckpts / f"{tag_for(K)}_universal" / MANIFEST).exists()
    finish(ctx, result, run_dir, nproc=1)
    log = (run_dir / "logs" / "rank0.log").read_text()
    used = "checkpoint of 2 rank(s) loaded into 1 through" in log
    leftovers = list(ckpts.glob(".*universal.tmp*"))
    resumed = resumed_steps(run_dir)
    result.lost = K - (resumed[0] if resumed else 0)
    # another world size is not bitwise (tests/test_checkpoint_resume.py): close, on the same trajectory
    got = {s: v for s, v in loss_lines(run_dir) if s > K}
    diffs = [abs(got[s] - ctx.reference[s]) for s in got]
    close = len(got) == STEPS - K and max(diffs) < 0.15 and sum(diffs) / len(diffs) < 0.03
    result.losses_equal = used and close and not leftovers
    result.note = (
        f"killed {'during' if seen and half_done else 'NOT during'} the conversion; universal form used: {used}; "
        f"leftover temp folders: {len(leftovers)}; losses vs 2 ranks max diff {max(diffs, default=0):.1e} "
        "(1 rank: close, not bitwise);"
    )
    result.seconds = time.monotonic() - t0
    return result


def bad_input_one_rank(ctx: Context) -> Result:
    """One JPEG made undecodable: only the rank that reads it sees it; the job must end within a minute,
    naming the file; with the file repaired the same command resumes."""
    result = Result(trial="bad-input-one-rank")
    t0 = time.monotonic()
    shards = ctx.root / "bad-shards"
    shutil.copytree(ctx.shards, shards)
    tar = shards / "train" / "train-000001.tar"
    good = tar.read_bytes()
    sample = read_index(shards / "train" / "train-000001.idx")[5]
    _, offset, _, _ = sample.component("jpg")
    data = bytearray(good)
    data[offset : offset + 64] = b"\0" * 64  # no JPEG header any more; the tar itself stays valid
    tar.write_bytes(bytes(data))
    run_dir = ctx.run_dir("bad-input")
    launch = Launch(run_dir, shards)
    rc = launch.wait()
    out = launch.output()
    line = _first_line(out, "train-000001")
    # from the first error line any rank logged to the job's end
    result.statuses.append(rc)
    result.launches = 1
    committed = committed_step(run_dir / "checkpoints")
    elapsed = time.monotonic() - launch.started
    result.note = f"exit {rc} after {elapsed:.0f} s: {line[-140:]!r};"
    tar.write_bytes(good)
    ctx_fixed = Context(root=ctx.root, shards=shards, reference=ctx.reference)
    _finish_and_measure(ctx_fixed, result, run_dir, committed)
    result.losses_equal = result.losses_equal and rc != 0 and bool(line)
    result.seconds = time.monotonic() - t0
    return result


def slurm_sigterm(ctx: Context) -> Result:
    """Under cluster/pretrain.sbatch on a local Slurm cluster: SIGTERM to every task of the job's steps
    (launchers and ranks: `scancel --signal=TERM`), as Slurm signals a job it preempts with a GraceTime
    and as `--signal=TERM@N` does. The job must save, requeue itself and finish with the reference's losses.

    Not this trial: SIGTERM to the batch step as well (`--full`, a time limit, plain scancel). srun turns
    its own SIGTERM into a SIGKILL of its tasks at once ("srun: forcing job termination"), so no trainer
    can save then; pretrain.sbatch's warning signal (USR1 to the batch shell ahead of the time limit) is
    the defence, and tests/test_slurm_train.py runs it."""
    import os
    import sys
    import tempfile

    from cluster.local_slurm import ClusterSpec, LocalSlurm, SlurmUnavailable, check_prerequisites
    from pretrain.dist import free_port
    from tests.faults.harness import FAULTS, REPO
    from tests.helpers.launch import SMOKE, data_overrides

    result = Result(trial="slurm-sigterm-requeue")
    t0 = time.monotonic()
    try:
        check_prerequisites(0)
    except SlurmUnavailable as exc:
        result.note = f"no local Slurm: {exc}"
        return result
    base = Path(tempfile.mkdtemp(prefix="coatnet-faults-slurm-"))
    spec = ClusterSpec(
        base=base, nodes=0, tag=f"f{os.getpid() % 1000000}", ctld_port=free_port(), slurmd_port=free_port(),
        cred_expire_s=5,
    )  # fmt: skip
    cluster = LocalSlurm(spec)
    root = ctx.run_dir("slurm-sigterm")
    run_dir = root / "train"
    try:
        cluster.start()
        # The ranks have what the per-node deepspeed launcher gives them: it forwards SIGTERM and SIGKILLs
        # what is left 30 s later (as Slurm does KillWait seconds after a job-wide SIGTERM).
        env = {
            "PATH": f"{os.environ.get('PATH', '/usr/bin:/bin')}:{Path(sys.executable).parent}",
            "DS_ACCELERATOR": "cpu",
            "NPROC_PER_NODE": "2",
            "RUN_DIR": str(root / "slurm"),
            "PYTHONPATH": str(REPO),
        }
        overrides = [f"run.output_dir={root}", "run.name=train", *data_overrides(ctx.shards), *FAULTS]
        args = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=30", f"--output={root}/job.out",
                f"--chdir={REPO}", str(REPO / "cluster" / "pretrain.sbatch"), str(SMOKE), *overrides]  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        job = cluster.sbatch(*args, env=env)
        deadline = time.monotonic() + 600
        target = random.Random(3).randint(K + 2, STEPS - 5)
        while logged_step(run_dir) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        at = logged_step(run_dir)
        cluster.run("scancel", "--signal=TERM", str(job))
        cluster.wait_job(job, lambda f: f.get("Restarts") == "1", 300, "a requeue")
        fields = cluster.wait_finished(job, timeout_s=900)
        events = [line.split()[1] for line in (root / "slurm" / "events.log").read_text().splitlines()]
        ends = [
            line.split()[2]
            for line in (root / "slurm" / "events.log").read_text().splitlines()
            if " end " in line
        ]
        result.statuses = [0 if fields["JobState"] == "COMPLETED" else 1]
        result.launches = events.count("start")
        result.losses_equal, why = compare_losses(run_dir, ctx.reference)
        resumed = resumed_steps(run_dir)
        stop_steps = [
            int(line.split("step=")[1].split()[0])
            for line in (root / "slurm" / "events.log").read_text().splitlines()
            if " stop " in line
        ]
        result.lost = (stop_steps[0] - resumed[0]) if stop_steps and resumed else -1
        result.redone = max(0, at - resumed[0]) if resumed else 0
        shown = [e for e in events if e != "checkpoint"]
        result.note = f"TERM after step {at}; {fields['JobState']}, restarts {fields['Restarts']}; events {' '.join(shown)}; ends {' '.join(ends)}; {why}"
        result.losses_equal = result.losses_equal and "requeue" in events and bool(stop_steps)
    except Exception as exc:  # a trial's failure is a row of the table, not the end of the driver
        result.note += f" {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    return result


OTHER: dict[str, Callable[[Context], Result]] = {
    "hung": hung_rank,
    "writing": kill_background_write,
    "disk-precheck": lambda ctx: full_disk(ctx, "precheck"),
    "disk-write": lambda ctx: full_disk(ctx, "write"),
    "sigterm": sigterm_job,
    "second": second_job,
    "slurm-sigterm": slurm_sigterm,
    "corrupt": corrupt_newest,
    "never": resume_never,
    "badinput": bad_input_one_rank,
    "universal": universal_interrupted,
}
