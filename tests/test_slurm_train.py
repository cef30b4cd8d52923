"""Real Slurm, real trainer: cluster/pretrain.sbatch runs `pretrain.train` on configs/smoke.yaml.

Three emulated nodes (n1-n3), each job on two of them: one deepspeed launcher and one CPU rank per node,
ZeRO-3 over gloo, digits shards, MLflow in the run folder's sqlite store. Three jobs:

- the reference: trains to the last step uninterrupted (the launch path, checkpoints, MLflow tags);
- a warning signal mid-run: all ranks stop at one step, checkpoint, the job requeues itself and the
  requeued job finishes with the reference's losses, in the same MLflow run;
- a node's slurmd killed mid-run: Slurm requeues the job onto the spare node, which resumes from the last
  committed checkpoint, redoes the lost steps with the same losses as the first time, and finishes with the reference's losses.

The loss windows line up across a restart because the trainer stops only at log steps (multiples of the
logging interval, 5) and checkpoints every 20 steps, a multiple of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cluster.local_slurm import LocalSlurm
from pretrain.checkpoint import MANIFEST, POINTER, TAG_RE
from pretrain.preemption import Event, EventLog, downtimes
from tests.fixtures.slurm import REPO_ROOT

# Each test starts one or two training jobs; under load a job start alone took up to 2 minutes.
pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(1500)]

SBATCH = REPO_ROOT / "cluster" / "pretrain.sbatch"
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
# Local nodes have 2 CPUs and no GPUs: override the header's production sizes on the command line.
LOCAL = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
STEPS = 100
CKPT_EVERY = 20  # a multiple of LOG_EVERY; wide enough that a node can be killed between two checkpoints
LOG_EVERY = 5
EXPERIMENT = "slurm-e2e"
# Slow phases on 2 shared cores: starting a job (imports, process group, DALI, zero.Init) took 15-120 s.
START_S, REQUEUE_S, FINISH_S = 420, 180, 420
# Same world size, same seed, same data order: a resumed run must reproduce the reference's losses. CPU
# kernels are deterministic, so this is bitwise in practice; the tolerance only absorbs printing noise.
LOSS_TOL = 1e-9


@dataclass(frozen=True)
class TrainingJob:
    """One sbatch of pretrain.sbatch running the trainer, and where it writes."""

    slurm: LocalSlurm
    job_id: int
    root: Path

    @property
    def run_dir(self) -> Path:  # launch.sh's RUN_DIR: hostfile, stop file, event log
        return self.root / "slurm"

    @property
    def train_dir(self) -> Path:  # the trainer's run folder: checkpoints, metrics.jsonl, mlflow.db
        return self.root / "train"

    def log(self) -> str:
        path = self.root / "job.out"
        return path.read_text(errors="replace") if path.exists() else "(no job log yet)"

    def events(self) -> list[Event]:
        return EventLog(self.run_dir / "events.log").read()

    def committed_step(self) -> int:
        """Step of the newest committed checkpoint (the LATEST pointer); 0 before the first one."""
        pointer = self.train_dir / "checkpoints" / POINTER
        if not pointer.exists():
            return 0
        match = TAG_RE.match(pointer.read_text().strip())
        assert match, f"{pointer}: unexpected content {pointer.read_text()!r}"
        return int(match.group(1))

    def metric_lines(self) -> list[dict]:
        """Rank 0's metrics.jsonl training lines in file order (a redone step appears twice)."""
        path = self.train_dir / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [m for m in lines if "loss" in m]

    def losses(self) -> dict[int, float]:
        """Loss by step; for a step logged twice (redone after a failure), the later value."""
        return {m["step"]: m["loss"] for m in self.metric_lines()}

    def mlflow_runs(self) -> list[Run]:
        client = MlflowClient(tracking_uri=tracking_uri(self.train_dir))
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, f"no MLflow experiment {EXPERIMENT!r} in {self.train_dir}"
        return client.search_runs([experiment.experiment_id])

    def loss_history(self, run_id: str) -> list[tuple[int, float]]:
        client = MlflowClient(tracking_uri=tracking_uri(self.train_dir))
        history = client.get_metric_history(run_id, "train/loss")
        return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``condition``; TimeoutError with the job's state and log tail if it never holds."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {self.job_id}: {what} not seen after {timeout_s} s; "
                    f"state {self.slurm.job(self.job_id).get('JobState')}; log:\n{self.log()[-6000:]}"
                )
            time.sleep(0.2)

    def wait_requeued(self) -> dict[str, str]:
        return self.slurm.wait_job(self.job_id, lambda f: f.get("Restarts") == "1", REQUEUE_S, "a requeue")

    def wait_finished(self) -> dict[str, str]:
        fields = self.slurm.wait_finished(self.job_id, timeout_s=START_S + FINISH_S)
        assert fields["JobState"] == "COMPLETED", (fields, self.log()[-6000:])
        return fields


def tracking_uri(train_dir: Path) -> str:
    return f"sqlite:///{train_dir / 'mlflow.db'}"


