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

from pretrain.config import InitConfig
from pretrain.model import resize_relative_bias_tables

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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights of an export (.safetensors: tensors only, nothing in it can run code)."""
    if path.is_dir():
        raise ValueError(
            f"init.path: {path} is a folder; initial weights come from an export: "
            f"run `coatnet-export {path} OUT.safetensors` and set init.path=OUT.safetensors"
        )
    if not path.is_file():
        raise FileNotFoundError(f"init.path: {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"init.path: {path} is not a .safetensors export (see coatnet-export)")
    from safetensors.torch import load_file

    return load_file(str(path))


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
    state_dict: dict[str, torch.Tensor], targets: dict[str, torch.Size], *, reset_head: bool, source: str
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Drop/resize to fit `targets` (name -> full shape). Pure function: no model, no ranks."""
    report = LoadReport(source=source)
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.startswith(HEAD_PREFIX)]:
        if reset_head or (key in targets and state_dict[key].shape != targets[key]):
            del state_dict[key]
    report.reinitialised = sorted(k for k in targets if k.startswith(HEAD_PREFIX) and k not in state_dict)
    state_dict, report.resized = resize_relative_bias_tables(state_dict, targets)
    for key, tensor in state_dict.items():
        if key in targets and tensor.shape != targets[key]:
            raise ValueError(
                f"init.path: {source}: '{key}' has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(targets[key])}"
            )
    report.unexpected = sorted(set(state_dict) - set(targets))
    report.missing = sorted(set(targets) - set(state_dict) - set(report.reinitialised))
    report.loaded = sorted(set(state_dict) & set(targets))
    return {k: state_dict[k] for k in report.loaded}, report


@torch.no_grad()
def _assign(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy into the model one module at a time; under ZeRO-3 only that module's parameters are gathered."""
    import deepspeed

    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if prefix + n in state_dict]
        partitioned = [p for _, p in params if hasattr(p, "ds_id")]
        # modifier_rank=0: every rank writes the same values; rank 0's are re-partitioned on exit.
        gather = (
            deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
            if partitioned
            else contextlib.nullcontext()
        )
        with gather:
            for name, param in params:
                param.data.copy_(state_dict[prefix + name].to(param.dtype))
        for name, buf in module.named_buffers(recurse=False):
            if prefix + name in state_dict:
                buf.copy_(state_dict[prefix + name].to(buf.dtype))


def load_initial_weights(model: torch.nn.Module, cfg: InitConfig) -> LoadReport:
    """Load `cfg.path` into `model` (collective under ZeRO-3: every rank calls it)."""
    path = Path(cfg.path)
    state_dict, report = adapt(
        read_state_dict(path), _targets(model), reset_head=cfg.reset_head, source=str(path)
    )
    _assign(model, state_dict)
    for line in report.lines():
        log.info(line)
    return report
