"""coatnet-export: a ZeRO-3 checkpoint -> safetensors + JSON sidecar that a plain model loads strictly.

The ZeRO-3 side is real: this file doubles as a probe script that torchrun starts on 2 ranks. Each rank
builds the trainer (zero.Init model, DeepSpeed engine, DALI eval loader), loads the checkpoint through
the trainer's own resume path, runs one evaluation batch and saves its images, logits and BatchNorm
buffers. The test then feeds the same images to a plain model built from the export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import tag_for
from pretrain.model import create_model_from_config
from tests.fixtures.training import COMMON, STEPS
from tests.helpers.launch import REPO, SMOKE, run_script, tail

BIN = Path(sys.executable).parent


def export(*args: str) -> subprocess.CompletedProcess:
    """The real `coatnet-export` under umask 022 (the usual default on shared clusters)."""
    return subprocess.run(
        [str(BIN / "coatnet-export"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o022),
    )


def zero3_probe(out_dir: Path, shards: Path, checkpoint: Path) -> list[dict]:
    """Per rank: {"images", "logits", "batchnorm"} of one eval batch through the 2-rank ZeRO-3 engine."""
    proc = run_script(
        __file__,
        str(out_dir),
        f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}",
        f"run.output_dir={out_dir}",
        "run.name=probe",
        f"checkpoint.resume={checkpoint}",
        *COMMON,
        timeout=600,
    )
    assert proc.returncode == 0, tail(proc)
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_export_gives_a_plain_model_the_zero3_models_logits(
    reference_run: Path, digits_shards: Path, tmp_path: Path
) -> None:
    reference = reference_run
    final = reference / "checkpoints" / tag_for(STEPS)

    out = tmp_path / "coatnet.safetensors"
    proc = export(str(reference), str(out))  # a run folder: its newest committed checkpoint
    assert proc.returncode == 0, tail(proc)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["step"] == STEPS and sidecar["dtype"] == "fp32" and sidecar["saved_world_size"] == 2
    assert sidecar["model"]["name"] == "coatnet_0" and sidecar["model"]["config"]["dims"] == [
        16,
        16,
        32,
        64,
        128,
    ]
    assert sidecar["image_size"] == 32 and sidecar["num_classes"] == 10
    assert sidecar["class_names"] == [str(d) for d in range(10)] and sidecar["label_kind"] == "single"

    weights = load_file(out)
    model = create_model_from_config(sidecar["model"]["config"])
    model.load_state_dict(weights, strict=True)
    model.eval()

    probes = zero3_probe(tmp_path / "probe", digits_shards, final)
    # BatchNorm statistics: averaged over ranks before the save, so every rank and the export agree.
    bn0, bn1 = probes[0]["batchnorm"], probes[1]["batchnorm"]
    assert bn0 and bn0.keys() == bn1.keys()
    assert all(torch.equal(bn0[k], bn1[k]) for k in bn0)
    assert all(torch.equal(weights[k].to(bn0[k].dtype), bn0[k]) for k in bn0)

    bf16_model = create_model_from_config(sidecar["model"]["config"]).to(torch.bfloat16)
    bf16_model.load_state_dict(weights, strict=True)  # DeepSpeed's bf16 weights: bf16(fp32 master)
    bf16_model.eval()
    with torch.no_grad():
        for probe in probes:
            images, zero3 = probe["images"], probe["logits"].float()  # [N, 3, 32, 32] bf16, [N, 10]
            fp32 = model(images.float())
            bf16 = bf16_model(images).float()
            scale = zero3.abs().max().item()
            # Same weights and inputs; the ZeRO-3 model computes in bf16 (8-bit mantissa): measured one
            # bf16 ulp (0.5% of the largest logit) against both plain models.
            assert (bf16 - zero3).abs().max().item() <= 0.01 * scale, (bf16 - zero3).abs().max()
            assert (fp32 - zero3).abs().max().item() <= 0.01 * scale, (fp32 - zero3).abs().max()
            # Predictions agree wherever the top two logits are further apart than that tolerance.
            top2 = fp32.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.02 * scale
            assert clear.any() and torch.equal(fp32.argmax(-1)[clear], zero3.argmax(-1)[clear])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_export_and_checkpoint_folder_argument(
    reference_run: Path, digits_shards: Path, tmp_path: Path
) -> None:
    reference = reference_run
    tag = reference / "checkpoints" / tag_for(STEPS - 10)
    fp32_out, bf16_out = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert export(str(tag), str(fp32_out)).returncode == 0
    proc = export(str(tag), str(bf16_out), "--bf16")
    assert proc.returncode == 0, tail(proc)
    assert json.loads(bf16_out.with_suffix(".json").read_text())["step"] == STEPS - 10
    a, b = load_file(fp32_out), load_file(bf16_out)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        if tensor.is_floating_point():
            assert b[name].dtype == torch.bfloat16 and torch.equal(b[name], tensor.to(torch.bfloat16)), name
        else:
            assert torch.equal(b[name], tensor), name  # num_batches_tracked stays an integer
    missing = export(str(tmp_path / "nothing"), str(tmp_path / "c.safetensors"))
    assert missing.returncode == 2 and "no such checkpoint" in missing.stderr

    # The sidecar is the model card (same schema as the manifest's and ema.json), with preprocessing.
    card = json.loads(fp32_out.with_suffix(".json").read_text())
    assert card["format"] == "coatnet-card/1" and card["preprocessing"]["eval_crop_ratio"] == 0.875
    assert len(card["preprocessing"]["mean"]) == 3 and card["samples_seen"] == (STEPS - 10) * 64
    # Readable by teammates: the umask's mode, not safetensors' 0600.
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        p.name: 0o644
        for p in (fp32_out, bf16_out, fp32_out.with_suffix(".json"), bf16_out.with_suffix(".json"))
    }
    # An existing output is refused (one line, nothing written) unless --force.
    before = fp32_out.read_bytes()
    again = export(str(reference), str(fp32_out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr, tail(again)
    assert fp32_out.read_bytes() == before
    forced = export(str(reference), str(fp32_out), "--force")
    assert forced.returncode == 0 and json.loads(fp32_out.with_suffix(".json").read_text())["step"] == STEPS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# ------------------------------------------------------------------------------------------------ probe


def _probe_main(out_dir: str, overrides: list[str]) -> int:
    """Runs on every rank under torchrun: load the checkpoint as a resuming trainer does, then one eval batch."""
    from pretrain import dist
    from pretrain.config import load_config
    from pretrain.state import BatchNormStats
    from pretrain.trainer import Trainer

    trainer = Trainer.build(load_config(SMOKE, overrides))
    try:
        assert trainer._resume() is not None
        trainer.engine.eval()
        images, _, _ = next(iter(trainer.eval_loader))  # this rank's first batch
        with torch.no_grad():
            logits = trainer.engine(images)
        rank = dist.detect().rank
        torch.save(
            {
                "images": images.cpu(),
                "logits": logits.cpu(),
                "batchnorm": BatchNormStats(trainer.engine.module).state_dict(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1], sys.argv[2:]))


def test_streamed_safetensors_file_reads_back_exactly_with_safetensors(tmp_path: Path) -> None:
    """`write_safetensors` (one tensor in memory at a time) against the safetensors library's reader:
    every dtype the export writes, a 0-dim buffer, the metadata, lazy slices."""
    from safetensors import safe_open

    from pretrain.export import LazyTensor, write_safetensors

    gen = torch.Generator().manual_seed(0)
    state = {
        "stem.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "blocks.0.attn.relative_position_bias_table": torch.randn(4, 13, 13, generator=gen).bfloat16(),
        "norm.num_batches_tracked": torch.tensor(17),
        "head.fc.bias": torch.randn(5, generator=gen),
    }
    made = []

    def lazy(name: str, value: torch.Tensor) -> LazyTensor:
        def make() -> torch.Tensor:
            made.append(name)
            return value.clone()

        return LazyTensor(name, tuple(value.shape), value.dtype, make)

    out = tmp_path / "w.safetensors"
    write_safetensors(out, [lazy(k, v) for k, v in state.items()], {"model": "coatnet_0", "step": "3"})
    assert made == list(state)  # each tensor made once, in order
    assert load_file(str(out)).keys() == state.keys()
    for name, value in load_file(str(out)).items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"model": "coatnet_0", "step": "3"}
        assert torch.equal(f.get_slice("stem.weight")[2:4], state["stem.weight"][2:4])
