"""Who am I in the job (rank, world size, local rank, launcher), and every collective the project runs.

This is the one module that imports `torch.distributed` (tests/test_boundaries.py walks the AST of
pretrain/ and data_pipeline/ to keep it so). It reads the launcher's environment (the `deepspeed`
launcher, torchrun, `srun` without a launcher, or a plain single process), joins the process group, and
wraps the collectives the project needs so that they also work, as no-ops, in one process without a group.

Device correctness by construction: NCCL reduces only CUDA tensors, gloo only CPU ones, and gloo accepts
what NCCL refuses, so a CPU test proves nothing about a GPU cluster. Every tensor helper here therefore
moves its argument to the communication device of the backend (`comm_device()`), runs the collective
there, and hands the result back on the caller's device; `_require_comm_device` checks the tensor that
reaches `torch.distributed`, on CPU runs too. Host-device syncs: a helper that returns a Python value
(`.item()` by the caller, object collectives) waits for the GPU; tensor helpers do not by themselves.

Decisions that every rank must share (does the run folder exist, which checkpoint to resume, did a
conversion fail) are taken once, on rank 0, through `leader_decides`: the others receive the same answer
or the same error, so no rank waits in a collective for a rank that already failed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
import torch.distributed as _dist

T = TypeVar("T")

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now: the rendezvous of a launch on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_port(info: RankInfo) -> int:
    """A rendezvous port when no launcher chose one: any free port for a lone process (so that several
    runs share a machine), one derived from the job id under `srun` (every rank must compute the same)."""
    if info.world_size == 1:
        return free_port()
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
    """'cuda' or 'cpu': the single place the project picks its device kind.

    `DS_ACCELERATOR` (DeepSpeed's own switch) wins when set, so `DS_ACCELERATOR=cpu` runs on the CPU
    of a GPU machine; otherwise CUDA when a GPU is usable.
    """
    forced = os.environ.get("DS_ACCELERATOR", "")
    if forced in ("cpu", "cuda"):
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_for(info: RankInfo) -> torch.device:
    """This rank's device (selected as the current CUDA device). On CPUs, also its share of the cores."""
    if accelerator_name() == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun sets OMP_NUM_THREADS=1 for several ranks; the deepspeed launcher does not, and every
        # rank then runs one thread per core: 2 ranks x 2 threads on 2 cores made steps ~5x slower here.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    return torch.device("cpu")


def init_distributed(info: RankInfo, timeout_minutes: int) -> torch.device:
    """Select this rank's device, then join the process group (NCCL on GPUs, gloo on CPUs). Returns the device.

    The device comes first: NCCL binds a communicator to the current CUDA device when the group is
    created, and every rank left on cuda:0 would put all of a node's communicators on one GPU.
    """
    # DeepSpeed picks its accelerator at import; name it so a CPU machine never probes for CUDA plugins.
    os.environ.setdefault("DS_ACCELERATOR", accelerator_name())
    device = device_for(info)
    import deepspeed  # heavy import, only where it is needed

    _export_env(info)
    if info.local_rank == 0:
        remove_stale_shm()
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )
    _unlink_own_shm(info)
    return device


# DeepSpeed's CPU collectives (all ranks on one machine) map one 69 MB POSIX shared-memory segment per
# rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never unlink
# them: every run left 2 x 69 MB behind (3 GB after a day of tests), and /dev/shm counts as memory.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_STALE_S = 600.0


def _unlink_own_shm(info: RankInfo) -> None:
    """Once every rank has mapped every other rank's segment (init_distributed did that; the barrier
    makes sure all ranks are past it), the names can go: the mappings live until the processes exit, and
    nothing is left behind even when a rank is SIGKILLed."""
    barrier()
    name = (
        f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    )
    (SHM_DIR / f"{name}_{info.rank}").unlink(missing_ok=True)


