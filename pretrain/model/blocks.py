"""CoAtNet building blocks: stem, MBConv, relative attention, Transformer block (docs/coatnet.md section 2).

Layouts: convolutional blocks take and return (B, C, H, W) tensors (channels-last memory is kept by the
convs); Transformer blocks take and return (B, H, W, C) tensors, so attention and the MLP see tokens as a
free view and 2x2 pooling needs no transpose. All residual blocks are pre-norm: x <- x + f(Norm(x)).
BatchNorm (``layers.BatchNorm2d``) is used in the convolutional blocks as in the paper; LayerNorm in the
Transformer blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BatchNorm2d, Conv2d, DropPath, Linear, SqueezeExcite, max_pool_nhwc, trunc_normal_
from .relative_bias import (
    TABLE_SUFFIX,
    interpolate_table,
    relative_position_index,
    resize_relative_bias_tables,
    table_shape,
)


class Stem(nn.Module):
    """S0: conv 3x3 stride 2 -> [BN -> GELU -> conv 3x3] x (depth - 1); nothing after the last conv."""

    def __init__(self, in_chans: int, dim: int, depth: int, bn_eps: float, bn_momentum: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2d(in_chans, dim, 3, stride=2, padding=1, bias=depth == 1)]
        for i in range(1, depth):
            layers += [
                BatchNorm2d(dim, eps=bn_eps, momentum=bn_momentum),
                nn.GELU(),
                # Only the last conv has a bias: every earlier one is followed by BatchNorm.
                Conv2d(dim, dim, 3, stride=1, padding=1, bias=i == depth - 1),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, C_in, H, W) -> (B, dim, H/2, W/2)


class MBConv(nn.Module):
    """Pre-norm inverted residual with squeeze-excitation; expansion and SE widths follow D_out.

    Downsampling (stride 2) puts the stride on the first 1x1 conv (``downsample="conv1x1"``, the paper's
    Eq. 5) or on the depthwise conv (``"depthwise"``, its Table 9 variant); the shortcut is a 2x2 max pool,
    then a 1x1 projection only where the width changes.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        stride: int,
        downsample: str,
        expand_ratio: int,
        se_ratio: float,
        drop_path: float,
        bn_eps: float,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        mid = expand_ratio * dim_out
        stride_1x1 = stride if downsample == "conv1x1" else 1
        stride_dw = stride if downsample == "depthwise" else 1
        self.pool = nn.MaxPool2d(2, 2) if stride == 2 else nn.Identity()
        self.proj = Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()
        self.norm = BatchNorm2d(dim_in, eps=bn_eps, momentum=bn_momentum)
        self.conv_expand = Conv2d(dim_in, mid, 1, stride=stride_1x1, bias=False)
        self.norm1 = BatchNorm2d(mid, eps=bn_eps, momentum=bn_momentum)
        self.conv_dw = Conv2d(mid, mid, 3, stride=stride_dw, padding=1, groups=mid, bias=False)
        self.norm2 = BatchNorm2d(mid, eps=bn_eps, momentum=bn_momentum)
        self.se = SqueezeExcite(mid, int(se_ratio * dim_out))
        self.conv_project = Conv2d(mid, dim_out, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, D_in, H, W) -> (B, D_out, H/s, W/s)
        shortcut = self.proj(self.pool(x))
        y = F.gelu(self.norm1(self.conv_expand(self.norm(x))))
        y = F.gelu(self.norm2(self.conv_dw(y)))
        y = self.conv_project(self.se(y))
        return shortcut + self.drop_path(y)


