"""The composition root and the training loop.

`Trainer.build(cfg)` wires the components together, each from its own config section, in the order
they must exist (ranks, run folder, logging, process group, data, model under zero.Init, optimizer,
engine, tracking, checkpoints). `Trainer.fit()` is the loop: resume, then steps, metrics, evaluation,
checkpoints and preemption checks, in that order, until the last step or a stop request.

All resumable state goes through one path: model/optimizer/scheduler via DeepSpeed's checkpoint, and
everything else (counters, data cursor, RNG, MLflow run id, canary) through `_client_state()`, restored
by `_restore()` in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader import build_eval_loader, build_train_loader
from pretrain import dist
from pretrain.checkpoint import (
    CheckpointManager,
    Committed,
    average_batchnorm_stats,
    batchnorm_state,
    canary_loss,
    load_batchnorm_state,
    read_manifest,
)
from pretrain.config import RESUME_INVARIANT_KEYS, TrainConfig, resume_hash
from pretrain.configlib import dump_yaml, flatten, to_tree
from pretrain.ds_config import deepspeed_config, grad_accum_steps
from pretrain.ema import ShardedEma
from pretrain.engine import build_engine, build_model, full_parameter_count, untraced_forward
from pretrain.evaluate import evaluate
from pretrain.logs import setup_logging
from pretrain.losses import build_loss
from pretrain.metrics import MetricsFile, NullMetricsFile, StepMeter, format_eta
from pretrain.model import count_macs, create_model
from pretrain.optim import build_optimizer, build_scheduler, total_and_warmup_steps
from pretrain.preemption import EXIT_REQUEUE, EventLog, JobContext, PreemptionHandler, downtimes
from pretrain.tracking import build_tracker
from pretrain.transfer import LoadReport, load_initial_weights

log = logging.getLogger(__name__)

EXIT_OK = 0


@dataclass
class TrainState:
    """Counters that are saved with every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    mlflow_run_id: str | None = None
    preemptions: int = 0


