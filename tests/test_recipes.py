"""Every recipe in configs/: it loads, generates its DeepSpeed config on the cluster its header names,
builds its model on the meta device, follows the paper's Table 10 column it claims, and fits the memory
of that cluster by coatnet-plan's estimate.

Runnable recipes are the files not starting with "_"; those are shared bases (one value, one place).
"""

from __future__ import annotations

import re

import pytest
import torch

from pretrain import plan
from pretrain.config import TrainConfig, load_config
from pretrain.ds_config import deepspeed_config
from pretrain.model import create_model
from pretrain.model.macs import PUBLISHED_PARAMS
from tests.helpers.launch import CONFIGS

RECIPES = sorted(p.name for p in CONFIGS.glob("coatnet*.yaml"))
BASES = sorted(p.name for p in CONFIGS.glob("_*.yaml"))


def header(name: str) -> str:
    lines = (CONFIGS / name).read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("#"))


def assumed_cluster(name: str) -> tuple[int, int]:
    """(nodes, GPUs per node) from the header's `Cluster: N nodes x G GPUs` line."""
    match = re.search(r"Cluster: (\d+) nodes x (\d+) GPUs x 80 GB", header(name))
    assert match, f"{name}: header has no 'Cluster: N nodes x G GPUs x 80 GB' line"
    return int(match.group(1)), int(match.group(2))


def kind(name: str) -> str:
    return next(k for k in ("ft384", "ft512", "jft", "in21k", "in1k") if k in name)


def test_the_recipe_set_covers_the_paper():
    assert {f"coatnet{m}_jft.yaml" for m in (5, 6, 7)} <= set(RECIPES)
    assert {f"coatnet{m}_in21k.yaml" for m in (5, 6, 7)} <= set(RECIPES)
    assert {f"coatnet{m}_in1k.yaml" for m in (0, 1, 2, 3)} <= set(RECIPES)
    assert {"ft384", "ft512"} <= {kind(r) for r in RECIPES}


def test_every_shared_base_is_used_and_every_recipe_builds_on_base_yaml():
    used = set()
    for name in RECIPES:
        text = (CONFIGS / name).read_text()
        base = re.search(r"^base: (\S+)$", text, flags=re.MULTILINE)
        assert base, f"{name}: no 'base:'"
        used.add(base.group(1))
    assert used <= set(BASES) | {"base.yaml"} and set(BASES) <= used
    for name in BASES:
        assert re.search(r"^base: base.yaml$", (CONFIGS / name).read_text(), flags=re.MULTILINE), name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header_says_what_how_and_where(name):
    text = header(name)
    assert (CONFIGS / name).read_text().startswith("# Reproduces: CoAtNet-"), name
    assert "Table 10" in text
    launcher = "finetune.sbatch" if kind(name).startswith("ft") else "pretrain.sbatch"
    assert f"sbatch --nodes={assumed_cluster(name)[0]} cluster/{launcher} configs/{name}" in text
    assert f"coatnet-plan --config configs/{name}" in text


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_generates_deepspeed_config_and_builds_on_meta(name):
    cfg = load_config(CONFIGS / name)
    nodes, gpus = assumed_cluster(name)
    ds = deepspeed_config(cfg.engine, cfg.optim, micro_batch=cfg.data.batch_size, world_size=nodes * gpus)
    assert ds["train_batch_size"] == cfg.engine.global_batch_size
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0
    # Every recipe names its classes: the planner and the meta build need them before any data exists.
    assert cfg.model.num_classes is not None
    with torch.device("meta"):
        model = create_model(
            cfg.model.name,
            num_classes=cfg.model.num_classes,
            image_size=cfg.model.image_size,
            drop_path_rate=cfg.model.drop_path_rate,
            **cfg.model.overrides(),
        )
    params = sum(p.numel() for p in model.parameters())
    head = cfg.model.num_classes * model.config.dims[-1] - 1000 * model.config.dims[-1]
    # Table 12's published counts, to the rounding of the paper's figures.
    assert params - head == pytest.approx(PUBLISHED_PARAMS[cfg.model.name], rel=0.01)


def _is_multilabel(cfg: TrainConfig) -> None:
    assert cfg.loss.kind == "sigmoid" and cfg.loss.label_smoothing == 1e-4
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.min_lr == 1e-5
    assert cfg.schedule.decay == "linear" and cfg.data.mixup_alpha == 0
    assert (cfg.data.randaugment_layers, cfg.data.randaugment_magnitude) == (2, 5)
    assert cfg.model.image_size == 224 and cfg.engine.global_batch_size == 4096