def submit_training(slurm: LocalSlurm, env: dict[str, str], root: Path, shards: Path) -> TrainingJob:
    """sbatch cluster/pretrain.sbatch configs/smoke.yaml with this test's data, run folder and schedule."""
    train_dir = root / "train"
    overrides = [
        f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}",
        f"run.output_dir={root}",
        f"run.name={train_dir.name}",
        f"run.log_every={LOG_EVERY}",
        f"schedule.steps={STEPS}",
        f"checkpoint.every_steps={CKPT_EVERY}",
        f"tracking.uri={tracking_uri(train_dir)}",  # explicit: an MLFLOW_TRACKING_URI in the env must not win
        f"tracking.experiment={EXPERIMENT}",
    ]  # smoke.yaml's engine.param_persistence_threshold=0: every parameter is really sharded
    job_env = {**env, "RUN_DIR": str(root / "slurm")}
    args = [*LOCAL, f"--output={root}/job.out", f"--chdir={REPO_ROOT}", str(SBATCH), str(SMOKE)]
    return TrainingJob(slurm, slurm.sbatch(*args, *overrides, env=job_env), root)


def wait_for_tracked_checkpoint(job: TrainingJob) -> int:
    """Wait for a checkpoint that holds the MLflow run id; return its step.

    The tracker creates the MLflow run on a background thread, and the trainer stores whatever run id
    is known when it saves: a checkpoint saved before the run exists would start a second run on resume
    (a trainer race, reported separately). Rank 0 logs "MLflow: run <id>" once the id is set. The trainer
    saves after logging the step's metrics, so a checkpoint at a step not yet logged when that line was
    seen started after it.
    """
    job.wait_for(lambda: "MLflow: run " in job.log(), START_S, "the MLflow run")
    logged = max((m["step"] for m in job.metric_lines()), default=0)
    target = -(-(logged + LOG_EVERY) // CKPT_EVERY) * CKPT_EVERY  # first checkpoint step after `logged`
    assert target < STEPS - 2 * CKPT_EVERY, f"training too far ({logged} of {STEPS} steps) to interrupt it"
    job.wait_for(lambda: job.committed_step() >= target, FINISH_S, f"a checkpoint at step >= {target}")
    return job.committed_step()


def assert_same_losses(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=LOSS_TOL), f"step {step}: {losses[step]} != {loss}"


def assert_history(job: TrainingJob, run_id: str, losses: dict[int, float]) -> None:
    """MLflow's loss history holds every logged step with rank 0's value (a redone step's later value)."""
    history = dict(job.loss_history(run_id))  # sorted by (step, time): a redone step keeps the later value
    assert sorted(history) == sorted(losses)
    assert [history[s] for s in sorted(losses)] == pytest.approx([losses[s] for s in sorted(losses)])


def names(events: list[Event]) -> list[str]:
    return [e.name for e in events if e.name != "checkpoint"]


@pytest.fixture(scope="module")
def reference(
    slurm_cluster: LocalSlurm,
    slurm_job_env: dict[str, str],
    digits_shards: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[TrainingJob, dict[str, str]]:
    """The uninterrupted run every interrupted one is compared with: the job and its final Slurm fields."""
    slurm_cluster.wait_nodes("idle", timeout_s=60)
    job = submit_training(slurm_cluster, slurm_job_env, tmp_path_factory.mktemp("reference"), digits_shards)
    return job, job.wait_finished()


def test_sbatch_trains_zero3_on_two_nodes_and_commits_checkpoints(
    reference: tuple[TrainingJob, dict[str, str]],
) -> None:
    job, fields = reference
    assert fields["Restarts"] == "0" and fields["ExitCode"] == "0:0"
    assert (job.run_dir / "hostfile").read_text().splitlines() == ["n1 slots=1", "n2 slots=1"]
    assert sorted(job.losses()) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))

    # The final checkpoint is committed: the pointer names it and its manifest lists both ranks' shards.
    assert job.committed_step() == STEPS
    manifest = json.loads((job.train_dir / "checkpoints" / f"step_{STEPS:09d}" / MANIFEST).read_text())
    assert manifest["step"] == STEPS and manifest["world_size"] == 2
    for rank in (0, 1):  # ZeRO-3: each rank wrote its own partition of the weights and optimizer state
        assert f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in manifest["files"]
        assert f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest["files"]
    assert names(job.events()) == ["start", "end"]
    saved = sorted({int(e.fields["step"]) for e in job.events() if e.name == "checkpoint"})
    assert saved == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))

    (run,) = job.mlflow_runs()
    tags = run.data.tags
    assert tags["nodes"] == "2" and tags["world_size"] == "2" and tags["launcher"] == "deepspeed"
    assert tags["slurm_job_id"] == str(job.job_id) and tags["host"] == "n1"  # rank 0 on the head node
    assert run.data.params["engine.zero_stage"] == "3"
    assert run.info.status == "FINISHED"
    assert_history(job, run.info.run_id, job.losses())