class Trainer:
    def __init__(
        self,
        *,
        cfg: TrainConfig,
        info: dist.RankInfo,
        run_dir: Path,
        device: torch.device,
        engine,
        train_loader,
        eval_loader,
        loss_fn,
        tracker,
        checkpoints: CheckpointManager,
        preemption: PreemptionHandler,
        total_steps: int,
        accum: int,
        flops_per_image: float,
        metrics_file: MetricsFile | NullMetricsFile,
        events: EventLog,
        ema: ShardedEma | None = None,
        init_report: LoadReport | None = None,
    ):
        self.ema, self.init_report = ema, init_report
        self.cfg, self.info, self.run_dir, self.device = cfg, info, run_dir, device
        self.engine, self.train_loader, self.eval_loader = engine, train_loader, eval_loader
        self.loss_fn, self.tracker, self.checkpoints, self.preemption = (
            loss_fn,
            tracker,
            checkpoints,
            preemption,
        )
        self.total_steps, self.accum, self.metrics_file, self.events = (
            total_steps,
            accum,
            metrics_file,
            events,
        )
        self.state = TrainState()
        self.global_batch = cfg.data.batch_size * accum * info.world_size
        self.meter = StepMeter(self.global_batch, info.world_size, flops_per_image, cfg.engine.peak_tflops)
        self._canary: dict | None = None
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._loss_count = 0
        self._started = time.time()

    # ================================================================================================ build

    @classmethod
    def build(cls, cfg: TrainConfig) -> Trainer:
        info = dist.detect()
        _check_inputs(cfg)
        run_dir = _prepare_run_dir(cfg, info)
        setup_logging(info, run_dir / "logs", console_all_ranks=cfg.run.console_all_ranks)
        dist.init_distributed(info, cfg.engine.timeout_minutes)
        device = dist.device_for(info)
        _seed_everything(cfg.run.seed)
        log.info("run folder %s; %d rank(s) via %s on %s", run_dir, info.world_size, info.launcher, device)

        train_loader = build_train_loader(
            cfg.data,
            image_size=cfg.model.image_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.run.seed,
            device=device,
        )
        eval_loader = None
        if cfg.data.val:
            eval_loader = build_eval_loader(
                cfg.data,
                image_size=cfg.model.image_size,
                rank=info.rank,
                world_size=info.world_size,
                device=device,
            )
        num_classes = cfg.model.num_classes or train_loader.num_classes

        accum = grad_accum_steps(cfg.engine.global_batch_size, cfg.data.batch_size, info.world_size)
        ds_config = deepspeed_config(
            cfg.engine, cfg.optim, micro_batch=cfg.data.batch_size, world_size=info.world_size
        )
        model = build_model(cfg.model, num_classes=num_classes, ds_config=ds_config)
        # Fine-tuning: before the engine exists, so that the fp32 master weights start from these values.
        init_report = load_initial_weights(model, cfg.init) if cfg.init.path else None
        optimizer = build_optimizer(model, cfg.optim)
        steps_per_epoch = train_loader.steps_per_epoch / accum
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.schedule, steps_per_epoch)
        engine = build_engine(model, optimizer, scheduler, ds_config)
        ema = ShardedEma(engine.module, cfg.ema.decay, cfg.ema.every) if cfg.ema.decay > 0 else None
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

        job = JobContext.from_env()  # stop file and event log of cluster/launch.sh, when under Slurm
        return cls(
            cfg=cfg,
            info=info,
            run_dir=run_dir,
            device=device,
            engine=engine,
            train_loader=train_loader,
            eval_loader=eval_loader,
            loss_fn=build_loss(cfg.loss, num_classes),
            tracker=build_tracker(cfg.tracking, info, run_dir),
            checkpoints=CheckpointManager(cfg.checkpoint, _checkpoint_root(cfg, run_dir), info),
            preemption=PreemptionHandler(stop_file=job.stop_file, device=device),
            total_steps=total_steps,
            accum=accum,
            flops_per_image=_flops_per_image(cfg, num_classes),
            metrics_file=MetricsFile(run_dir / "metrics.jsonl") if info.is_main else NullMetricsFile(),
            events=EventLog(job.events_file if info.is_main else None),
            ema=ema,
            init_report=init_report,
        )

    # ================================================================================================ loop

    def fit(self) -> int:
        """Train to the last step. Returns 0, or EXIT_REQUEUE after saving when asked to stop."""
        resumed = self._resume()
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
            if self.cfg.checkpoint.every_steps and step % self.cfg.checkpoint.every_steps == 0:
                self._save(step)
            if self.preemption.should_stop(step):
                self.state.preemptions += 1
                self._save(step)
                self.events.record("stop", step=step)
                log.info(
                    "stop requested: checkpoint at step %d saved; exiting with status %d for requeue",
                    step,
                    EXIT_REQUEUE,
                )
                self.tracker.log_metrics({"preemptions": self.state.preemptions}, step)
                return EXIT_REQUEUE
        final = self._evaluate(self.state.step)
        self._save(self.state.step)
        if self.ema is not None:
            self._export_ema()
        log.info(
            "done: %d steps in %s%s",
            self.state.step,
            format_eta(time.time() - self._started),
            "".join(f", {k} {v:.4f}" for k, v in final.items() if k != "samples"),
        )
        return EXIT_OK

    def _train_step(self, batches) -> None:
        """One optimizer step: `accum` micro-batches through forward and backward, then the update."""
        for _ in range(self.accum):
            t0 = time.perf_counter()
            images, targets = next(batches)
            self.meter.data_wait(time.perf_counter() - t0)
            loss = self.loss_fn(self.engine(images), targets)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the update only at the accumulation boundary
            self._loss_sum += loss.detach().to(torch.float64)
            self._loss_count += 1
            if self._canary is None:  # a fixed batch whose loss is checked after every resume
                self._canary = {"images": images[:4].detach().cpu(), "targets": targets[:4].detach().cpu()}
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        if self.ema is not None:
            self.ema.update(self.state.step)
        self.meter.step_done()

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
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(metrics, step)
        self.metrics_file.write(step, metrics)
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
        self.events.record("resumed", step=step)
        lost = downtimes(self.events.read())
        if lost:
            log.info("resumed after a %s; %.0f s of training time lost", lost[-1].cause, lost[-1].seconds)
            self.tracker.log_metrics({"preemption/lost_s": lost[-1].seconds}, step)

    def _epoch(self) -> float:
        return self.state.samples_seen / max(1, self.train_loader.samples_per_epoch)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics of the weights, and of their EMA when there is one (keys prefixed `ema_`)."""
        if self.eval_loader is None:
            return {}
        results = self._evaluate_weights()
        if self.ema is not None and self.ema.shadow is not None:
            with self.ema.swapped_in():
                results.update({f"ema_{k}": v for k, v in self._evaluate_weights().items() if k != "samples"})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in results.items() if k != "samples"}, step)
        self.metrics_file.write(step, {f"eval/{k}": v for k, v in results.items()})
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

    def _evaluate_weights(self) -> dict[str, float]:
        self.engine.eval()
        try:
            return evaluate(
                self.engine, self.eval_loader, label_kind=self.train_loader.label_kind, device=self.device
            )
        finally:
            self.engine.train()

    def _export_ema(self) -> None:
        """The final EMA weights as run_dir/ema.safetensors (+ .json), loadable by `init.path` (collective)."""
        from safetensors.torch import save_file

        tensors = self.ema.full_state_dict()
        module = self.engine.module
        for name, buf in module.state_dict(
            keep_vars=True
        ).items():  # BatchNorm statistics: same on every rank
            if name not in tensors and not isinstance(buf, torch.nn.Parameter):
                tensors[name] = buf.detach().cpu().clone()
        if self.info.is_main:
            out = self.run_dir / "ema.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
            out.with_suffix(".json").write_text(
                json.dumps(
                    {
                        "model": {"name": self.cfg.model.name, "config": dataclasses.asdict(module.config)},
                        "step": self.state.step,
                        "image_size": self.cfg.model.image_size,
                        "ema_decay": self.ema.decay,
                        "num_classes": module.num_classes,
                        "class_names": self.train_loader.class_names,
                    },
                    indent=1,
                )
            )
            log.info("EMA weights written to %s", out)

    # ================================================================================================ state

    def _client_state(self) -> dict:
        """Everything DeepSpeed does not save, in two parts; collective (the canary loss is a ZeRO-3 forward).

        `shared` is identical on every rank (counters, canary, BatchNorm statistics), so any rank can
        resume from rank 0's copy: after a world-size change DeepSpeed's universal load hands every rank
        rank 0's client state. `rank` is this rank's own (data loader, RNG), restored as is at the same
        world size; at another one only the loader's global cursor is taken from it (see `_restore`).
        """
        if self._canary is not None:  # rank 0's batch on every rank: one canary that any world size can check
            self._canary = dist.broadcast_object(self._canary)
        return {
            "trainer": {
                "shared": {
                    "state": self.state.__dict__.copy(),
                    "world_size": self.info.world_size,
                    "canary": {**self._canary, "loss": self._canary_loss(self._canary)}
                    if self._canary
                    else None,
                    "batchnorm": batchnorm_state(self.engine.module),
                },
                "rank": {
                    "rank": self.info.rank,
                    "loader": self.train_loader.state_dict(),
                    "rng": _rng_state(),
                    "ema": self.ema.state_dict() if self.ema is not None else None,
                },
            }
        }

    def _save(self, step: int) -> None:
        """Commit a checkpoint of `step` (collective); the manifest carries what resume and export check."""
        if self.checkpoints.is_committed(step):
            return  # e.g. a stop request or the end right after a periodic save
        self.state.mlflow_run_id = self.tracker.run_id or self.state.mlflow_run_id
        t0 = time.perf_counter()
        module = self.engine.module
        average_batchnorm_stats(module)  # DeepSpeed's consolidation (export) keeps rank 0's buffers only
        meta = {
            "resume_hash": resume_hash(self.cfg),
            "model_section": to_tree(self.cfg.model),
            "model": {"name": self.cfg.model.name, "config": dataclasses.asdict(module.config)},
            "image_size": self.cfg.model.image_size,
            "num_classes": module.num_classes,
            "label_kind": self.train_loader.label_kind,
            "class_names": self.train_loader.class_names,
            "samples_seen": self.state.samples_seen,
        }
        path = self.checkpoints.save(self.engine, step, self._client_state(), meta)
        self.events.record("checkpoint", step=step)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.checkpoints.last_timings.items())
        log.info(
            "checkpoint %s committed in %.1f s (%s)", path, time.perf_counter() - t0, phases or "already"
        )
        self.tracker.log_metrics({"checkpoint_s": time.perf_counter() - t0}, step)

    def _resume(self) -> Committed | None:
        """Load what `checkpoint.resume` selects (None: a fresh start).

        A checkpoint saved at another world size is converted to DeepSpeed's universal checkpoint first.
        """
        ckpt = self.checkpoints.find_resume()
        ckpt = dist.broadcast_object(ckpt)  # every rank loads the same one, even on a racy filesystem
        if ckpt is None:
            return None
        meta = read_manifest(ckpt.path)["meta"]
        if meta.get("resume_hash") != resume_hash(self.cfg):
            raise ValueError(
                f"checkpoint {ckpt.path} was saved with another model/seed/batch config than this run's "
                f"(keys {', '.join(RESUME_INVARIANT_KEYS)}); saved model section: {meta.get('model_section')}, "
                f"this run's: {to_tree(self.cfg.model)}"
            )
        self.checkpoints.verify(ckpt)
        saved_world = self.checkpoints.saved_world_size(ckpt)
        if saved_world == self.info.world_size:
            _, client = self.engine.load_checkpoint(
                str(ckpt.path.parent), tag=ckpt.path.name, load_module_strict=True
            )
        else:
            universal = self.checkpoints.universal(ckpt)
            # The engine exists before the checkpoint is chosen; DeepSpeed reads this switch only while
            # loading (engine.load_universal_checkpoint()), so it is turned on for this one load.
            self.engine._config.load_universal_checkpoint = True
            try:
                _, client = self.engine.load_checkpoint(
                    str(universal.parent), tag=universal.name, load_module_strict=True
                )
            finally:
                self.engine._config.load_universal_checkpoint = False
            log.info(
                "checkpoint of %d rank(s) loaded into %d through %s",
                saved_world,
                self.info.world_size,
                universal,
            )
        if client is None:
            raise ValueError(f"DeepSpeed found no model states in {ckpt.path}")
        self._restore(client["trainer"], ckpt, same_world=saved_world == self.info.world_size)
        return ckpt

    def _restore(self, saved: dict, ckpt: Committed, same_world: bool) -> None:
        """Counters, data position, RNG, BatchNorm statistics, then the canary check, as `_client_state` saved them.

        Another world size: the loader continues from the saved global cursor (the rest of the epoch, every
        remaining sample once across the new ranks; augmentation randomness restarts from a seed of
        (seed, epoch, cursor, rank)), and the RNG restarts from a seed of (run seed, step, rank).
        """
        shared, own = saved["shared"], saved["rank"]
        self.state = TrainState(**shared["state"])
        self.train_loader.load_state_dict(own["loader"])
        if same_world:
            _set_rng_state(own["rng"])
        else:
            key = f"{self.cfg.run.seed}/{self.state.step}/{self.info.rank}".encode()
            _seed_everything(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
        if self.ema is not None and own.get("ema") is not None:
            self.ema.load_state_dict(own["ema"])  # a shard of this rank's; at another world size: restarts
        load_batchnorm_state(self.engine.module, shared["batchnorm"])  # not in a universal checkpoint
        self._canary = shared["canary"]
        if self._canary is not None:
            loss = self._canary_loss(self._canary)
            # Every rank checks the same batch; all fail together so that none waits in a collective.
            worst = dist.all_reduce_max(torch.tensor([abs(loss - self._canary["loss"])], dtype=torch.float64))
            if worst.item() > self.cfg.checkpoint.canary_tolerance:
                raise ValueError(
                    f"resume canary failed for {ckpt.path}: a fixed batch's loss moved by "
                    f"{worst.item():.3g} between save and load ({self._canary['loss']:.6f} -> {loss:.6f}, "
                    f"checkpoint.canary_tolerance={self.cfg.checkpoint.canary_tolerance}); "
                    "the checkpoint does not reproduce the saved model"
                )
        log.info("resumed from %s at step %d (epoch %.2f)", ckpt.path, self.state.step, self._epoch())

    def _canary_loss(self, canary: dict) -> float:
        """Canary loss in eval mode (deterministic, touches no RNG and no BN statistics); collective.

        A fixed criterion (`canary_loss`), not the configured loss: a resumed run may change e.g. label
        smoothing, and the canary is about the model reproducing, not about the objective.
        """
        self.engine.eval()
        try:
            # After a resume this is the process's first forward: ZeRO-3 must not take it as its trace.
            with torch.no_grad(), untraced_forward(self.engine):
                logits = self.engine(canary["images"].to(self.device))
                loss = canary_loss(logits, canary["targets"].to(self.device), self.train_loader.label_kind)
        finally:
            self.engine.train()
        return loss.item()

    # ================================================================================================ tracking

    def _start_tracking(self, resumed: Committed | None) -> None:
        tags = {
            "world_size": str(self.info.world_size),
            "nodes": str(self.info.num_nodes),
            "launcher": self.info.launcher,
            "host": socket.gethostname(),
            "git_commit": _git_commit(),
            "model": self.cfg.model.name,
            "run_dir": str(self.run_dir),
        }
        if "SLURM_JOB_ID" in os.environ:
            tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        if resumed is not None:
            tags["resumed_from_step"] = str(self.state.step)
        self.tracker.start(
            run_id=self.state.mlflow_run_id if resumed else None,
            run_name=self.cfg.run.name,
            params=flatten(to_tree(self.cfg)),
            tags=tags,
        )
        self.tracker.wait_started(self.cfg.tracking.timeout_s)
        if resumed is None:
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            if self.init_report is not None:
                self._record_init_report()

    def _record_init_report(self) -> None:
        """Which keys of the initial weights were loaded, resized, re-initialised, missing or unexpected."""
        report = self.init_report
        if self.info.is_main:
            (self.run_dir / "init_report.json").write_text(report.to_json())
        self.tracker.log_artifact(self.run_dir / "init_report.json")
        self.tracker.set_tags(
            {
                "init_path": report.source,
                **{
                    f"init_{k}": str(len(getattr(report, k)))
                    for k in ("loaded", "resized", "reinitialised", "missing", "unexpected")
                },
            }
        )

    def close(self) -> None:
        self.preemption.close()
        self.tracker.close()
        self.train_loader.close()
        if self.eval_loader is not None:
            self.eval_loader.close()
        dist.destroy()


# ==================================================================================================== helpers


def _check_inputs(cfg: TrainConfig) -> None:
    """Fail before anything is written when an input the config names is missing."""
    for key, value in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if value and not (Path(value) / "manifest.json").exists():
            raise FileNotFoundError(
                f"{key}: {value} has no manifest.json (make shards with `coatnet-data build`)"
            )
    if not cfg.data.train:
        raise FileNotFoundError("data.train: no training shards configured")


def _prepare_run_dir(cfg: TrainConfig, info: dist.RankInfo) -> Path:
    """The run folder. A run is never overwritten: an existing folder is resumed (same resume hash) or refused."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # Checked on every rank (same answer on a shared filesystem) so that no rank waits for one that failed.
    if run_dir.exists() and cfg.checkpoint.resume == "never" and any(run_dir.iterdir()):
        raise FileNotFoundError(
            f"run.name: {run_dir} already holds a run and checkpoint.resume=never; "
            "choose another run.name or output_dir"
        )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = dump_yaml(cfg)
        saved = run_dir / "config.yaml"
        if saved.exists() and saved.read_text() != text:
            saved.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")  # keep the earlier one
        saved.write_text(text)
    return run_dir


def _checkpoint_root(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def _flops_per_image(cfg: TrainConfig, num_classes: int) -> float:
    """Training FLOPs per image: 3 (forward + 2 x backward) x 2 FLOPs per multiply-accumulate."""
    with torch.device("meta"):
        meta = create_model(
            cfg.model.name, num_classes=num_classes, image_size=cfg.model.image_size, **cfg.model.overrides()
        )
    return 6.0 * count_macs(meta, cfg.model.image_size).macs


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