@pytest.mark.parametrize("name", [r for r in RECIPES if kind(r) == "jft"])
def test_jft_recipes_follow_table_10(name):
    cfg = load_config(CONFIGS / name)
    _is_multilabel(cfg)
    assert cfg.schedule.epochs == 14 and cfg.schedule.warmup_steps == 20_000
    assert cfg.optim.lr == 5e-4  # C-5's rate; C-6/7 alike
    assert cfg.model.drop_path_rate == 0.0
    assert cfg.data.train.startswith("/data/jft")


@pytest.mark.parametrize("name", [r for r in RECIPES if kind(r) == "in21k"])
def test_in21k_recipes_follow_table_10(name):
    cfg = load_config(CONFIGS / name)
    _is_multilabel(cfg)
    assert cfg.schedule.epochs == 90 and cfg.schedule.warmup_epochs == 5 and cfg.schedule.warmup_steps == 0
    assert cfg.optim.lr == 1e-3 and cfg.model.num_classes == 21841


@pytest.mark.parametrize("name", [r for r in RECIPES if kind(r) == "in1k"])
def test_in1k_recipes_follow_table_10(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.loss.kind == "softmax" and cfg.loss.label_smoothing == 0.1
    assert (
        cfg.schedule.epochs == 300 and cfg.schedule.warmup_steps == 10_000 and cfg.schedule.decay == "cosine"
    )
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (1e-3, 1e-5, 0.05)
    assert (cfg.data.randaugment_layers, cfg.data.randaugment_magnitude, cfg.data.mixup_alpha) == (2, 15, 0.8)
    rates = {"coatnet_0": 0.2, "coatnet_1": 0.3, "coatnet_2": 0.5, "coatnet_3": 0.7}
    assert cfg.model.drop_path_rate == rates[cfg.model.name]
    assert cfg.engine.global_batch_size == 4096 and cfg.model.num_classes == 1000


@pytest.mark.parametrize("name", [r for r in RECIPES if kind(r).startswith("ft")])
def test_finetune_recipes_follow_table_10(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.image_size == int(kind(name)[2:])
    assert cfg.optim.lr == cfg.optim.min_lr == 5e-5 and cfg.schedule.decay == "constant"
    assert cfg.schedule.warmup_steps == 0 and cfg.schedule.warmup_epochs == 0
    assert cfg.optim.weight_decay == 1e-8 and cfg.loss.label_smoothing == 0.1 and cfg.loss.kind == "softmax"
    assert cfg.ema.decay == 0.9999 and cfg.schedule.epochs == 30
    assert cfg.init.path is None and cfg.init.reset_head
    assert "init.path=" in header(name)
    after_21k = "in21k" in name
    assert cfg.engine.global_batch_size == (1024 if after_21k else 512)
    assert cfg.data.mixup_alpha == (0.8 if "in1k" in name else 0.0)
    # The augmentation of the pre-training it continues.
    source = re.search(r"\(configs/(\S+\.yaml)\)", header(name))
    assert source, f"{name}: header does not name its pre-training config"
    pre = load_config(CONFIGS / source.group(1))
    assert pre.model.name == cfg.model.name
    assert (cfg.data.randaugment_layers, cfg.data.randaugment_magnitude) == (
        pre.data.randaugment_layers,
        pre.data.randaugment_magnitude,
    )


def test_finetune_init_path_override_is_checked(tmp_path):
    """The header's `init.path=<export>` override: rejected while the file is missing, taken once it exists."""
    name = "coatnet7_jft_ft512.yaml"
    with pytest.raises(ValueError, match=r"init\.path"):
        load_config(CONFIGS / name, ["init.path=/nonexistent/export.safetensors"])
    export = tmp_path / "export.safetensors"
    export.write_bytes(b"")
    assert load_config(CONFIGS / name, [f"init.path={export}"]).init.path == str(export)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fits_its_cluster_by_the_planner(name):
    cfg = load_config(CONFIGS / name)
    nodes, gpus = assumed_cluster(name)
    cluster = plan.Cluster(
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_memory=80 * 2**30,
        peak_tflops=cfg.engine.peak_tflops,
        mfu=0.4,
        link_gbytes=50.0,
        reserve=4 * 2**30,
    )
    p = plan.make_plan(cfg, cluster, name)
    assert p.accumulation is not None and p.accumulation >= 1
    assert p.peak[cfg.model.grad_checkpointing] <= cluster.gpu_memory
    if not cfg.model.grad_checkpointing:
        # Switching checkpointing off is only chosen with a margin for what the estimate leaves out.
        assert p.peak[False] <= 0.8 * cluster.gpu_memory
