"""The training config: one typed section per component, loaded from YAML by `load_config`.

Each component receives only its own section. Every field is documented here (`doc`), and
`docs/config.md` is generated from these declarations (`python -m pretrain.config --docs`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data_pipeline.config import DataConfig
from pretrain.configlib import (
    ConfigError,
    build,
    doc,
    dump_yaml,
    field_docs,
    flatten,
    merge_into,
    parse_overrides,
    read_yaml_tree,
    to_tree,
)

__all__ = ["ConfigError", "TrainConfig", "load_config"]


@dataclass
class RunConfig:
    name: str = doc("Run name: the output folder is <output_dir>/<name>.", "run")
    output_dir: str = doc(
        "Folder holding one sub-folder per run (config, logs, checkpoints, local MLflow).", "runs"
    )
    seed: int = doc(
        "Seed of everything: parameter init, data order (a function of seed and epoch), dropout.", 0, min=0
    )
    log_every: int = doc("Steps between metric lines on the console and in MLflow.", 10, min=1)
    eval_every: int = doc("Steps between evaluations on data.val (0: only at the end).", 0, min=0)
    console_all_ranks: bool = doc("Print every rank's log on the console, not only rank 0's.", False)
    stop_check_s: float = doc(
        "Seconds between each rank's looks for the stop file of cluster/launch.sh. The ranks agree on a stop "
        "request every step and stop at the next log step (signals are seen at once).",
        2.0,
        min=0.0,
    )


@dataclass
class ModelConfig:
    name: str = doc("Registered variant: coatnet_0 ... coatnet_7.", "coatnet_0")
    num_classes: int | None = doc(
        "Classifier outputs; null takes the number of classes from the training data.", None, min=1
    )
    image_size: int = doc(
        "Training resolution (square, divisible by 32); also the loader's crop size.", 224, min=32
    )
    drop_path_rate: float = doc(
        "Maximum stochastic-depth rate (grows linearly with block index).", 0.0, min=0.0, max=0.95
    )
    grad_checkpointing: bool = doc("Activation checkpointing of every block (recompute in backward).", False)
    depths: list[int] | None = doc("Override: blocks per stage, in the variant's stage order.", None, min=0)
    dims: list[int] | None = doc("Override: channels per stage, in the variant's stage order.", None, min=1)
    head_dim: int | None = doc("Override: attention head size.", None, min=1)
    downsample: Literal["conv1x1", "depthwise"] | None = doc(
        "Override: MBConv stride on the first 1x1 conv (paper default) or on the depthwise conv.", None
    )
    pre_logits: bool | None = doc("Override: keep the pre-logits Linear+tanh in the head.", None)
    bn_momentum: float | None = doc(
        "Override: BatchNorm momentum, PyTorch convention (1 - TensorFlow decay: TF's default "
        "decay 0.99 is 0.01); null keeps the model's 0.1.",
        None,
        min=0.0,
        max=1.0,
    )

    def overrides(self) -> dict:
        """The architecture overrides that are set, as keyword arguments for `create_model`."""
        keys = ("depths", "dims", "head_dim", "downsample", "pre_logits", "bn_momentum")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class OptimConfig:
    lr: float = doc("Peak learning rate (AdamW).", 1e-3, min=0.0)
    min_lr: float = doc("Learning rate at the end of the decay.", 1e-5, min=0.0)
    weight_decay: float = doc(
        "Decoupled weight decay; never applied to biases, norms or relative-bias tables.", 0.05, min=0.0
    )
    betas: list[float] = doc("AdamW betas.", default_factory=lambda: [0.9, 0.999], min=0.0, max=1.0)
    eps: float = doc("AdamW epsilon.", 1e-8, min=0.0)
    grad_clip: float = doc("Clip the global gradient norm to this value (0: no clipping).", 1.0, min=0.0)


@dataclass
class ScheduleConfig:
    steps: int | None = doc("Total optimizer steps. Exactly one of steps / epochs is set.", None, min=1)
    epochs: float | None = doc(
        "Total epochs of the training data (converted to steps with the global batch).", None, min=0.0
    )
    warmup_steps: int = doc("Linear warm-up steps from 0 to optim.lr.", 0, min=0)
    warmup_epochs: float = doc("Warm-up in epochs (added to warmup_steps).", 0.0, min=0.0)
    decay: Literal["cosine", "linear", "constant"] = doc(
        "Decay after warm-up, down to optim.min_lr.", "cosine"
    )


@dataclass
class LossConfig:
    kind: Literal["softmax", "sigmoid"] = doc(
        "softmax cross-entropy (single-label) or sigmoid binary cross-entropy (multi-label, JFT/21K style).",
        "softmax",
    )
    label_smoothing: float = doc(
        "Label smoothing (0.1 for IN-1K, 1e-4 for JFT/21K in the paper).", 0.1, min=0.0, max=0.5
    )


@dataclass
class EngineConfig:
    zero_stage: int = doc("DeepSpeed ZeRO stage.", 3, min=0, max=3)
    precision: Literal["bf16", "fp32"] = doc("Compute precision (bf16 keeps fp32 master weights).", "bf16")
    global_batch_size: int | None = doc(
        "Images per optimizer step over all ranks; must equal data.batch_size x accumulation x world size. "
        "null: data.batch_size x world size (no accumulation).",
        None,
        min=1,
    )
    reduce_bucket_size: int = doc("ZeRO reduce bucket, elements.", 50_000_000, min=1)
    prefetch_bucket_size: int = doc("ZeRO-3 parameter prefetch bucket, elements.", 50_000_000, min=0)
    param_persistence_threshold: int = doc(
        "ZeRO-3 keeps parameters smaller than this (elements) unpartitioned on every rank.", 100_000, min=0
    )
    max_live_parameters: int = doc(
        "ZeRO-3 limit of gathered parameters alive at once, elements.", 1_000_000_000, min=1
    )
    max_reuse_distance: int = doc(
        "ZeRO-3 keeps a gathered parameter if reused within this many elements.", 1_000_000_000, min=0
    )
    gather_unit_elements: int = doc(
        "ZeRO-3 gathers each block (MBConv or transformer, not the stem) of at most this many parameter "
        "elements in one go at its entry, with no hooks below it; 0: layer by layer (DeepSpeed's own hooks). "
        "Fewer hooks and all-gathers (150000000 covers every block of CoAtNet-0..7; see "
        "pretrain.engine.zero3_gather_units). Off: no faster in benchmarks/engine_overhead.py on 2 CPU "
        "ranks (1.97x the plain step with units, 1.68x without, same run); bitwise the same losses "
        "from batch 2 per rank (see zero3_gather_units for batch 1).",
        0,
        min=0,
    )
    overlap_comm: bool = doc("Overlap gradient reduction with backward.", True)
    contiguous_gradients: bool = doc("Copy gradients into one contiguous buffer (less fragmentation).", True)
    timeout_minutes: int = doc(
        "Collective timeout: a rank that hangs fails the job after this long.", 30, min=1
    )
    peak_tflops: float = doc(
        "Device peak bf16 TFLOP/s for MFU (989 = H100 SXM dense; 0: no MFU).", 989.0, min=0.0
    )
    compile: bool = doc(
        "torch.compile the whole model through DeepSpeed's engine.compile (inductor); the first step compiles. "
        "Off until measured on GPU (CPU figures: benchmarks/model_speed.py --compile).",
        False,
    )
    deterministic: bool = doc(
        "Deterministic GPU kernels (torch deterministic mode, fixed cuBLAS workspace, no cuDNN autotuning): "
        "bitwise-repeatable GPU runs at some speed; see docs/determinism.md. CPU runs are bitwise either way.",
        False,
    )


@dataclass
class CheckpointConfig:
    dir: str | None = doc("Checkpoint folder; null: <run folder>/checkpoints.", None)
    every_steps: int = doc("Steps between checkpoints (0: only on preemption and at the end).", 1000, min=0)
    async_save: bool = doc(
        "Periodic saves return once the state is in host memory and are written in the background, "
        "committed a few steps later (stop and final saves still wait for the commit). Costs each rank "
        "host memory of its share of the checkpoint (12-16 bytes per parameter / world size).",
        True,
    )
    keep_last: int = doc("Keep the newest K committed checkpoints.", 3, min=1)
    keep_every: int = doc(
        "Also keep every checkpoint whose step is a multiple of this for good (0: none).", 0, min=0
    )
    resume: str = doc("'auto': newest committed checkpoint if any; 'never'; or a checkpoint folder.", "auto")
    canary_tolerance: float = doc(
        "Allowed loss difference of the resume canary batch (0: must be exact).", 1e-3, min=0.0
    )
    trust_unsigned: bool = doc(
        "Resume from a checkpoint whose manifest your key did not sign (someone else's, or written before "
        "signing existed): you vouch for its pickles. Logged as a warning.",
        False,
    )

    def folder(self, run_dir: Path) -> Path:
        """Where the checkpoints go: `dir`, else <run folder>/checkpoints."""
        return Path(self.dir) if self.dir else run_dir / "checkpoints"


@dataclass
class InitConfig:
    path: str | None = doc(
        "Initialise the model from an exported .safetensors file (coatnet-export, or a run's "
        "ema.safetensors) for fine-tuning; checkpoint folders are not accepted (they hold pickles).",
        None,
    )
    reset_head: bool = doc("Drop the classifier of the loaded weights and initialise a new one.", True)


@dataclass
class EmaConfig:
    decay: float = doc(
        "EMA decay of the weights (0: no EMA; 0.9999 in the paper's fine-tune).", 0.0, min=0.0, max=1.0
    )
    every: int = doc("Update the EMA every N optimizer steps (decay is adjusted to match).", 1, min=1)


# A URI's user-info part (`scheme://user:password@host`): never written to a config, log, param or tag.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_userinfo(text: str) -> str:
    """`text` with the user-info part of every URI in it replaced by `***`."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


