"""A stand-in for the trainer that checks a cluster's launch path in seconds, without GPUs or data.

It speaks the trainer's protocol, so it runs under the real sbatch scripts::

    TRAIN_MODULE=cluster.smoke_job sbatch cluster/pretrain.sbatch smoke.yaml steps=200

with ``smoke.yaml`` holding the keys of SmokeConfig (``out`` at least). Each rank joins the process group
(gloo on CPU, NCCL on GPU) through the launcher's environment, checks an all_reduce across all ranks and
records its hostname, then "trains": every step sleeps ``step_s`` and all_reduces. It saves its step
every ``save_every`` steps (a one-line "checkpoint"), resumes from it after a requeue, and stops through
PreemptionHandler exactly as the trainer must: agree on a step, save, exit with EXIT_REQUEUE.

Rank 0 writes ``out/result.json`` at the end and ``out/stop-<restart>.json`` (each rank's stop step) on a
stop, and records ``checkpoint``/``stop``/``resumed`` events in the job's event log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pretrain.preemption import EXIT_REQUEUE, EventLog, JobContext, PreemptionHandler


@dataclass(frozen=True)
class SmokeConfig:
    """Settings of the smoke job (YAML file + key=value overrides)."""

    out: Path
    steps: int = 50
    step_s: float = 0.1
    check_every: int = 5
    save_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "check_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"smoke config: {name} must be >= 1, got {getattr(self, name)}")
        if self.step_s < 0:
            raise ValueError(f"smoke config: step_s must be >= 0, got {self.step_s}")


def load_config(path: Path, overrides: list[str]) -> SmokeConfig:
    """Read the YAML file, apply ``key=value`` overrides, reject unknown keys naming them."""
    if not path.is_file():
        raise FileNotFoundError(f"smoke config {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of SmokeConfig keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        raw[key] = yaml.safe_load(value)
    types = {f.name: f.type for f in fields(SmokeConfig)}
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise ValueError(f"{path}: unknown smoke config key(s) {unknown}; known: {sorted(types)}")
    if "out" not in raw:
        raise ValueError(f"{path}: key 'out' (the output directory) is required")
    converters = {"out": Path, "steps": int, "step_s": float, "check_every": int, "save_every": int}
    return SmokeConfig(**{k: converters[k](v) for k, v in raw.items()})


def main(argv: list[str] | None = None) -> int:
    """Run the smoke job; returns 0 when done, EXIT_REQUEUE after a stop request."""
    parser = argparse.ArgumentParser(prog="python -m cluster.smoke_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    job = JobContext.from_env()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    events = EventLog(job.events_file if rank == 0 and job.events_file else Path(os.devnull))
    cfg.out.mkdir(parents=True, exist_ok=True)
    try:
        with PreemptionHandler(stop_file=job.stop_file, check_every=cfg.check_every) as stop:
            return _run(cfg, job, stop, events, device, rank, world)
    finally:
        dist.destroy_process_group()


def _run(
    cfg: SmokeConfig,
    job: JobContext,
    stop: PreemptionHandler,
    events: EventLog,
    device: torch.device,
    rank: int,
    world: int,
) -> int:
    # every rank contributes rank+1: the sum proves all of them take part
    total = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(total)
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    state = cfg.out / "state.json"
    start = json.loads(state.read_text())["step"] if state.exists() else 0
    for step in range(start + 1, cfg.steps + 1):
        time.sleep(cfg.step_s)
        dist.all_reduce(torch.ones(1, device=device))  # stands in for the gradient all_reduce
        if step == start + 1 and start > 0:
            events.record("resumed", step=step)
        if step % cfg.save_every == 0:
            _save(state, step, rank, events)
        if stop.should_stop(step):
            if step % cfg.save_every != 0:
                _save(state, step, rank, events)
            steps: list[int | None] = [None] * world
            dist.all_gather_object(steps, step)
            if rank == 0:
                _write_json(
                    cfg.out / f"stop-{job.restart_count}.json", {"steps": steps, "reason": stop.reason}
                )
            events.record("stop", step=step)
            return EXIT_REQUEUE
    if rank == 0:
        result = {"world_size": world, "hosts": hosts, "allreduce": total.item(), "final_step": cfg.steps}
        _write_json(cfg.out / "result.json", {**result, "resumed_from": start, "restarts": job.restart_count})
    return 0


def _save(state: Path, step: int, rank: int, events: EventLog) -> None:
    # A checkpoint counts only once every rank has finished writing its part (here: nothing to write).
    dist.barrier()
    if rank == 0:
        _write_json(state, {"step": step})
        events.record("checkpoint", step=step)
    dist.barrier()


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # readers never see half a file


if __name__ == "__main__":
    sys.exit(main())
