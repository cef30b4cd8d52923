"""Typed configuration: composition, overrides, validation errors that name the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import TrainConfig, config_docs_markdown, load_config, resume_hash
from pretrain.configlib import ConfigError, dump_yaml
from pretrain.ds_config import deepspeed_config
from tests.helpers.launch import REPO


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(
        tmp_path / "base.yaml",
        """
run: {name: base-run, seed: 3}
model: {name: coatnet_0, image_size: 64}
optim: {lr: 1.0e-3, weight_decay: 0.05}
schedule: {steps: 10}
""",
    )


def test_composition_and_overrides(tmp_path: Path, base: Path) -> None:
    child = write(
        tmp_path / "recipes" / "child.yaml",
        """
base: ../base.yaml
optim: {lr: 5e-4}
model: {depths: [1, 1, 1, 1, 1]}
""",
    )
    cfg = load_config(child, ["optim.weight_decay=0.01", "run.name=over", "model.dims=[8,8,16,32,64]"])
    assert cfg.run.seed == 3  # from the base
    assert cfg.model.image_size == 64  # from the base, merged key by key with the child's model section
    assert cfg.model.depths == [1, 1, 1, 1, 1]  # from the child
    assert cfg.optim.lr == pytest.approx(5e-4)  # the child's `5e-4` is a YAML string; read as a float
    assert cfg.optim.weight_decay == pytest.approx(0.01)  # from the command line
    assert cfg.run.name == "over"
    assert cfg.model.dims == [8, 8, 16, 32, 64]
    assert cfg.model.overrides() == {"depths": [1, 1, 1, 1, 1], "dims": [8, 8, 16, 32, 64]}


def test_resolved_config_round_trips(tmp_path: Path, base: Path) -> None:
    cfg = load_config(base, ["optim.lr=2e-4"])
    again = write(tmp_path / "resolved.yaml", dump_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("text", "override", "expected"),
    [
        ("optim: {lrr: 1.0}\n", None, r"bad\.yaml: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"),
        ("optim: {lr: fast}\n", None, r"optim\.lr must be a number, got 'fast'"),
        ("model: {image_size: 100}\n", None, r"model\.image_size: 100 is not divisible by 32"),
        ("optim: {betas: [0.9, 2.0]}\n", None, r"optim\.betas=\[0\.9, 2\.0\] is out of range \(max 1\.0\)"),
        ("engine: {zero_stage: 4}\n", None, r"engine\.zero_stage=4 is out of range"),
        ("loss: {kind: hinge}\n", None, r"loss\.kind must be one of 'softmax', 'sigmoid'"),
        ("model: {grad_checkpointing: 1}\n", None, r"model\.grad_checkpointing must be true or false"),
        ("bogus: {a: 1}\n", None, r"unknown key 'bogus'"),
        ("", "optim.lr=abc", r"command line: optim\.lr must be a number"),
        ("", "optim.nope=1", r"command line: unknown key 'optim\.nope'"),
        ("", "justakey", r"not of the form section\.key=value"),
        ("schedule: {epochs: 2}\n", None, r"set exactly one of schedule\.steps and schedule\.epochs"),
    ],
)
def test_bad_values_name_key_and_source(
    tmp_path: Path, base: Path, text: str, override: str | None, expected: str
) -> None:
    path = write(tmp_path / "bad.yaml", "base: base.yaml\n" + text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, [override] if override else [])
    assert "\n" not in str(info.value)  # one line


def test_error_names_the_file_the_key_came_from(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "optim: {lr: 1.0e-3, eps: oops}\nschedule: {steps: 1}\n")
    child = write(tmp_path / "b.yaml", "base: a.yaml\noptim: {lr: 2.0e-3}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: optim\.eps must be a number"):
        load_config(child)


def test_missing_and_circular_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")
    write(tmp_path / "z.yaml", "base: missing-base.yaml\n")
    with pytest.raises(ConfigError, match=r"missing-base\.yaml: config file not found"):
        load_config(tmp_path / "z.yaml")


def test_resume_hash_tracks_only_invariant_fields(base: Path) -> None:
    ref = resume_hash(load_config(base))
    assert resume_hash(load_config(base, ["optim.lr=2e-4", "schedule.steps=99"])) == ref
    assert resume_hash(load_config(base, ["model.dims=[8,8,16,32,64]"])) != ref
    assert resume_hash(load_config(base, ["run.seed=4"])) != ref


def test_deepspeed_config_is_generated_and_checked(base: Path) -> None:
    cfg = load_config(base, ["engine.global_batch_size=64", "data.batch_size=8"])
    ds = deepspeed_config(cfg.engine, cfg.optim, micro_batch=cfg.data.batch_size, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 == 8 * 4 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    with pytest.raises(ConfigError, match=r"engine\.global_batch_size=64 is not a multiple .* 8 x 3 = 24"):
        deepspeed_config(cfg.engine, cfg.optim, micro_batch=8, world_size=3)


def test_docs_cover_every_field_and_are_in_sync() -> None:
    text = config_docs_markdown()
    for section in ("run", "model", "data", "optim", "schedule", "loss", "engine", "checkpoint", "tracking"):
        assert f"| `{section}." in text
    assert "| `optim.lr` | a number | `0.001` | Peak learning rate" in text
    assert (REPO / "docs" / "config.md").read_text() == text, "regenerate: python -m pretrain.config --docs"
    for row in text.splitlines()[7:]:
        assert row.split("|")[4].strip(), f"undocumented field: {row}"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_help() -> None:
    out = run_cli("--help", cwd=REPO)
    assert out.returncode == 0
    assert "--config" in out.stdout and "key=value" in out.stdout


@pytest.mark.parametrize(
    ("content", "override", "needle"),
    [
        ("model: {nam: coatnet_0}\nschedule: {steps: 1}\n", None, "unknown key 'model.nam'"),
        ("model: {image_size: big}\nschedule: {steps: 1}\n", None, "model.image_size must be an integer"),
        (None, None, "config file not found"),
        ("schedule: {steps: 1}\n", "data.batch_size=-4", "data.batch_size=-4 is out of range"),
    ],
)
def test_cli_bad_config_exits_2_and_writes_nothing(
    tmp_path: Path, content: str | None, override: str | None, needle: str
) -> None:
    cfg = tmp_path / "cfg.yaml"
    if content is not None:
        cfg.write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = run_cli(
        "--config",
        str(cfg),
        f"run.output_dir={tmp_path / 'runs'}",
        *([override] if override else []),
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert str(cfg.name) in out.stderr or "command line" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no files


def test_print_config_resolves_without_writing(tmp_path: Path, base: Path) -> None:
    out = run_cli("--config", str(base), "--print-config", "optim.lr=3e-4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0003" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_every_shipped_config_loads() -> None:
    """Runnable configs load; a file named as another's `base:` is a fragment, checked through its children."""
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    bases = set()
    for path in configs:
        named = yaml.safe_load(path.read_text()).get("base", [])
        bases |= {(path.parent / b).resolve() for b in ([named] if isinstance(named, str) else named)}
    runnable = [p for p in configs if p.resolve() not in bases]
    assert runnable and bases
    for path in runnable:
        assert isinstance(load_config(path), TrainConfig), path