@dataclass
class TrackingConfig:
    enabled: bool = doc("Log to MLflow (rank 0 only).", True)
    uri: str | None = doc(
        "Tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<run.output_dir>/mlflow.db (one store "
        "for every run of the folder, artifacts in <run.output_dir>/mlartifacts). Credentials never go "
        "here: set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.",
        None,
    )
    experiment: str = doc("MLflow experiment name.", "coatnet")
    timeout_s: float = doc(
        "Per-request timeout talking to the server (MLflow's own retries are off; the background "
        "sender retries with backoff).",
        5.0,
        min=0.1,
    )
    spool_mb: float = doc(
        "Records not yet delivered are kept on disk in <run folder>/mlflow-spool; beyond this size the "
        "oldest metric records are dropped (counted in tracking/dropped_records), never params, tags "
        "or the run status.",
        64.0,
        min=0.01,
    )
    retry_max_s: float = doc(
        "Longest pause between two delivery attempts while the server is down.", 30.0, min=0.1
    )
    start_wait_s: float = doc(
        "Longest wait at start for the run to exist (a new sqlite store first creates its tables: tens "
        "of seconds on a loaded machine); training then goes on and a later checkpoint gets the run id.",
        120.0,
        min=0.0,
    )
    flush_timeout_s: float = doc(
        "Longest wait at the end for undelivered records; what is left is delivered by the next job of "
        "the run or by `python -m pretrain.tracking deliver <run folder>`.",
        60.0,
        min=0.0,
    )
    system_metrics_every_s: float = doc(
        "Seconds between samples of rank 0's CPU, memory, disk, network and GPU (MLflow's system/ "
        "metrics; 0: none).",
        10.0,
        min=0.0,
    )

    def credentials_problem(self, env: Mapping[str, str]) -> str | None:
        """Why the tracking URI (this section's, else $MLFLOW_TRACKING_URI) may not be used, or None."""
        if not self.enabled:
            return None
        uri = self.uri if self.uri is not None else env.get("MLFLOW_TRACKING_URI")
        where = "" if self.uri is not None else "$MLFLOW_TRACKING_URI="
        if uri is None or not _USERINFO.search(uri):
            return None
        return (
            f"{where}{redact_userinfo(uri)} holds a user name or password; remove it from the URI and set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead (MLflow reads them), so that "
            "the password reaches no config, log or MLflow run"
        )


