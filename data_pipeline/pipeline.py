"""DALI pipelines for training and evaluation, and the one place where CPU and GPU differ.

A pipeline reads a fixed list of samples: `paths[i]` with the index file `index_paths[i]` listing the
samples to read from that tar, in order (written by `segment.py`). The reader never shuffles: the order
is decided by `order.py`, so it does not depend on DALI internals and survives a change of world size.

CPU and GPU differ only here (`Placement`): the decoder device ("cpu" or "mixed" = nvJPEG), its nvJPEG
buffer sizing (mixed only), where the outputs live, and the CUDA stream they are consumed on. The batch
reaches the trainer without a host-device sync: GPU outputs are bound to torch's current stream
(`pipe.run(stream)`) and copied on it; CPU outputs bound for a GPU go through pinned host memory and one
`non_blocking` copy (`to_torch`, `to_device`).

Output dtype: DALI emits float32 (its `crop_mirror_normalize` offers FLOAT, FLOAT16, INT8, UINT8; there is
no bfloat16). fp32 training takes DALI's output as it is; bf16 training casts once, on the training
device, in the loader (`loader.model_input`). A FLOAT16 detour would save the on-device cast of one batch
but round twice (fp32 -> fp16 -> bf16), which can differ from the direct rounding; not worth it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# ImageNet channel statistics on the 0-255 scale (the CoAtNet recipes use the usual ImageNet values)
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass(frozen=True)
class Placement:
    """Where DALI decodes (`decoder`: "cpu" | "mixed"), runs the other ops ("cpu" | "gpu"), which GPU, and
    the decoder's extra arguments (nvJPEG buffer sizing; empty on the CPU, where they do not apply)."""

    decoder: str
    ops: str
    device_id: int | None
    decoder_args: tuple[tuple[str, Any], ...] = ()

    def decoder_kwargs(self) -> dict[str, Any]:
        return dict(self.decoder_args)

    def consumer_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream the batches are consumed on (torch's current one); None for CPU outputs.

        Read at every batch, so a trainer that runs its step on another stream gets its batches there.
        """
        return torch.cuda.current_stream(self.device_id) if self.ops == "gpu" else None


def placement(decode: str, device: torch.device, gpu_decoder: Mapping[str, Any] | None = None) -> Placement:
    """The whole CPU/GPU difference of the input pipeline.

    decode "auto" decodes on the GPU (nvJPEG through `device="mixed"`) when the batches go to a CUDA
    device, on the CPU otherwise; CPU-only pipelines need device_id=None (-1 still touches CUDA).
    `gpu_decoder` (device_memory_padding, host_memory_padding, hw_decoder_load) reaches the decoder on
    the mixed path only: DALI documents them as "applies only to the mixed backend".
    """
    if decode not in {"auto", "cpu", "gpu"}:
        raise ValueError(f"data.decode must be 'auto', 'cpu' or 'gpu', got {decode!r}")
    on_gpu = device.type == "cuda"
    if decode == "gpu" and not on_gpu:
        raise ValueError(f"data.decode='gpu' needs a CUDA training device, got {device}")
    if on_gpu and decode != "cpu":
        index = device.index if device.index is not None else torch.cuda.current_device()
        args = tuple(sorted((gpu_decoder or {}).items()))
        return Placement(decoder="mixed", ops="gpu", device_id=index, decoder_args=args)
    return Placement(decoder="cpu", ops="cpu", device_id=None)


def to_torch(tensor_list: Any, device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Copy a uniform-shape DALI TensorList (CPU or GPU) into a new torch tensor on `device`, no host sync.

    GPU outputs are copied on `stream` (default: torch's current stream), asynchronously; `pipe.run(stream)`
    must have bound them to that stream, so that DALI reuses their memory only after the copy. CPU outputs bound for a CUDA device are copied into pinned host memory
    (torch's caching host allocator: a block is reused only after its copy finished), then moved with
    one non_blocking copy; from pageable memory that copy would block the host until the GPU caught up.
    """
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    dtype = to_torch_type[dense.dtype]
    if isinstance(tensor_list, TensorListGPU):
        out = torch.empty(dense.shape(), dtype=dtype, device=torch.device("cuda", dense.device_id()))
        feed_ndarray(dense, out, cuda_stream=stream or torch.cuda.current_stream(out.device))
        return out.to(device, non_blocking=True)  # no copy when it is there already
    out = torch.empty(dense.shape(), dtype=dtype, pin_memory=device.type == "cuda")
    feed_ndarray(dense, out)
    return out.to(device, non_blocking=True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (labels, masks) on `device` without a host sync: pinned + non_blocking on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def byte_samples(tensor_list: Any) -> list[bytes]:
    """The raw bytes of each sample of a CPU TensorList of uint8 (label components)."""
    return [bytes(tensor_list.at(i)) for i in range(len(tensor_list))]


def sample_ids(source_info: Any) -> list[str]:
    """ "<shard file name>/<key>" of each sample, from the reader's source info ("<tar>:<offset>:<member>")."""
    ids = []
    for raw in byte_samples(source_info):
        tar, _, member = raw.decode().rsplit(":", 2)
        ids.append(f"{tar.rsplit('/', 1)[-1]}/{member.split('.', 1)[0]}")
    return ids


@dataclass(frozen=True)
class TrainAugment:
    """Augmentation settings of the training pipeline (from DataConfig plus the model's image size)."""

    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    randaugment_layers: int
    randaugment_magnitude: int


def _reader(paths: list[str], index_paths: list[str], exts: list[str]) -> Any:
    from nvidia.dali import fn

    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=exts,
        missing_component_behavior="error",
        random_shuffle=False,
        name="reader",
    )


def train_pipeline(
    aug: TrainAugment,
    place: Placement,
    *,
    paths: list[str],
    index_paths: list[str],
    exts: list[str],
    batch_size: int,
    num_threads: int,
    prefetch: int,
    seed: int,
    checkpoint: bytes | None = None,
) -> Any:
    """Built training pipeline: outputs (images float32 NCHW normalised, raw label bytes, source info).

    Checkpointing is on: `pipe.checkpoint()` (about 7 KB, 0.4 ms, measured) captures the reader position
    and every random operator's state, so a rebuilt pipeline continues bit for bit.
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    @pipeline_def(enable_conditionals=aug.randaugment_layers > 0)
    def define() -> tuple[Any, Any]:
        jpegs, labels = _reader(paths, index_paths, exts)
        # ROI decoding: only the crop window is decoded (nvJPEG on GPU; same cost as full decode on CPU)
        images = fn.decoders.image_random_crop(
            jpegs,
            device=place.decoder,
            output_type=types.RGB,
            random_area=list(aug.scale),
            random_aspect_ratio=list(aug.ratio),
            num_attempts=10,
            **place.decoder_kwargs(),
        )
        images = fn.resize(images, size=[aug.image_size, aug.image_size])  # [H, W, 3] uint8
        if aug.randaugment_layers > 0:
            images = rand_augment.rand_augment(images, n=aug.randaugment_layers, m=aug.randaugment_magnitude)
        mirror = fn.random.coin_flip(probability=0.5) if aug.hflip else 0
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD, mirror=mirror
        )  # [3, S, S] float32
        return images, labels, fn.get_property(jpegs, key="source_info")

    pipe = define(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=place.device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )
    pipe.build()
    return pipe


def eval_pipeline(
    image_size: int,
    crop_ratio: float,
    place: Placement,
    *,
    paths: list[str],
    index_paths: list[str],
    exts: list[str],
    batch_size: int,
    num_threads: int,
    prefetch: int,
) -> Any:
    """Built evaluation pipeline: resize the shorter side to image_size / crop_ratio, center crop.

    Outputs (images float32 NCHW normalised, raw label bytes, source info)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def define() -> tuple[Any, Any]:
        jpegs, labels = _reader(paths, index_paths, exts)
        images = fn.decoders.image(
            jpegs, device=place.decoder, output_type=types.RGB, **place.decoder_kwargs()
        )
        images = fn.resize(images, resize_shorter=round(image_size / crop_ratio))
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=(image_size, image_size), mean=MEAN, std=STD
        )
        return images, labels, fn.get_property(jpegs, key="source_info")

    pipe = define(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=place.device_id,
        prefetch_queue_depth=prefetch,
        seed=0,
    )
    pipe.build()
    return pipe
