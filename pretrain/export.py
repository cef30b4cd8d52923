"""`coatnet-export CHECKPOINT OUT.safetensors [--bf16]`: consolidated weights of a ZeRO-3 checkpoint.

Needs no engine, no GPU and no process group. DeepSpeed's `zero_to_fp32` merges every rank's fp32
master shards into whole tensors, one tensor at a time (lazy mode, the shards memory-mapped), and
`write_safetensors` writes each as it is made: new memory is one tensor at a time, beside the mapped
shards' pages (CoAtNet-7's fp32 export: 9.8 GB). BatchNorm buffers come from rank 0's file;
the trainer averages them over ranks before every save (`pretrain.checkpoint.average_batchnorm_stats`),
so they describe the data of all ranks.

Next to OUT.safetensors, OUT.json holds what a fine-tune needs to rebuild and feed the model: the
checkpoint's model card (`pretrain.card`: model name and config, image size, classes, label kind, step,
preprocessing) plus `dtype`, `tensors`, `source` and `saved_world_size`.

`pretrain.model.create_model_from_config(sidecar["model"]["config"])` rebuilds the model, and
`load_state_dict(safetensors.torch.load_file(OUT), strict=True)` loads the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import signing
from pretrain.card import check_card
from pretrain.checkpoint import (
    MANIFEST,
    TAG_RE,
    checksum_mismatches,
    read_manifest,
    structural_problem,
)

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "coatnet-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_checkpoint(path: Path) -> Path:
    """The committed tag folder `path` names: a tag folder itself, or a checkpoint root / run folder
    (its newest committed checkpoint). Raises FileNotFoundError/ValueError naming the path."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or folder")
    if (path / MANIFEST).exists() or TAG_RE.match(path.name):
        problem = structural_problem(path)
        if problem:
            raise ValueError(f"{path}: not a committed checkpoint ({problem})")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = sorted((p for p in root.iterdir() if TAG_RE.match(p.name)), reverse=True)
    for tag in tags:
        problem = structural_problem(tag)
        if problem is None:
            return tag
        log.warning("skipping incomplete checkpoint %s: %s", tag, problem)
    raise FileNotFoundError(f"{path}: holds no committed checkpoint (step_*/{MANIFEST})")


@dataclass(frozen=True)
class LazyTensor:
    """One whole tensor of a checkpoint, made on demand: its name, shape and (output) dtype are known
    before its bytes are."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def consolidated_tensors(tag_dir: Path, dtype: torch.dtype = torch.float32) -> list[LazyTensor]:
    """Every tensor of the model in its order, as `LazyTensor`s in `dtype` (parameters from the fp32
    master shards, buffers from rank 0; integer buffers keep their dtype).

    DeepSpeed's lazy mode maps the optimizer shards (mmap) and merges one tensor's slices when asked, so
    only the tensor being made is new memory; the mapped shards are page cache."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)

    def entry(name: str, value) -> LazyTensor:
        out = dtype if value.dtype.is_floating_point else value.dtype

        def make() -> torch.Tensor:
            tensor = value if isinstance(value, torch.Tensor) else value.contiguous()
            return tensor.to(out).contiguous()

        return LazyTensor(name, tuple(value.shape), out, make)

    return [entry(name, value) for name, value in lazy.items()]


def consolidated_state_dict(tag_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All of `consolidated_tensors` at once, each in its own storage (for comparisons in memory)."""
    return {t.name: t.make().clone() for t in consolidated_tensors(tag_dir, dtype)}


# safetensors' dtype names (the format: 8-byte little-endian header length, a JSON header of
# {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the tensors' raw bytes).
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: list[LazyTensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time: the header from the shapes and dtypes, then each
    tensor's bytes as it is made. New memory is one tensor, not the model (safetensors' own `save_file`
    takes a dict of all of them: a second copy of the model at export)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        size = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for t in tensors:
            made = t.make()
            if tuple(made.shape) != t.shape or made.dtype != t.dtype:
                raise RuntimeError(
                    f"{t.name}: made {made.dtype} {tuple(made.shape)}, expected {t.dtype} {t.shape}"
                )
            out.write(made.reshape(-1).view(torch.uint8).numpy().data)
        out.flush()
        os.fsync(out.fileno())


def sidecar(tag_dir: Path, dtype_name: str, num_tensors: int) -> dict:
    """The JSON written next to the weights: the checkpoint's model card plus this file's own fields."""
    manifest = read_manifest(tag_dir)
    card = check_card((manifest.get("meta") or {}).get("card") or {}, str(tag_dir / MANIFEST))
    return {
        **card,
        "dtype": dtype_name,
        "tensors": num_tensors,
        "source": str(tag_dir.resolve()),
        "saved_world_size": manifest["world_size"],
    }


def sidecar_path(out: Path) -> Path:
    """OUT.safetensors -> OUT.json."""
    return out.with_suffix(".json")


def export(
    checkpoint: Path,
    out: Path,
    *,
    dtype_name: str = "fp32",
    verify: bool = True,
    force: bool = False,
    trust_unsigned: bool = False,
) -> dict:
    """Write `out` (safetensors) and its JSON sidecar from a committed checkpoint. Returns the sidecar.

    An existing `out` is replaced only with `force`; the weights are written under a temporary name that
    is removed whatever happens, and renamed into place only when complete.
    """
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the path of the .safetensors file to write")
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must end in .safetensors")
    if not force and (out.exists() or sidecar_path(out).exists()):
        raise ValueError(f"{out}: exists already; pass --force to replace it")
    tag_dir = resolve_checkpoint(checkpoint)
    if not signing.check(
        read_manifest(tag_dir), str(tag_dir), trust_unsigned=trust_unsigned, opt_in="--trust-unsigned"
    ):
        log.warning("%s: not signed by your key; exporting it because of --trust-unsigned", tag_dir)
    if verify:
        bad = checksum_mismatches(tag_dir)
        if bad:
            raise ValueError(f"{tag_dir}: {', '.join(bad)} fail their checksums in {MANIFEST}")
    tensors = list(consolidated_tensors(tag_dir, DTYPES[dtype_name]))
    info = sidecar(tag_dir, dtype_name, len(tensors))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    header = {"model": info["model"]["name"], "step": str(info["step"]), "sidecar": sidecar_path(out).name}
    try:
        write_safetensors(tmp, tensors, header)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors leaves 0600; exports are for sharing
        sidecar_path(out).write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(out)  # never a half-written OUT under its final name
    finally:
        tmp.unlink(missing_ok=True)
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coatnet-export`."""
    parser = argparse.ArgumentParser(prog="coatnet-export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a step_* folder, a checkpoint folder or a run folder")
    parser.add_argument("out", type=Path, help="OUT.safetensors (the sidecar goes to OUT.json)")
    parser.add_argument("--bf16", action="store_true", help="store floating-point tensors in bfloat16")
    parser.add_argument("--no-verify", action="store_true", help="skip recomputing the manifest's checksums")
    parser.add_argument("--force", action="store_true", help="replace OUT (and its sidecar) if it exists")
    parser.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="export a checkpoint your key did not sign (someone else's): you vouch for its pickles",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
    try:
        info = export(
            args.checkpoint,
            args.out,
            dtype_name="bf16" if args.bf16 else "fp32",
            verify=not args.no_verify,
            force=args.force,
            trust_unsigned=args.trust_unsigned,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"coatnet-export: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} ({info['tensors']} tensors, {info['dtype']}, {info['model']['name']} at step "
        f"{info['step']}) and {sidecar_path(args.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
