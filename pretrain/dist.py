"""Who am I in the job: rank, world size, local rank, whatever started the process.

This is the one module that knows about ranks. It reads the launcher's environment
(the `deepspeed` launcher, torchrun, `srun` without a launcher, or a plain single process),
decides who prints and who tracks, and wraps the few collectives the trainer needs so that
they also work, as no-ops, in a single process without a process group.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Port used when a job started by `srun` alone does not name one (any free port agreed on by all ranks).
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "deepspeed", "torchrun", "srun" or "single"

    @property
    def is_main(self) -> bool:
        """Rank 0 prints to the console, talks to MLflow and writes run-level files."""
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def detect(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read rank/world size from the environment of whichever launcher started this process.

    Launchers set RANK/WORLD_SIZE/LOCAL_RANK themselves (deepspeed also sets CROSS_RANK and LOCAL_SIZE,
    torchrun sets TORCHELASTIC_RUN_ID and LOCAL_WORLD_SIZE). Under `srun` alone only SLURM_* are set;
    under `srun deepspeed ...` both are, and the launcher's RANK wins because it counts GPUs, not tasks.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        world = int(env["WORLD_SIZE"])
        return RankInfo(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world),
            launcher=launcher,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # A job step started directly by srun (not the batch shell itself, which has no SLURM_STEP_ID).
        return RankInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=int(env["SLURM_NTASKS_PER_NODE"])
            if env.get("SLURM_NTASKS_PER_NODE", "").isdigit()
            else max(
                1, int(env["SLURM_NTASKS"]) // _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
            ),
            launcher="srun",
        )
    return RankInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


def _export_env(info: RankInfo) -> None:
    """torch.distributed's env:// rendezvous needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        os.environ["MASTER_ADDR"] = _first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_default_port(info))


def _default_port(info: RankInfo) -> int:
    """A rendezvous port when no launcher chose one: any free port for a lone process (so that several
    runs share a machine), one derived from the job id under `srun` (every rank must compute the same)."""
    if info.world_size == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    job = os.environ.get("SLURM_JOB_ID", "")
    return DEFAULT_MASTER_PORT + int(job) % 10000 if job.isdigit() else DEFAULT_MASTER_PORT


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'n[1-3],m7' -> 'n1' (what `scontrol show hostnames | head -1` gives)."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, _, rest = head.partition("[")
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def accelerator_name() -> str:
    """'cuda' when a GPU is usable, else 'cpu': the single place the trainer picks its device kind."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_for(info: RankInfo) -> torch.device:
    """This rank's device. On CPUs, also its share of the cores (see below)."""
    if accelerator_name() == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun sets OMP_NUM_THREADS=1 for several ranks; the deepspeed launcher does not, and every
        # rank then runs one thread per core: 2 ranks x 2 threads on 2 cores made steps ~5x slower here.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    return torch.device("cpu")


def init_distributed(info: RankInfo, timeout_minutes: int) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs); also fine for a single process."""
    # DeepSpeed picks its accelerator at import; name it so a CPU machine never probes for CUDA plugins.
    os.environ.setdefault("DS_ACCELERATOR", accelerator_name())
    import deepspeed  # heavy import, only where it is needed

    _export_env(info)
    deepspeed.init_distributed(
        dist_backend="nccl" if accelerator_name() == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; identity without a process group. A host-device sync point on GPUs."""
    if is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (small objects only: pickled)."""
    if not (is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not (is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's equally sized tensor, concatenated in rank order (flat)."""
    if not (is_initialized() and torch.distributed.get_world_size() > 1):
        return tensor.reshape(-1)
    out = tensor.new_empty(tensor.numel() * torch.distributed.get_world_size())
    torch.distributed.all_gather_into_tensor(out, tensor.reshape(-1))
    return out


def barrier() -> None:
    if is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()
