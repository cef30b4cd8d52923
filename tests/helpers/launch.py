"""Start `pretrain.train` the way users do (deepspeed launcher, torchrun, a plain process) and read its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pretrain.dist import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "configs"
SMOKE = CONFIGS / "smoke.yaml"


def tail(proc: subprocess.CompletedProcess) -> str:
    """The end of a finished process's output, for assertion messages."""
    return (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]


def launcher_prefix(launcher: str, nproc: int, port: int) -> list[str]:
    """The command line before `pretrain.train` for "deepspeed", "torchrun" or "single" (one plain process)."""
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), "--module"]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            "-m",
        ]
    assert launcher == "single" and nproc == 1, (launcher, nproc)
    return [sys.executable, "-m"]


def run_training(
    config: Path,
    run_dir: Path,
    *overrides: str,
    launcher: str | None = None,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Train with `config` + overrides into `run_dir`; torchrun for several ranks unless a launcher is named."""
    launcher = launcher or ("torchrun" if nproc > 1 else "single")
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(port), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        "pretrain.train",
        "--config",
        str(config),
        f"run.output_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        *overrides,
    ]
    return subprocess.run(
        [*launcher_prefix(launcher, nproc, port), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def data_overrides(shards: Path) -> list[str]:
    return [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from rank 0's metrics.jsonl (the last line of a step, when a killed run logged it too)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            out[entry["step"]] = entry["loss"]
    return out


def rank0_log(run_dir: Path) -> str:
    return (run_dir / "logs" / "rank0.log").read_text()


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of rank 0's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m], [m for m in lines if "eval/top1" in m]


def run_script(
    script: Path | str, *args: str, nproc: int = 2, timeout: int = 900
) -> subprocess.CompletedProcess:
    """A test's own probe script on `nproc` ranks through torchrun (gloo on CPU), from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [*launcher_prefix("torchrun", nproc, free_port())[:-1], str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
