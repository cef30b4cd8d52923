"""Async checkpoint saves (pretrain.async_save + CheckpointManager): what is committed is the state at the
save, every byte durable before the manifest, and a background write that fails fails every rank.

The engine test runs as a script on 2 ranks (torchrun, gloo, DeepSpeed's CPU accelerator): a real ZeRO-3
engine saves with wait=False and trains on while its files are written; rank 1's writes are then made to
fail (RLIMIT_FSIZE: its background write gets EFBIG, as from a quota) and both ranks must raise SaveFailed.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pretrain.checkpoint as ckpt
from pretrain.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = {"depths": [1, 1, 1, 1, 1], "dims": [16, 16, 32, 64, 128], "head_dim": 16}


def test_a_file_written_from_a_host_buffer_has_the_digest_a_resume_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pretrain.async_save import HostBuffer, write_file

    monkeypatch.setattr(ckpt, "HASH_CHUNK", 1000)
    buf = HostBuffer(capacity=1)  # grows as torch.save writes into it
    state = {"w": torch.randn(3000), "step": 7, "nested": {"m": torch.arange(10)}}
    torch.save(state, buf)
    with buf.view() as data, ThreadPoolExecutor(2) as pool:
        assert bytes(data) == _torch_save_bytes(state)  # the same archive a file would get
        size, digest = write_file(tmp_path / "f.pt", data, 1000, pool)
    assert size == (tmp_path / "f.pt").stat().st_size == buf.size
    assert digest == ckpt.file_digest(tmp_path / "f.pt")
    loaded = torch.load(tmp_path / "f.pt", weights_only=True, mmap=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    with buf.view() as data, ThreadPoolExecutor(1) as pool:
        empty = write_file(tmp_path / "empty", data[:0], 1000, pool)
    assert empty == (0, ckpt.file_digest(tmp_path / "empty"))


def _torch_save_bytes(state: dict) -> bytes:
    from torch.utils.serialization import config

    out = io.BytesIO()
    with config.patch({"save.compute_crc32": True}):
        torch.save(state, out)
    return out.getvalue()


def engine_run(root: str) -> None:
    """2 ranks: save at step 1 without waiting, train a step, commit; the checkpoint holds step 1's state."""
    import deepspeed

    from pretrain import dist
    from pretrain.checkpoint import CheckpointManager, SaveFailed
    from pretrain.config import CheckpointConfig, EngineConfig, ModelConfig, OptimConfig
    from pretrain.ds_config import deepspeed_config
    from pretrain.engine import build_engine, build_model

    info = dist.detect()
    deepspeed.init_distributed(dist_backend="gloo")
    ds = deepspeed_config(EngineConfig(global_batch_size=None), OptimConfig(), micro_batch=2, world_size=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=32, **TINY), num_classes=10, ds_config=ds)
    engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), None, ds)
    x, y = torch.randn(2, 3, 32, 32).bfloat16(), torch.tensor([1, 2])

    def step() -> None:
        engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()

    def master() -> torch.Tensor:  # this rank's fp32 master partition, all groups
        return torch.cat([g.detach().clone() for g in engine.optimizer.fp32_partitioned_groups_flat])

    step()
    manager = CheckpointManager(CheckpointConfig(async_save=True), Path(root), info)
    at_save = master()
    assert manager.save(engine, 1, {"trainer": {"step": 1}}, meta={}, wait=False) is None
    assert manager.in_flight == 1 and manager.holds(1)
    step()  # the training thread goes on while the files are written
    assert not torch.equal(master(), at_save), "the step after the save changed the weights"
    saved = None
    while saved is None:  # the trainer polls once per step
        saved = manager.poll()
    assert saved.step == 1 and manager.in_flight is None and manager.verify(saved.path) == []
    assert saved.timings["blocked"] <= saved.seconds

    # What was committed is step 1's state, not the state when the background write ran.
    engine.load_checkpoint(str(saved.path.parent), tag=saved.path.name)
    assert torch.equal(master(), at_save), "the checkpoint holds the weights at its save"

    # Rank 1's background write fails (EFBIG, like a quota): every rank raises, nothing is committed.
    if info.rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    manager.save(engine, 2, {"trainer": {"step": 2}}, meta={}, wait=False)  # returns: the write comes later
    try:
        manager.finish()
    except SaveFailed as exc:
        print(f"RANK{info.rank}-SAVEFAILED {exc}", flush=True)
    else:
        raise AssertionError("the failed background write was committed")
    if info.rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    dist.barrier()
    assert not (Path(root) / ckpt.tag_for(2)).exists(), "the partial folder is removed"
    assert [c.step for c in manager.committed()] == [1]
    manager.close()
    print(f"RANK{info.rank}-ASYNC-OK", flush=True)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_async_save_commits_the_state_at_the_save_and_a_failed_background_write_fails_every_rank(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "COATNET_KEY_FILE": str(tmp_path / "key"),
    }
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        __file__,
        str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RANK0-ASYNC-OK" in out and "RANK1-ASYNC-OK" in out, out[-6000:]
    assert "RANK1-SAVEFAILED" in out and "failed on rank 1 (File too large)" in out, out[-4000:]
    assert "RANK0-SAVEFAILED" in out and "failed on another rank" in out, out[-4000:]


if __name__ == "__main__":
    from pretrain import dist

    dist.run_and_exit(lambda: engine_run(sys.argv[1]))
