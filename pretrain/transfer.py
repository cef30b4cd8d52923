"""Initial weights for fine-tuning: an exported .safetensors file (`coatnet-export`, or a run's ema.safetensors).

Loaded after the model is built (under zero.Init) and before the DeepSpeed engine exists, so that the
optimizer's fp32 master weights start from the loaded values. The state dict is adapted to the model:
the classifier is dropped and re-initialised for a new label space (`init.reset_head`, or whenever its
shape differs), every relative-bias table is resized bilinearly to the fine-tune resolution, and any
other shape difference is an error naming the key. Missing, unexpected, resized and re-initialised keys
are reported (log and MLflow), never silently ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pretrain import dist
from pretrain.config import InitConfig
from pretrain.model import resize_relative_bias_tables
from pretrain.model.relative_bias import TABLE_SUFFIX

log = logging.getLogger(__name__)

HEAD_PREFIX = "head.fc."


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"initial weights from {self.source}: {len(self.loaded)} tensors loaded"]
        for name in ("resized", "reinitialised", "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                out.append(f"  {name} ({len(keys)}): {', '.join(keys)}")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class Export:
    """An export (.safetensors: tensors only, nothing in it can run code), read lazily.

    Shapes come from the file's header; a tensor is read from the memory-mapped file when asked for, so
    a rank holds one tensor at a time instead of the whole model (2.7 GB for CoAtNet-5, 9.8 GB for -7),
    and a rank that does not need a tensor never reads it.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="pt")

    def names(self) -> set[str]:
        return set(self._file.keys())

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._file.get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def open_export(path: Path) -> Export:
    """The export at `path`, checked to be a .safetensors file (a checkpoint folder holds pickles)."""
    if path.is_dir():
        raise ValueError(
            f"init.path: {path} is a folder; initial weights come from an export: "
            f"run `coatnet-export {path} OUT.safetensors` and set init.path=OUT.safetensors"
        )
    if not path.is_file():
        raise FileNotFoundError(f"init.path: {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"init.path: {path} is not a .safetensors export (see coatnet-export)")
    return Export(path)


def _full_shape(tensor: torch.Tensor) -> torch.Size:
    """The whole tensor's shape, also for a ZeRO-3 partitioned parameter (whose .shape is empty)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def _targets(model: torch.nn.Module) -> dict[str, torch.Size]:
    shapes = {name: _full_shape(p) for name, p in model.named_parameters()}
    for mod_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                shapes[f"{mod_name}.{name}" if mod_name else name] = buf.shape
    return shapes


def adapt(
    export: Export, targets: dict[str, torch.Size], *, reset_head: bool, source: str
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Decide what to load into a model whose tensors have `targets` (name -> full shape), from the
    export's header alone, and resize the relative-bias tables whose grid differs (small: heads x
    (2H-1) x (2W-1)). Returns those resized tables and the report; `report.loaded` names every key to
    load, read from the export except where the first element holds a resized table."""
    report = LoadReport(source=source)
    shapes = {key: export.shape(key) for key in export.names()}
    for key in [k for k in shapes if k.startswith(HEAD_PREFIX)]:
        if reset_head or (key in targets and shapes[key] != targets[key]):
            del shapes[key]
    report.reinitialised = sorted(k for k in targets if k.startswith(HEAD_PREFIX) and k not in shapes)
    tables = {k: export.tensor(k) for k in shapes if k in targets and k.endswith(TABLE_SUFFIX)}
    tables = {k: t for k, t in tables.items() if t.shape != targets[k]}
    resized, names = resize_relative_bias_tables(tables, targets)
    report.resized = sorted(names)  # the export's key order is its writer's, not a promise
    shapes.update({k: t.shape for k, t in resized.items()})
    for key, shape in shapes.items():
        if key in targets and shape != targets[key]:
            raise ValueError(
                f"init.path: {source}: '{key}' has shape {tuple(shape)}, the model needs {tuple(targets[key])}"
            )
    report.unexpected = sorted(set(shapes) - set(targets))
    report.missing = sorted(set(targets) - set(shapes) - set(report.reinitialised))
    report.loaded = sorted(set(shapes) & set(targets))
    return resized, report


@torch.no_grad()
def _assign(model: torch.nn.Module, export: Export, keys: set[str], resized: dict[str, torch.Tensor]) -> None:
    """Copy `keys` into the model one module at a time, reading each tensor from the export when needed.

    Under ZeRO-3 only that module's parameters are gathered, and rank 0 alone reads and writes them:
    GatheredParameters(modifier_rank=0) broadcasts rank 0's values and re-partitions on exit. Buffers
    and parameters that are not partitioned are read on every rank.
    """
    import deepspeed

    reader = dist.rank() == 0

    def value(key: str) -> torch.Tensor:
        return resized[key] if key in resized else export.tensor(key)

    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if prefix + n in keys]
        partitioned = [p for _, p in params if hasattr(p, "ds_id")]
        gather = (
            deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
            if partitioned
            else contextlib.nullcontext()
        )
        with gather:
            for name, param in params:
                if reader or not hasattr(param, "ds_id"):
                    param.data.copy_(value(prefix + name).to(param.dtype))
        for name, buf in module.named_buffers(recurse=False):
            if prefix + name in keys:
                buf.copy_(value(prefix + name).to(buf.dtype))


def load_initial_weights(model: torch.nn.Module, cfg: InitConfig) -> LoadReport:
    """Load `cfg.path` into `model` (collective under ZeRO-3: every rank calls it)."""
    path = Path(cfg.path)
    export = open_export(path)
    resized, report = adapt(export, _targets(model), reset_head=cfg.reset_head, source=str(path))
    _assign(model, export, set(report.loaded), resized)
    for line in report.lines():
        log.info(line)
    return report
