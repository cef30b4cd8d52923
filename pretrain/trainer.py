"""The composition root and the training loop.

`Trainer.build(cfg)` wires the components together, each from its own config section, in the order
they must exist: ranks and process group, run folder (may this run start?), logging, the checkpoint to
resume (chosen and verified before the engine, which is configured for it), data, model under
zero.Init, optimizer, engine, EMA, tracking. `Trainer.fit()` is the loop: resume, then steps, metrics,
evaluation, checkpoints and preemption checks, in that order, until the last step or a stop request.

All resumable state goes through one path: model/optimizer/scheduler via DeepSpeed's checkpoint, and
everything else through one `pretrain.state.ClientState`, restored in the order it was saved. Rank
decisions live elsewhere: the run folder writes on rank 0 only (`RunDir`), the tracker is a no-op off
rank 0 (`build_tracker`), collectives are in `pretrain.dist`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Protocol

import torch

from data_pipeline.loader import TrainLoader, build_eval_loader, build_train_loader
from pretrain import dist
from pretrain.card import model_card
from pretrain.checkpoint import CheckpointManager, Committed, ResumePoint, Saved
from pretrain.config import TrainConfig, redact_userinfo, resume_invariants
from pretrain.configlib import ConfigError, dump_yaml, flatten, to_tree
from pretrain.ds_config import deepspeed_config, grad_accum_steps
from pretrain.ema import NoEma, ShardedEma
from pretrain.engine import (
    build_engine,
    build_model,
    full_parameter_count,
    set_determinism,
    training_flops_per_image,
)
from pretrain.evaluate import evaluate
from pretrain.logs import setup_logging
from pretrain.losses import build_loss
from pretrain.metrics import HostMemoryTrim, StepMeter, format_eta
from pretrain.optim import build_optimizer, build_scheduler, total_and_warmup_steps
from pretrain.preemption import EXIT_REQUEUE, JobContext, PreemptionHandler, downtimes
from pretrain.run_dir import RunDir
from pretrain.state import BatchNormStats, Canary, ClientState, TrainState, derived_seed, seed_everything
from pretrain.tracking import Tracker, build_tracker, init_lineage_tags, run_status, run_tags
from pretrain.transfer import LoadReport, load_initial_weights

log = logging.getLogger(__name__)

EXIT_OK = 0


class Ema(Protocol):
    """ShardedEma or NoEma."""

    decay: float

    @property
    def ready(self) -> bool: ...
    def update(self, step: int) -> None: ...
    def swapped_in(self): ...
    def state_dict(self) -> dict | None: ...
    def load_state_dict(self, state: dict | None) -> None: ...


class Trainer:
    def __init__(
        self,
        *,
        cfg: TrainConfig,
        info: dist.RankInfo,
        run_dir: RunDir,
        device: torch.device,
        engine,
        train_loader: TrainLoader,
        eval_loader,
        loss_fn,
        tracker: Tracker,
        checkpoints: CheckpointManager,
        resume: ResumePoint | None,
        preemption: PreemptionHandler,
        total_steps: int,
        accum: int,
        flops_per_image: float,
        ema: Ema,
        init_report: LoadReport | None = None,
    ):
        self.cfg, self.info, self.run_dir, self.device = cfg, info, run_dir, device
        self.engine, self.train_loader, self.eval_loader = engine, train_loader, eval_loader
        self.loss_fn, self.tracker, self.preemption = loss_fn, tracker, preemption
        self.checkpoints, self.resume = checkpoints, resume
        self.total_steps, self.accum, self.ema, self.init_report = total_steps, accum, ema, init_report
        self.global_batch = cfg.data.batch_size * accum * info.world_size
        self.meter = StepMeter(
            self.global_batch, info.world_size, flops_per_image, cfg.engine.peak_tflops, device
        )
        self.state = TrainState()
        self.host_memory = HostMemoryTrim(device)  # malloc's free pages back to the OS (CPU devices)
        self.canary = Canary(train_loader.label_kind, device, cfg.checkpoint.canary_tolerance)
        self.client = ClientState(
            train=self.state,
            loader=train_loader,
            batchnorm=BatchNormStats(engine.module),
            canary=self.canary,
            ema=ema,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.run.seed,
        )
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._loss_count = 0
        self.checkpoints.on_commit = self._committed
        self._started = time.time()  # this job's start; earlier jobs' time is in state.elapsed_s
        self._elapsed_before = 0.0

    # ================================================================================================ build

    @classmethod
    def build(cls, cfg: TrainConfig) -> Trainer:
        info = dist.detect()
        _check_inputs(cfg)
        device = dist.init_distributed(info, cfg.engine.timeout_minutes)
        run_dir: RunDir | None = None
        try:
            job = JobContext.from_env()  # stop file and event log of cluster/launch.sh, when under Slurm
            run_dir = RunDir.open(
                Path(cfg.run.output_dir) / cfg.run.name,
                resume=cfg.checkpoint.resume,
                events_file=job.events_file,
            )
            return cls._build(cfg, info, device, run_dir, job)
        except BaseException:
            if run_dir is not None:
                run_dir.close()  # the lock of a job that never started
            # A refused job exits with its own status: a gloo process group still alive at interpreter exit
            # can abort the process (SIGABRT), and the launcher would report that instead.
            dist.destroy()
            raise

    @classmethod
    def _build(
        cls, cfg: TrainConfig, info: dist.RankInfo, device: torch.device, run_dir: RunDir, job: JobContext
    ) -> Trainer:
        setup_logging(info, run_dir.logs, console_all_ranks=cfg.run.console_all_ranks)
        log.info(
            "run folder %s; %d rank(s) via %s on %s", run_dir.path, info.world_size, info.launcher, device
        )
        checkpoints = CheckpointManager(cfg.checkpoint, cfg.checkpoint.folder(run_dir.path), info)
        resume = checkpoints.select(resume_invariants(cfg))  # verified, converted; before anything is written
        run_dir.write_config(redact_userinfo(dump_yaml(cfg)))  # no URI's password in the run folder
        set_determinism(cfg.engine.deterministic)  # before the first kernel: cuBLAS reads its workspace then
        seed_everything(cfg.run.seed)  # the same on every rank: the model starts identical everywhere

        where = {"image_size": cfg.model.image_size, "rank": info.rank, "world_size": info.world_size}
        train_loader = build_train_loader(cfg.data, seed=cfg.run.seed, device=device, **where)
        eval_loader = build_eval_loader(cfg.data, device=device, **where) if cfg.data.val else None
        num_classes = cfg.model.num_classes or train_loader.num_classes

        accum = grad_accum_steps(cfg.engine.global_batch_size, cfg.data.batch_size, info.world_size)
        ds_config = deepspeed_config(
            cfg.engine,
            cfg.optim,
            micro_batch=cfg.data.batch_size,
            world_size=info.world_size,
            load_universal=resume is not None and resume.universal,
        )
        run_dir.write_json("ds_config.json", ds_config)  # what DeepSpeed got, for the run's MLflow artifacts
        model = build_model(cfg.model, num_classes=num_classes, ds_config=ds_config)
        # Fine-tuning: before the engine exists, so that the fp32 master weights start from these values.
        # A resumed fine-tune takes its weights from the checkpoint instead.
        init_report = load_initial_weights(model, cfg.init) if cfg.init.path and resume is None else None
        optimizer = build_optimizer(model, cfg.optim)
        steps_per_epoch = train_loader.micro_steps_per_epoch / accum  # optimizer steps
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.schedule, steps_per_epoch)
        engine = build_engine(
            model,
            optimizer,
            scheduler,
            ds_config,
            compile_model=cfg.engine.compile,
            gather_unit_elements=cfg.engine.gather_unit_elements,
        )
        ema = (
            ShardedEma(engine.module, cfg.ema.decay, cfg.ema.every, info.world_size)
            if cfg.ema.decay
            else NoEma()
        )
        # From here on every rank draws its own randomness (drop-path masks); saved per rank with checkpoints.
        seed_everything(derived_seed(cfg.run.seed, "rank", info.rank))
        total_steps, warmup = total_and_warmup_steps(cfg.schedule, steps_per_epoch)
        log.info(
            "%s: %.1fM parameters, %d classes; %d steps (%d warm-up) of %d images (%d x %d x %d ranks)",
            cfg.model.name,
            full_parameter_count(model) / 1e6,
            num_classes,
            total_steps,
            warmup,
            cfg.data.batch_size * accum * info.world_size,
            cfg.data.batch_size,
            accum,
            info.world_size,
        )
        return cls(
            cfg=cfg,
            info=info,
            run_dir=run_dir,
            device=device,
            engine=engine,
            train_loader=train_loader,
            eval_loader=eval_loader,
            loss_fn=build_loss(cfg.loss, num_classes),
            tracker=build_tracker(cfg.tracking, info, run_dir.path),
            checkpoints=checkpoints,
            resume=resume,
            preemption=PreemptionHandler(
                stop_file=job.stop_file, file_every_s=cfg.run.stop_check_s, align=cfg.run.log_every
            ),
            total_steps=total_steps,
            accum=accum,
            flops_per_image=training_flops_per_image(cfg.model, num_classes),
            ema=ema,
            init_report=init_report,
        )

    # ================================================================================================ loop

    def fit(self) -> int:
        """Train to the last step. Returns 0, or EXIT_REQUEUE after saving when asked to stop."""
        resumed = self._resume()
        self.host_memory.now()  # what the build and the load freed
        if resumed is not None and self.state.step >= self.total_steps:
            log.info("%s already finished at step %d: nothing to do", self.run_dir.path, self.state.step)
            return EXIT_OK
        self.state.started_at = self.state.started_at or self._started  # goodput counts from here
        self._start_tracking(resumed)
        batches = iter(self.train_loader)
        self.meter.report()  # start the clock after resume and set-up
        while self.state.step < self.total_steps:
            self._train_step(batches)
            step = self.state.step
            if resumed is not None and step == resumed.step + 1:
                self._log_downtime(step)
            if step % self.cfg.run.log_every == 0 or step == self.total_steps:
                self._log_metrics(step)
            if self.cfg.run.eval_every and step % self.cfg.run.eval_every == 0 and step < self.total_steps:
                self._evaluate(step)
                self.host_memory.now()
            self.checkpoints.poll()  # commits a background save once every rank has written it
            if self.cfg.checkpoint.every_steps and step % self.cfg.checkpoint.every_steps == 0:
                self._save(step, wait=False)
            if self.preemption.should_stop(step):
                self.state.preemptions += 1
                self._save(step)
                self.run_dir.record_event("stop", step=step)
                log.info(
                    "stop requested: checkpoint at step %d saved; exiting with status %d for requeue",
                    step,
                    EXIT_REQUEUE,
                )
                self.tracker.log_metrics({"preemptions": self.state.preemptions}, step)
                return EXIT_REQUEUE
        final = self._evaluate(self.state.step)
        self._save(self.state.step)
        if self.ema.ready:
            self._export_ema()
        log.info(
            "done: %d steps in %s (all jobs of this run)%s",
            self.state.step,
            format_eta(self._elapsed()),
            "".join(f", {k} {v:.4f}" for k, v in final.items() if k != "samples"),
        )
        return EXIT_OK

    def _train_step(self, batches) -> None:
        """One optimizer step: `accum` micro-batches through forward and backward, then the update.

        No host-device sync of ours here (loaders copy non_blocking): the time around `next()` is the
        host's wait for input, never for the GPU. Sync points: log steps, evaluations, saves."""
        started = time.perf_counter()
        for _ in range(self.accum):
            t0 = time.perf_counter()
            images, targets = next(batches)
            self.meter.data_wait(time.perf_counter() - t0)
            loss = self.loss_fn(self.engine(images), targets)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                # Before the update, the step's peak (fp32 gradients, Adam): what forward and backward freed.
                self.host_memory.before_update()
            self.engine.step()  # DeepSpeed applies the update only at the accumulation boundary
            self._loss_sum += loss.detach().to(torch.float64)
            self._loss_count += 1
            self.canary.observe(images, targets)  # first batch kept for resumes: one sync (.cpu()) per job
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        self.ema.update(self.state.step)
        self.meter.step_done()
        self.state.productive_s += time.perf_counter() - started  # saved: redone steps count once

    def _log_metrics(self, step: int) -> None:
        # Collective (every rank reaches the same log steps): the mean loss over ranks and steps.
        totals = dist.all_reduce_sum(
            torch.stack([self._loss_sum, self._loss_sum.new_tensor(self._loss_count)])
        )
        loss = (totals[0] / totals[1].clamp(min=1)).item()  # host-device sync point, once per log step
        self._loss_sum.zero_()
        self._loss_count = 0
        figures = self.meter.report()
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {"loss": loss, "lr": self.engine.get_lr()[0], **figures, "epoch": self._epoch()}
        metrics["samples_seen"] = self.state.samples_seen
        # Goodput: productive step time over wall time since the run began, across requeues.
        metrics["goodput"] = self.state.productive_s / max(1e-9, time.time() - self.state.started_at)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(metrics, step)
        self.run_dir.append_metrics(step, metrics)
        eta = figures["step_time_s"] * (self.total_steps - step)
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  gnorm %s  %.0f img/s  data %.0f%%  %s  eta %s",
            step,
            self.total_steps,
            loss,
            metrics["lr"],
            f"{metrics['grad_norm']:.3f}" if grad_norm is not None else "-",
            figures["images_per_s"],
            100 * figures["data_wait_fraction"],
            f"mfu {100 * figures['mfu']:.1f}%" if "mfu" in figures else "",
            format_eta(eta),
        )

    def _log_downtime(self, step: int) -> None:
        """After the first step of a resumed job: how much time the interruption cost (Slurm event log)."""
        self.run_dir.record_event("resumed", step=step)
        lost = downtimes(self.run_dir.events())
        if lost:
            log.info("resumed after a %s; %.0f s of training time lost", lost[-1].cause, lost[-1].seconds)
            self.tracker.log_metrics({"preemption/lost_s": lost[-1].seconds}, step)

    def _elapsed(self) -> float:
        """Wall-clock seconds of this run across requeues (time lost between jobs not included)."""
        return self._elapsed_before + time.time() - self._started

    def _epoch(self) -> float:
        return self.state.samples_seen / max(1, self.train_loader.samples_per_epoch)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics of the weights, and of their EMA when there is one (keys prefixed `ema_`)."""
        if self.eval_loader is None:
            return {}
        results = self._evaluate_weights()
        if not results:  # a stop request arrived during it (all ranks at one batch): save and stop
            return {}
        if self.ema.ready:
            with self.ema.swapped_in():
                results.update({f"ema_{k}": v for k, v in self._evaluate_weights().items() if k != "samples"})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in results.items() if k != "samples"}, step)
        self.run_dir.append_metrics(step, {f"eval/{k}": v for k, v in results.items()})
        log.info(
            "eval at step %d: %s",
            step,
            ", ".join(f"{k} {v:.0f}" if k == "samples" else f"{k} {v:.4f}" for k, v in results.items()),
        )
        return results

    def _evaluate_weights(self) -> dict[str, float]:
        """{} when abandoned for a stop request (`PreemptionHandler.poll`, not during the final one)."""
        # Host-device sync point: evaluate() reads its counts once, at the end of the pass.
        self.engine.eval()
        stop = self.preemption.poll if self.state.step < self.total_steps else None  # not the final one
        try:
            kind = self.train_loader.label_kind
            return (
                evaluate(self.engine, self.eval_loader, label_kind=kind, device=self.device, stop=stop) or {}
            )
        finally:
            self.engine.train()

    def _card(self) -> dict:
        module = self.engine.module
        card = model_card(
            model_name=self.cfg.model.name,
            model_config=module.config,
            image_size=self.cfg.model.image_size,
            num_classes=module.num_classes,
            label_kind=self.train_loader.label_kind,
            class_names=self.train_loader.class_names,
            step=self.state.step,
            samples_seen=self.state.samples_seen,
            eval_crop_ratio=self.cfg.data.eval_crop_ratio,
        )
        return {**card, "training_run": {**self.tracker.lineage(), "run_dir": str(self.run_dir.path)}}

    def _export_ema(self) -> None:
        """The final EMA weights as ema.safetensors + ema.json in the run folder, for `init.path` (collective)."""
        tensors = self.ema.full_state_dict()
        for name, buf in self.engine.module.state_dict(keep_vars=True).items():
            if name not in tensors and not isinstance(buf, torch.nn.Parameter):
                tensors[name] = buf.detach().cpu().clone()  # BatchNorm statistics: averaged at the last save
        sidecar = {**self._card(), "dtype": "float32", "tensors": len(tensors), "ema_decay": self.ema.decay}
        out = self.run_dir.write_safetensors("ema.safetensors", tensors, sidecar)
        log.info("EMA weights written to %s", out)

    # ================================================================================================ state

    def _save(self, step: int, wait: bool = True) -> None:
        """Checkpoint `step` (collective) unless this job holds one already. `wait`: return only once it is
        committed (stop and final saves); otherwise, with checkpoint.async_save, once the state is in host
        memory (`poll` commits it later). A save in flight is committed first either way."""
        if wait:
            self.checkpoints.finish()
        if self.checkpoints.holds(step):
            return  # e.g. a stop request or the end right after a periodic save
        self.state.mlflow_run_id = self.tracker.run_id or self.state.mlflow_run_id
        self.state.elapsed_s = self._elapsed()
        # Host-device sync point: the canary's loss and the state copies to the host.
        meta = {"resume_invariants": resume_invariants(self.cfg), "card": self._card()}
        client = {"trainer": self.client.state_dict(self.engine)}
        self.checkpoints.save(self.engine, step, client, meta, wait=wait)
        self.host_memory.now()

    def _committed(self, saved: Saved) -> None:
        """A checkpoint is committed (CheckpointManager.on_commit): the event log, the console, MLflow."""
        self.run_dir.record_event("checkpoint", step=saved.step)
        blocked = saved.timings.get("blocked", saved.seconds)
        phases = ", ".join(f"{k} {v:.2f}" for k, v in saved.timings.items() if k != "blocked")
        later = f"{saved.steps_later} step(s) after its save, " if saved.steps_later else ""
        log.info(
            "checkpoint %s committed %s%.2f s in all (training blocked %.2f s; seconds per phase: %s)",
            saved.path,
            later,
            saved.seconds,
            blocked,
            phases,
        )
        self.tracker.log_metrics({"checkpoint_s": saved.seconds, "checkpoint_blocked_s": blocked}, saved.step)

    def _resume(self) -> Committed | None:
        """Load the checkpoint chosen at build time (None: a fresh start); see CheckpointManager.select."""
        if self.resume is None:
            return None
        t0 = time.perf_counter()
        saved = self.checkpoints.load(self.engine, self.resume)
        self.client.load_state_dict(saved, self.engine, where=str(self.resume.ckpt.path))
        self._elapsed_before = self.state.elapsed_s
        took, epoch = time.perf_counter() - t0, self._epoch()
        log.info(
            "resumed from %s at step %d (epoch %.2f) in %.1f s",
            self.resume.ckpt.path,
            self.state.step,
            epoch,
            took,
        )
        return self.resume.ckpt

    # ================================================================================================ tracking

    def _start_tracking(self, resumed: Committed | None) -> None:
        step = self.state.step if resumed else None
        self.tracker.start(
            run_id=self.state.mlflow_run_id if resumed else None,
            run_name=self.cfg.run.name,
            params=flatten(to_tree(self.cfg)),
            tags=run_tags(self.info, model=self.cfg.model.name, run_dir=self.run_dir.path, resumed_step=step),
            datasets={"training": self.cfg.data.train, "validation": self.cfg.data.val},
        )
        self.tracker.wait_started(self.cfg.tracking.start_wait_s)
        for name in ("config.yaml", "ds_config.json"):  # the resolved config and what DeepSpeed got
            self.tracker.log_artifact(self.run_dir.path / name)
        if resumed is None and self.init_report is not None:
            self._record_init_report()

    def _record_init_report(self) -> None:
        """Which keys of the initial weights were loaded, resized, re-initialised, missing or unexpected."""
        report = self.init_report
        path = self.run_dir.write_json("init_report.json", dataclasses.asdict(report))
        self.tracker.log_artifact(path)
        self.tracker.set_tags(
            {
                "init_path": report.source,
                **init_lineage_tags(report.source),  # the pre-training run and checkpoint it starts from
                **{
                    f"init_{k}": str(len(getattr(report, k)))
                    for k in ("loaded", "resized", "reinitialised", "missing", "unexpected")
                },
            }
        )

    def close(self, outcome: int | BaseException | None = None) -> None:
        """Release everything; `outcome` (fit's exit status, or what it raised) sets the MLflow run status."""
        self.preemption.close()
        self.checkpoints.close()  # retention's deletions
        self.tracker.close(run_status(outcome))
        self.train_loader.close()
        if self.eval_loader is not None:
            self.eval_loader.close()
        self.run_dir.close()
        dist.destroy()


# ==================================================================================================== helpers


def _check_inputs(cfg: TrainConfig) -> None:
    """Fail on every rank before anything is written when an input the config names is unusable: every
    manifest, shard and index file (each rank would otherwise find its own missing file at its own step)."""
    from data_pipeline.dataset import ShardedDataset

    if not cfg.data.train:
        raise ConfigError("data.train: no training shards configured")
    for key, value in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if not value:
            continue
        if not (Path(value) / "manifest.json").exists():
            raise ConfigError(f"{key}: {value} has no manifest.json (make shards with `coatnet-data build`)")
        try:
            ShardedDataset(value)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