@dataclass
class TrainConfig:
    run: RunConfig = doc("Run identity and cadence.", default_factory=RunConfig)
    model: ModelConfig = doc("The network.", default_factory=ModelConfig)
    data: DataConfig = doc("Input pipeline.", default_factory=DataConfig)
    optim: OptimConfig = doc("Optimizer.", default_factory=OptimConfig)
    schedule: ScheduleConfig = doc("Learning-rate schedule and length.", default_factory=ScheduleConfig)
    loss: LossConfig = doc("Loss.", default_factory=LossConfig)
    engine: EngineConfig = doc("DeepSpeed engine.", default_factory=EngineConfig)
    checkpoint: CheckpointConfig = doc("Checkpointing and resume.", default_factory=CheckpointConfig)
    init: InitConfig = doc("Initial weights (fine-tuning).", default_factory=InitConfig)
    ema: EmaConfig = doc("Exponential moving average of the weights.", default_factory=EmaConfig)
    tracking: TrackingConfig = doc("MLflow tracking.", default_factory=TrackingConfig)


# Fields whose change makes a checkpoint unusable for resuming (checked through `resume_hash`).
RESUME_INVARIANT_KEYS = ("model", "run.seed", "loss.kind", "data.batch_size", "engine.global_batch_size")


def load_config(
    path: str | Path | list[str | Path], overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Load, compose and validate config file(s) plus dotted overrides. Raises ConfigError (one line).

    Several files compose in order, each merged key by key over the ones before (as their own `base:`
    chains do), then the overrides.
    """
    paths = path if isinstance(path, list) else [path]
    tree, origin = read_yaml_tree(paths[0])
    for extra in paths[1:]:
        extra_tree, extra_origin = read_yaml_tree(extra)
        merge_into(tree, extra_tree, origin, extra_origin)
    over, over_origin = parse_overrides(list(overrides))
    merge_into(tree, over, origin, over_origin)
    cfg = build(TrainConfig, tree, origin)
    _check_consistency(cfg, origin, str(paths[-1]))
    return cfg


def _check_consistency(cfg: TrainConfig, origin: dict[str, str], path: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{origin.get(key, path)}: {key}: {msg}")

    if (cfg.schedule.steps is None) == (cfg.schedule.epochs is None):
        fail("schedule.steps", "set exactly one of schedule.steps and schedule.epochs")
    if cfg.schedule.steps is not None and cfg.schedule.warmup_steps > cfg.schedule.steps:
        fail(
            "schedule.warmup_steps",
            f"{cfg.schedule.warmup_steps} is longer than the whole schedule (schedule.steps={cfg.schedule.steps})",
        )
    if cfg.model.image_size % 32:
        fail("model.image_size", f"{cfg.model.image_size} is not divisible by 32")
    _check_model(cfg.model, fail)
    if cfg.optim.min_lr > cfg.optim.lr:
        fail("optim.min_lr", f"{cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")
    if len(cfg.optim.betas) != 2:
        fail("optim.betas", f"needs two values, got {cfg.optim.betas}")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        fail(
            "checkpoint.resume",
            f"'auto', 'never' or an existing checkpoint folder; {cfg.checkpoint.resume} does not exist",
        )
    if cfg.init.path is not None:
        init = Path(cfg.init.path)
        if not init.exists():
            fail("init.path", f"{init} does not exist")
        if init.is_dir() or init.suffix != ".safetensors":
            fail(
                "init.path",
                f"{init} is not a .safetensors export; run `coatnet-export {init} OUT.safetensors` first "
                "and set init.path=OUT.safetensors",
            )
    if cfg.data.output_dtype is None:
        cfg.data.output_dtype = (
            cfg.engine.precision
        )  # derived: the model takes its input in its own precision
    elif cfg.data.output_dtype != cfg.engine.precision:
        fail(
            "data.output_dtype",
            f"{cfg.data.output_dtype!r} differs from engine.precision={cfg.engine.precision!r}; "
            "leave it unset (null) to follow engine.precision",
        )
    if cfg.ema.decay > 0 and cfg.engine.zero_stage != 3:
        fail("ema.decay", f"{cfg.ema.decay} needs engine.zero_stage=3 (the EMA is kept on ZeRO-3 partitions)")
    if problem := cfg.tracking.credentials_problem(os.environ):
        fail("tracking.uri", problem)
    gb = cfg.engine.global_batch_size
    if gb is not None and gb % cfg.data.batch_size:
        fail("engine.global_batch_size", f"{gb} is not a multiple of data.batch_size={cfg.data.batch_size}")


def _check_model(cfg: ModelConfig, fail) -> None:
    """The variant exists and builds with the overrides (on the meta device: no memory, milliseconds)."""
    import difflib

    import torch

    from pretrain.model import create_model, list_models

    if cfg.name not in list_models():
        close = difflib.get_close_matches(cfg.name, list_models(), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; one of {', '.join(list_models())}"
        fail("model.name", f"unknown variant {cfg.name!r}{hint}")
    try:
        with torch.device("meta"):
            create_model(
                cfg.name, num_classes=cfg.num_classes or 10, image_size=cfg.image_size, **cfg.overrides()
            )
    except (ValueError, TypeError, AssertionError) as exc:
        fail("model", f"{cfg.name} does not build with these overrides: {str(exc).splitlines()[0]}")


def resume_invariants(cfg: TrainConfig) -> dict[str, object]:
    """The values of RESUME_INVARIANT_KEYS, flattened to dotted keys (`model.dims`, `run.seed`, ...).

    Saved in every checkpoint's manifest; a resume compares them key by key and names each change.
    """
    tree = to_tree(cfg)
    picked: dict[str, object] = {}
    for key in RESUME_INVARIANT_KEYS:
        node = tree
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            picked.update({f"{key}.{k}": v for k, v in flatten(node).items()})
        else:
            picked[key] = node
    return picked


def resume_hash(cfg: TrainConfig) -> str:
    """Hash of the config fields a resumed run must share with the run that saved the checkpoint."""
    return hashlib.sha256(json.dumps(resume_invariants(cfg), sort_keys=True).encode()).hexdigest()[:16]


def config_docs_markdown() -> str:
    """docs/config.md: every field of every section with its type, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m pretrain.config --docs > docs/config.md` from the declarations in",
        "`pretrain/config.py` and `data_pipeline/config.py`; a test keeps it in sync.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, typ, default, text in field_docs(TrainConfig):
        lines.append(f"| `{key}` | {typ} | `{default}` | {text} |".replace("`` ", "` ` "))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.config", description=__doc__)
    parser.add_argument("--docs", action="store_true", help="print the configuration reference (markdown)")
    parser.add_argument("--config", help="a config file to validate and print resolved")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.docs:
        sys.stdout.write(config_docs_markdown())
        return 0
    if not args.config:
        parser.error("give --docs or --config FILE")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_yaml(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