def remove_stale_shm(now: float | None = None) -> list[Path]:
    """Remove this user's DeepSpeed segments older than SHM_STALE_S (left by runs that died during their
    first seconds, or by runs of versions before `_unlink_own_shm`). Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    for path in SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"):
        try:
            if now - path.stat().st_mtime > SHM_STALE_S:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def is_initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return _dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return _dist.get_rank() if is_initialized() else 0


def _grouped() -> bool:
    return is_initialized() and _dist.get_world_size() > 1


def comm_device(backend: str | None = None) -> torch.device:
    """Where tensors must be for the backend's collectives: the current CUDA device under NCCL, else CPU."""
    backend = backend or (_dist.get_backend() if is_initialized() else "gloo")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _require_comm_device(tensor: torch.Tensor, backend: str | None = None) -> None:
    """Internal invariant: the tensor handed to torch.distributed is on the backend's device."""
    wanted = comm_device(backend)
    if tensor.device.type != wanted.type:
        raise RuntimeError(
            f"collective on a {tensor.device.type} tensor, but the {backend or _dist.get_backend()} "
            f"backend needs {wanted.type} tensors (a pretrain.dist helper should have moved it)"
        )


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not _grouped():
        return tensor
    work = tensor.to(comm_device())  # no copy when it is there already
    _require_comm_device(work)
    _dist.all_reduce(work, op=op)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place on the caller's tensor (any device); identity without a process group."""
    return _reduce(tensor, _dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place on the caller's tensor (any device)."""
    return _reduce(tensor, _dist.ReduceOp.MAX)


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is True on at least one. A host-device sync point on GPUs."""
    if not _grouped():
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int32, device=device or comm_device())
    return bool(all_reduce_max(box).item())


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's equally sized tensor, concatenated in rank order (flat), on the caller's device."""
    if not _grouped():
        return tensor.reshape(-1)
    work = tensor.reshape(-1).to(comm_device())
    _require_comm_device(work)
    out = work.new_empty(work.numel() * _dist.get_world_size())
    _dist.all_gather_into_tensor(out, work)
    return out.to(tensor.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s Python object on every rank (small objects only: pickled, on the comm device)."""
    if not _grouped():
        return obj
    box = [obj]
    _dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's small Python object, in rank order."""
    if not _grouped():
        return [obj]
    out = [None] * _dist.get_world_size()
    _dist.all_gather_object(out, obj)  # uses the current CUDA device under NCCL by itself
    return out


def leader_decides(decide: Callable[[], T]) -> T:
    """Run `decide()` on rank 0 only and give its result to every rank (collective).

    When it raises, every rank raises the same exception (pickled between our own processes), so that
    all ranks fail at once with one message instead of rank 0 failing while the others wait for the
    collective timeout.
    """
    outcome: tuple[bool, object] = (True, None)
    if rank() == 0:
        try:
            outcome = (True, decide())
        except Exception as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def barrier() -> None:
    if _grouped():
        _dist.barrier()


def destroy() -> None:
    if is_initialized():
        _dist.destroy_process_group()


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """The `__main__` of a process that may have run collectives: run `main`, then leave without finalization.

    `destroy_process_group` does not join gloo's worker threads, and such a thread can still hold the last
    reference to a finished collective's tensors when the interpreter finalizes; dropping it needs the GIL,
    which a finalizing interpreter never hands out, so the thread exits inside a destructor and
    std::terminate aborts the process: SIGABRT after a run that had completed and committed everything
    (about 1 run in 7 of tests/test_transfer.py's script here; the core's stack reads
    ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit). The
    launcher then reports a failure and Slurm requeues a finished job. So the exit status is `main`'s:
    exceptions print their traceback (status 1), `SystemExit` keeps its code, exit handlers run and every
    stream is flushed, and only the interpreter's teardown, where the race lives, is skipped (`os._exit`).
    Never call this from code that a test imports and runs in-process.
    """
    try:
        status = main()
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
            code = 1
        status = code
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()  # mlflow, logging and tempfile cleanup registered here still run
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(int(status or 0))