class RelativeAttention(nn.Module):
    """Multi-head self-attention with a learned relative-position bias added to the logits.

    The table is sized for the token grid of the configured image size. At that grid the forward uses it
    directly; at any other grid (another input resolution) it is bilinearly resized on the fly, inside
    this forward (so under ZeRO-3 it only touches this module's own, gathered, parameter). Loading a
    state dict resizes a table of another resolution to this module's size (see ``_resize_on_load``).
    """

    def __init__(self, dim_in: int, dim_out: int, head_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.heads = dim_out // head_dim
        self.head_dim = head_dim
        self.grid = grid
        # q, k, v map D_in -> D_out directly (the downsampling block changes width inside attention).
        self.qkv = Linear(dim_in, 3 * dim_out)
        self.proj = Linear(dim_out, dim_out)
        self.table_shape = table_shape(self.heads, grid)
        self.relative_position_bias_table = nn.Parameter(trunc_normal_(torch.empty(self.table_shape)))
        # Recomputable from the grid, so not saved in checkpoints.
        self.register_buffer("relative_position_index", _padded_index(grid), persistent=False)
        self.register_load_state_dict_pre_hook(_resize_on_load)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the index buffer (e.g. after ``to_empty`` from the meta device)."""
        device = self.relative_position_bias_table.device
        self.relative_position_index = _padded_index(self.grid, device=device)

    def relative_bias(self, grid: tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """(heads, N, N) additive logits bias for an H x W grid, N = H*W, in ``dtype``.

        The result is a view whose rows are padded to a multiple of 8 elements: CUDA's memory-efficient
        SDPA kernel needs that alignment and would otherwise pad (copy) the bias on every call.
        """
        table = self.relative_position_bias_table
        if grid == self.grid:
            index = self.relative_position_index
        else:
            table = interpolate_table(table, (2 * grid[0] - 1, 2 * grid[1] - 1))
            index = _padded_index(grid, device=table.device)
        n = grid[0] * grid[1]
        # Cast the small table, not the (heads, N, N) bias: one cast of a few KB, and the gather then
        # writes the aligned bias directly in the compute dtype.
        table = table.to(dtype or table.dtype)
        bias = table.flatten(1).index_select(1, index.view(-1)).view(self.heads, n, index.shape[1])
        return bias[..., :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        # (B, N, 3*D) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x.reshape(b, n, -1)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # SDPA wants the float mask in the query dtype (bf16 under autocast).
        out = biased_attention(q, k, v, self.relative_bias((h, w), q.dtype))  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(b, h, w, self.heads * self.head_dim)
        return self.proj(out)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (B, heads, N, d) q/k/v and a (heads, N, N) bias.

    The bias goes to SDPA as a (1, heads, N, N) view, broadcast over the batch. The layout decides the
    kernel: on CPU a 3-D mask always takes the unfused math path, a 4-D one takes the fused flash kernel
    when the mask needs no gradient (inference; an S3 layer of CoAtNet-0, batch 8, fp32, 1 thread: SDPA
    100 -> 29 ms, the whole layer 174 -> 92 ms); in training the learned bias needs its gradient and
    CPU runs the math kernel either way. On CUDA the memory-efficient kernel (the one that takes a mask
    with a gradient) expands either layout to (B, heads, N, N) without a copy as long as every stride
    but the last is a multiple of 8 (aten's preprocess_mask): the padded rows of
    ``RelativeAttention.relative_bias`` give that, and unsqueeze keeps it (the new leading stride is
    heads x N x N_pad). Not measured on a GPU here.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


def _padded_index(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(N, N_pad) table index, N_pad = N rounded up to a multiple of 8; padding columns read entry 0."""
    index = relative_position_index(grid, device=device)
    n = index.shape[0]
    return F.pad(index, (0, -n % 8))


def _resize_on_load(
    module: RelativeAttention,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    *args: object,
) -> None:
    """load_state_dict pre-hook: bilinearly resize an incoming table of another resolution in place.

    The target shape comes from the module's configured grid, not from the parameter, so it is right
    even when the parameter itself is a ZeRO-3 shard. ``state_dict`` here is load_state_dict's own copy.
    """
    key = prefix + TABLE_SUFFIX
    if key in state_dict:
        resized, _ = resize_relative_bias_tables({key: state_dict[key]}, {key: module.table_shape})
        state_dict[key] = resized[key]


class Mlp(nn.Module):
    """Linear(D, r*D) -> GELU -> Linear(r*D, D) over the last dimension."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm relative-attention block on (B, H, W, C) tokens.

    With stride 2 (first block of a downsampling stage): x <- Proj(Pool(x)) + Attn(Pool(LN(x))).
    With stride 1 and a width change (first Transformer block of CoAtNet-6/7's split S3): no pooling,
    the shortcut is only projected. Then x <- x + FFN(LN(x)).
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        stride: int,
        head_dim: int,
        grid: tuple[int, int],
        mlp_ratio: int,
        drop_path: float,
        ln_eps: float,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.proj = Linear(dim_in, dim_out) if dim_in != dim_out else nn.Identity()
        self.norm1 = nn.LayerNorm(dim_in, eps=ln_eps)
        self.attn = RelativeAttention(dim_in, dim_out, head_dim, grid)
        self.norm2 = nn.LayerNorm(dim_out, eps=ln_eps)
        self.mlp = Mlp(dim_out, mlp_ratio * dim_out)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, D_in) -> (B, H/s, W/s, D_out)
        y = self.norm1(x)
        if self.stride == 2:
            x, y = max_pool_nhwc(x), max_pool_nhwc(y)
        x = self.proj(x) + self.drop_path(self.attn(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))