def test_several_config_files_compose_in_order(tmp_path: Path, base: Path) -> None:
    extra = write(tmp_path / "extra.yaml", "optim: {lr: 2.0e-4}\nmodel: {image_size: 96}\n")
    cfg = load_config([base, extra], ["model.image_size=128"])
    assert cfg.run.seed == 3 and cfg.optim.weight_decay == pytest.approx(0.05)  # from the first
    assert cfg.optim.lr == pytest.approx(2e-4)  # the second file wins over the first
    assert cfg.model.image_size == 128  # the command line wins over both


def test_mistakes_found_before_any_work(base: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.name: unknown variant 'coatnet_9'; did you mean coatnet_"):
        load_config(base, ["model.name=coatnet_9"])
    with pytest.raises(ConfigError, match=r"override 'model=' has no value \(write model=null"):
        load_config(base, ["model="])
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps: 20 is longer than the whole schedule"):
        load_config(base, ["schedule.warmup_steps=20"])  # base: schedule.steps=10
    with pytest.raises(ConfigError, match="model: coatnet_0 does not build with these overrides"):
        load_config(base, ["model.depths=[1,1]"])


def test_cli_composes_several_configs_and_prints_one_line_errors(tmp_path: Path, base: Path) -> None:
    extra = write(tmp_path / "extra.yaml", "optim: {lr: 2.0e-4}\n")
    train = [sys.executable, "-m", "pretrain.train"]
    out = subprocess.run(
        [*train, "--config", str(base), "--config", str(extra), "--print-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["optim"]["lr"] == pytest.approx(2e-4)
    bad = subprocess.run(
        [*train, "--config", str(base), "model.name=coatnet_9", "--print-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "coatnet_9" in bad.stderr
    assert bad.stdout == ""
