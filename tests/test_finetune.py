"""Transfer: pre-train at 32x32 on digits, export, fine-tune at 64x64 on parity with EMA under ZeRO-3."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.helpers.launch import BIN, CONFIGS, read_metrics, run_training

FINETUNE = CONFIGS / "smoke_finetune.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def run(config: Path, run_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = run_training(config, run_dir, *overrides, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def final_eval(run_dir: Path) -> dict:
    return read_metrics(run_dir)[1][-1]


@pytest.fixture(scope="module")
def pretrained_export(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> Path:
    """The smoke model pre-trained on the 10 digit classes at 32x32, exported with coatnet-export."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "pre"
    run(
        CONFIGS / "smoke.yaml",
        run_dir,
        f"data.train={digits_shards / 'train'}",
        f"data.val={digits_shards / 'val'}",
        "schedule.steps=200",
    )
    out = run_dir.parent / "pre.safetensors"
    subprocess.run(
        [str(BIN / "coatnet-export"), str(run_dir / "checkpoints"), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def test_finetune_at_higher_resolution_on_another_label_set(
    tmp_path: Path, parity_shards: Path, pretrained_export: Path
) -> None:
    data = [f"data.train={parity_shards / 'train'}", f"data.val={parity_shards / 'val'}", "schedule.steps=60"]
    tuned = tmp_path / "tuned"
    run(FINETUNE, tuned, *data, f"init.path={pretrained_export}", nproc=2)
    scratch = tmp_path / "scratch"
    run(FINETUNE, scratch, *data, nproc=2)

    tuned_eval, scratch_eval = final_eval(tuned), final_eval(scratch)
    assert tuned_eval["eval/top1"] > 0.8  # 2 classes: chance is 0.5
    assert tuned_eval["eval/top1"] > scratch_eval["eval/top1"] + 0.05, (tuned_eval, scratch_eval)
    assert "eval/ema_top1" in tuned_eval  # raw and EMA weights are both evaluated

    # The load adapted the pre-trained weights: tables resized (3x3 -> 7x7, 1x1 -> 3x3), head new.
    report = json.loads((tuned / "init_report.json").read_text())
    assert report["resized"] == [
        "stages.3.blocks.0.attn.relative_position_bias_table",
        "stages.4.blocks.0.attn.relative_position_bias_table",
    ]
    assert report["reinitialised"] == ["head.fc.bias", "head.fc.weight"]
    assert not report["missing"] and not report["unexpected"]
    ema = load_file(str(tuned / "ema.safetensors"))
    assert ema["stages.3.blocks.0.attn.relative_position_bias_table"].shape == (4, 7, 7)
    assert ema["head.fc.weight"].shape == (2, 128)

    # One store per output folder: the tuned and the scratch run share it.
    client = MlflowClient(tracking_uri=f"sqlite:///{tuned.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("coatnet").experiment_id
    (mlrun,) = client.search_runs([experiment], filter_string="attributes.run_name = 'tuned'")
    assert mlrun.data.tags["init_resized"] == "2" and mlrun.data.tags["init_reinitialised"] == "2"
    assert "init_report.json" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def test_sharded_ema_on_two_ranks_equals_one_process(
    tmp_path: Path, parity_shards: Path, pretrained_export: Path
) -> None:
    """Same global batches, same per-micro-batch BatchNorm groups (2 ranks x 32 vs 1 rank x 2 x 32), fp32."""
    same = [
        f"data.train={parity_shards / 'train'}",
        f"data.val={parity_shards / 'val'}",
        f"init.path={pretrained_export}",
        "schedule.steps=20",
        "ema.decay=0.9",
        "engine.precision=fp32",
        "data.output_dtype=fp32",
        "data.scale=[1.0,1.0]",
        "data.ratio=[1.0,1.0]",
        "data.batch_size=32",
        "engine.global_batch_size=64",
        "checkpoint.every_steps=0",
        "run.log_every=1",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    run(FINETUNE, two, *same, nproc=2)
    run(FINETUNE, one, *same, nproc=1)
    ema_two, ema_one = load_file(str(two / "ema.safetensors")), load_file(str(one / "ema.safetensors"))
    raw_two, raw_one = export(two), export(one)
    assert ema_two.keys() == ema_one.keys()
    params = [k for k in ema_two if "running_" not in k and "num_batches" not in k]

    def gap(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in params)

    # The two runs' weights differ only by float summation order (fp32, ~1e-4 after 20 steps); their EMAs
    # may differ by as much and no more, while the EMA itself is far from the weights it averages. A
    # mistake in the sharding (a partition applied to the wrong slice or rank) shows as a gap of the order
    # of the weights themselves (~1e-2).
    assert gap(ema_two, ema_one) <= 1.5 * gap(raw_two, raw_one) + 1e-6, (
        gap(ema_two, ema_one),
        gap(raw_two, raw_one),
    )
    assert gap(ema_two, raw_two) > 3 * gap(ema_two, ema_one)
    init = load_file(str(pretrained_export))
    key = "stages.2.blocks.0.conv_expand.weight"
    assert not torch.allclose(ema_two[key], init[key], atol=1e-4)


def export(run_dir: Path) -> dict[str, torch.Tensor]:
    out = run_dir / "final.safetensors"
    subprocess.run(
        [str(BIN / "coatnet-export"), str(run_dir / "checkpoints"), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return load_file(str(out))


def test_init_refuses_a_checkpoint_folder_and_names_the_export_command(pretrained_export: Path) -> None:
    """Checkpoint folders are pickles; initial weights come from exports (safetensors) only."""
    from pretrain.transfer import open_export

    folder = pretrained_export.parent / "pre" / "checkpoints"
    with pytest.raises(
        ValueError, match=r"is a folder; initial weights come from an export: run `coatnet-export"
    ):
        open_export(folder)
    assert open_export(pretrained_export).names() == set(load_file(str(pretrained_export)))