def test_warning_signal_checkpoints_requeues_and_resumes_the_same_run(
    slurm: LocalSlurm,
    slurm_job_env: dict[str, str],
    digits_shards: Path,
    tmp_path: Path,
    reference: tuple[TrainingJob, dict[str, str]],
) -> None:
    job = submit_training(slurm, slurm_job_env, tmp_path, digits_shards)
    wait_for_tracked_checkpoint(job)
    # what `#SBATCH --signal=B:USR1@180` does before the time limit, without waiting for one
    slurm.run("scancel", "--batch", "--signal=USR1", str(job.job_id))
    requeued = job.wait_requeued()
    fields = job.wait_finished()

    assert requeued["Restarts"] == "1" and fields["Restarts"] == "1"
    events = job.events()
    assert names(events) == ["start", "signal", "stop", "end", "requeue", "start", "resumed", "end"]
    assert [e.fields["rc"] for e in events if e.name == "end"] == ["3", "0"]  # 3: EXIT_REQUEUE
    (stop,) = [int(e.fields["step"]) for e in events if e.name == "stop"]
    (resumed,) = [int(e.fields["step"]) for e in events if e.name == "resumed"]
    assert stop % LOG_EVERY == 0 and stop < STEPS  # ranks stop at a log step, before the end
    assert resumed == stop + 1  # nothing redone, nothing skipped
    assert stop in [int(e.fields["step"]) for e in events if e.name == "checkpoint"]  # saved on the stop

    # Every logged step once, each loss as in the uninterrupted run; the final checkpoint at the last step.
    assert [m["step"] for m in job.metric_lines()] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert_same_losses(job.losses(), reference[0].losses())
    assert job.committed_step() == STEPS

    # One MLflow run across both job runs: resumed by id, the whole loss curve in it, the lost time logged.
    (run,) = job.mlflow_runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == str(stop)
    assert run.data.tags["slurm_job_id"] == str(job.job_id)
    assert_history(job, run.info.run_id, job.losses())
    (lost,) = downtimes(events)
    assert lost.cause == "signal" and lost.seconds >= 5  # at least cred_expire before the restart
    assert run.data.metrics["preemption/lost_s"] == pytest.approx(lost.seconds, abs=0.5)
    assert run.data.metrics["preemption/count"] == 1
    print(f"warning signal at step {stop}: {lost.seconds:.1f} s lost to the requeue")


def test_dead_node_requeues_and_resumes_from_last_committed_checkpoint(
    slurm: LocalSlurm,
    slurm_job_env: dict[str, str],
    digits_shards: Path,
    tmp_path: Path,
    reference: tuple[TrainingJob, dict[str, str]],
) -> None:
    job = submit_training(slurm, slurm_job_env, tmp_path, digits_shards)
    committed = wait_for_tracked_checkpoint(job)
    # Let training get past that checkpoint, so that the failure loses work that must be redone.
    job.wait_for(lambda: max(job.losses(), default=0) > committed, FINISH_S, f"a step after {committed}")
    _, other = slurm.hostnames(slurm.job(job.job_id)["NodeList"])  # kill the node of rank 1
    killed_at = time.monotonic()
    slurm.kill_node(other)  # slurmd, its job step and the rank on it die at once, like a power loss
    requeued = job.wait_requeued()
    requeue_s = time.monotonic() - killed_at
    resume_from = job.committed_step()
    first_attempt = {m["step"]: m["loss"] for m in job.metric_lines()}
    # The dead node stays down: the requeued job runs on the spare, as on a cluster that has one.
    fields = job.wait_finished()
    assert other not in slurm.hostnames(fields["NodeList"]), fields["NodeList"]

    assert requeued["Restarts"] == "1" and fields["Restarts"] == "1"
    assert resume_from >= committed and resume_from < max(first_attempt)  # work after it was lost
    events = job.events()
    # Slurm SIGTERMs the batch shell of a job whose node died (launch.sh logs a 'signal'); no rank saved.
    assert "stop" not in names(events)
    (resumed,) = [int(e.fields["step"]) for e in events if e.name == "resumed"]
    assert resumed == resume_from + 1  # resumed from the last committed checkpoint

    # The lost steps were trained again, with the same losses as the first time and as the reference.
    redone = [step for step in first_attempt if step > resume_from]
    assert redone
    losses = job.losses()
    for step in redone:
        assert losses[step] == pytest.approx(first_attempt[step], abs=LOSS_TOL), step
    assert_same_losses(losses, reference[0].losses())
    assert job.committed_step() == STEPS

    (run,) = job.mlflow_runs()  # the checkpoint held the run id: the requeued job continued the run
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == str(resume_from)
    assert_history(job, run.info.run_id, losses)
    (lost,) = downtimes(events)
    assert lost.cause == "failure"  # measured from the last committed checkpoint: includes redone work
    assert run.data.metrics["preemption/lost_s"] == pytest.approx(lost.seconds, abs=0.5)
    print(
        f"node failure -> requeue in {requeue_s:.1f} s; resumed from step {resume_from}; "
        f"{lost.seconds:.1f} s lost"
    )
