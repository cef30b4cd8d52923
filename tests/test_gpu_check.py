"""benchmarks/gpu_check.py runs its CPU twin end to end and writes one JSON whose figures hang together.

The GPU sizes cannot run here; what is pinned is that every section runs (or says why it did not), on
this machine with DeepSpeed and DALI, and on one that has nothing but torch (the device machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
KERNELS = {"math", "flash_cpu", "flash", "mem_efficient", "cudnn", "overrideable"}


def run_check(out: Path, *extra: str, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert f"gpu_check: {out / 'gpu_check.json'}" in proc.stdout
    assert sum(line.startswith("train coatnet_") for line in proc.stdout.splitlines()) == 4, (
        "one line per case"
    )
    return report


def check_common(report: dict) -> None:
    assert report["device"] == "cpu" and report["twin"] is True
    assert 0 < report["elapsed_s"] < report["budget_s"]
    env = report["env"]
    assert env["torch"] and env["matmul_bf16_tflops"] > 0 and len(env["load_average"]) == 3
    att = report["attention"]
    assert att["kernel_bf16"] in KERNELS and any(
        "scaled_dot_product" in n for n in att["profiler_attention_ops"]
    )
    assert att["bias_grad_matches"] is True
    assert (
        0 < att["bias_grad_rel_error_bf16_vs_fp32_math"] < 2e-2
        and att["bias_grad_rel_error_fp32_vs_fp32_math"] < 1e-4
    )
    train = report["train"]
    assert {(c["model"], c["grad_checkpointing"]) for c in train} == {
        (m, ck) for m in ("coatnet_0", "coatnet_5") for ck in (False, True)
    }
    for case in train:
        assert "error" not in case, case
        assert case["images_per_s"] > 0 and case["step_time_s"] > 0 and case["tflops"] > 0
        assert case["mfu"] is None, "no MFU on a CPU: its peak is unknown"
        assert case["loss_finite"] and case["memory_gb"] > 0 and case["memory_rss_gb"] > 0
        assert case["input"].startswith("synthetic")
    ckpt = report["checkpoint"]
    assert ckpt["bitwise"] is True and ckpt["continued_losses"] == ckpt["resumed_losses"]
    assert ckpt["size_gib"] > 0 and ckpt["save_s"] > 0 and ckpt["load_s"] > 0
    for mode in ("on", "off"):
        det = report["determinism"][mode]
        assert det["deterministic"] is (mode == "on")
        assert det["losses_bitwise"] and det["weights_bitwise"], "CPU kernels repeat either way"


def test_cpu_twin_with_deepspeed_and_dali(tmp_path):
    report = run_check(tmp_path)
    check_common(report)
    assert report["errors"] == [], report["errors"]
    assert report["isolated_sections"] is False
    for case in report["train"]:
        assert case["engine"].startswith("deepspeed ZeRO-3 bf16")
        assert case["batchnorm_dtypes"] == ["torch.float32"]
        plan = case["plan"]
        assert plan["peak_gib"] >= plan["activations_gib"] > 0 and "note" not in plan
    ckpt = report["checkpoint"]
    assert "CheckpointManager" in ckpt["engine"] and ckpt["client_state_back"] is True
    assert ckpt["batchnorm_dtypes_after_load"] == ["torch.float32"]
    assert set(ckpt["save_phases_s"]) == {"blocked", "write", "seal", "commit"}
    decode = report["decode"]
    assert decode["available"] is True and decode["cpu_images_per_s"] > 0
    assert decode["mixed_images_per_s"] is None and decode["cpu_decoder_args"] == {}, (
        "no nvJPEG sizing on CPU"
    )


BLOCKER = textwrap.dedent(
    """
    # Make this interpreter look like the device machine: torch (and numpy) only.
    import sys
    BLOCK = {"deepspeed", "yaml", "nvidia", "PIL", "mlflow", "webdataset"}
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"blocked for the test: {name}")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


@pytest.mark.slow
def test_cpu_twin_with_nothing_but_torch(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    import os

    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    report = run_check(tmp_path / "out", env=env)
    check_common(report)
    assert report["env"]["importable"]["deepspeed"] is False and report["env"]["importable"]["yaml"] is False
    for case in report["train"]:
        assert case["engine"].startswith("torch bf16 autocast") and "not importable" in case["engine_note"]
        assert "yaml" in case["plan"]["error"], "the plan needs PyYAML: recorded, not fatal"
    assert report["errors"] == ["plan[coatnet_0]", "plan[coatnet_0]", "plan[coatnet_5]", "plan[coatnet_5]"]
    assert report["checkpoint"]["engine"].startswith("torch.save")
    assert report["decode"] == {**report["decode"], "available": False}
