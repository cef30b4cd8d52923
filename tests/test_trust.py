"""The trust boundary: a checkpoint folder someone else planted never runs code in this user's processes.

Each case plants a folder whose `.pt` files are pickle payloads (unpickling them creates a marker file)
under a manifest whose digests were recomputed, as an attacker with write access to the folder would,
and drives the real command: `coatnet-export`, `coatnet-train init.path=...` and a run that resumes.
The payload must never run. One case opts in (`--trust-unsigned`) to show the payload is real.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import HASH_KEY, MANIFEST, file_digest, tag_for
from pretrain.config import load_config, resume_invariants
from pretrain.signing import KEY_ENV, check, sign
from tests.helpers.launch import BIN, REPO, SMOKE, data_overrides, run_training, tail

FILES = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")


class Payload:
    """Unpickling this opens (creates) the marker file: code from the folder ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(folder: Path, marker: Path, invariants: dict, *, signed_with: Path | None = None) -> Path:
    """A step folder of payloads with a manifest that passes every size and digest check."""
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    manifest = {
        "step": 10,
        "world_size": 1,
        "files": {
            n: {"bytes": (folder / n).stat().st_size, HASH_KEY: file_digest(folder / n)} for n in FILES
        },
        "meta": {"resume_invariants": invariants},
    }
    if signed_with is not None:  # somebody else's key
        old = os.environ.get(KEY_ENV)
        os.environ[KEY_ENV] = str(signed_with)
        try:
            manifest = sign(manifest)
        finally:
            os.environ.pop(KEY_ENV) if old is None else os.environ.__setitem__(KEY_ENV, old)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_signatures_tell_this_users_manifests_from_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "mine" / "key"))
    manifest = sign({"step": 1, "files": {}})
    key = tmp_path / "mine" / "key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    assert check(manifest, "x", trust_unsigned=False, opt_in="--opt")
    with pytest.raises(ValueError, match="x: its manifest is signed with another key"):
        check({**manifest, "step": 2}, "x", trust_unsigned=False, opt_in="--opt")  # edited after signing
    with pytest.raises(ValueError, match=r"is not signed.*pass --opt"):
        check({"step": 1, "files": {}}, "x", trust_unsigned=False, opt_in="--opt")
    assert check({"step": 1}, "x", trust_unsigned=True, opt_in="--opt") is False
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        check(manifest, "x", trust_unsigned=False, opt_in="--opt")


def test_export_of_a_planted_folder_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = plant(tmp_path / "ckpt" / tag_for(10), marker, {})
    export = [str(BIN / "coatnet-export"), str(folder), str(tmp_path / "out.safetensors")]
    proc = subprocess.run(export, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "is not signed" in proc.stderr and proc.stderr.count("\n") == 1, tail(
        proc
    )
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    # The same folder with the opt-in: the payload is real (it runs when a user vouches for it).
    subprocess.run([*export, "--trust-unsigned"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert marker.exists()


def test_init_path_takes_exports_only(tmp_path: Path, digits_shards: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = plant(tmp_path / "ckpt" / tag_for(10), marker, {})
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", str(SMOKE), f"init.path={folder}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "coatnet-export" in proc.stderr and "init.path" in proc.stderr, tail(proc)
    assert not marker.exists()


@pytest.mark.parametrize("who", ["unsigned", "another key"])
def test_a_run_never_resumes_from_a_planted_checkpoint(tmp_path: Path, digits_shards: Path, who: str) -> None:
    overrides = [*data_overrides(digits_shards), "tracking.enabled=false", "schedule.steps=20"]
    invariants = resume_invariants(load_config(SMOKE, overrides))
    marker, run_dir = tmp_path / "PWNED", tmp_path / "runs" / "victim"
    other_key = tmp_path / "attacker" / "key" if who == "another key" else None
    plant(run_dir / "checkpoints" / tag_for(10), marker, invariants, signed_with=other_key)
    proc = run_training(SMOKE, run_dir, *overrides, timeout=300)
    assert proc.returncode == 2, tail(proc)
    assert "checkpoint.trust_unsigned=true" in proc.stderr and "Traceback" not in proc.stderr, tail(proc)
    assert not marker.exists()
    assert not (run_dir / "config.yaml").exists()  # refused before anything was written
