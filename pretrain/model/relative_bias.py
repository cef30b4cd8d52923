"""Relative-position bias tables: lookup indices and bilinear resizing to another resolution.

A Transformer layer attending over an H x W token grid owns a table P of shape (heads, 2H-1, 2W-1); the
bias between tokens (i, j) and (i', j') is P[:, i-i'+H-1, j-j'+W-1] (docs/coatnet.md section 2).

Resizing (paper: bilinear interpolation per head) uses ``align_corners=False``: offset d on the new grid
then reads offset d * (2H-1)/(2H'-1) of the old one, close to the physical ratio H/H' of the two token
grids, and the zero offset maps exactly onto the zero offset. Resizing to the same shape returns the
table unchanged (bit for bit), and a constant table stays constant.

These functions are pure: they only look at the tensors and shapes they are given, so a trainer can call
``resize_relative_bias_tables`` on a state dict whose target model is sharded (ZeRO-3 partitioned
parameters report an empty ``shape``; pass their real shapes, e.g. ``param.ds_shape``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

# Parameter name suffix that marks a relative-position bias table in a CoAtNet state dict.
TABLE_SUFFIX = "relative_position_bias_table"


def table_shape(heads: int, grid: tuple[int, int]) -> torch.Size:
    """Shape (heads, 2H-1, 2W-1) of the table for an H x W token grid."""
    h, w = grid
    return torch.Size((heads, 2 * h - 1, 2 * w - 1))


def relative_position_index(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(N, N) int64 index into a flattened (2H-1)*(2W-1) table, N = H*W, row-major tokens."""
    h, w = grid
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): i - i', j - j'
    return (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)


def interpolate_table(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (heads, 2H-1, 2W-1) table to (heads, *size); same size -> the same tensor."""
    if tuple(table.shape[-2:]) == tuple(size):
        return table
    # interpolate wants (N, C, H, W): heads act as channels, so each head is resized on its own.
    # Computed in float32 so a bf16 checkpoint is not resized with bf16 rounding of the weights.
    resized = F.interpolate(table.float().unsqueeze(0), size=size, mode="bilinear", align_corners=False)
    return resized.squeeze(0).to(table.dtype)


def resize_relative_bias_tables(
    state_dict: Mapping[str, torch.Tensor], target_shapes: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return a copy of ``state_dict`` with every bias table resized to ``target_shapes[key]``.

    Only keys ending in ``relative_position_bias_table`` that also appear in ``target_shapes`` with a
    different shape are touched; every other entry, and empty ZeRO-3 placeholder tensors, are passed
    through (same tensor object). The second
    element lists the keys that were resized. A table whose head count differs cannot be interpolated
    and raises ValueError naming the key.
    """
    out = dict(state_dict)
    resized: list[str] = []
    for key, tensor in state_dict.items():
        if not key.endswith(TABLE_SUFFIX) or key not in target_shapes:
            continue
        target = torch.Size(target_shapes[key])
        # Same shape: nothing to do. Empty: a ZeRO-3 placeholder (DeepSpeed's own resume loads a
        # state dict of those through the model's load_state_dict); there is nothing to resize.
        if tensor.shape == target or tensor.numel() == 0:
            continue
        if tensor.ndim != 3 or len(target) != 3 or tensor.shape[0] != target[0]:
            raise ValueError(
                f"cannot resize relative-bias table '{key}' from {tuple(tensor.shape)} to {tuple(target)}: "
                "tables are (heads, 2H-1, 2W-1) and the head count must match"
            )
        out[key] = interpolate_table(tensor, (target[1], target[2]))
        resized.append(key)
    return out, resized
