"""The sparse ConvNeXt V2 encoder: computes only at visible positions, with submanifold semantics.

Representation. Features are tokens ``(N, T, C)``, channels last, holding only visible positions. The mask is
chosen on the final 1/32 grid, so at stage ``s`` every visible cell is a whole ``r x r`` block of positions
(``r = 8, 4, 2, 1``) and every image has the same number ``K`` of visible cells: ``T = K * r * r`` is the
same for all images and the batch is a regular tensor (static shapes, no ragged batches).

Token order. Cells appear in ascending cell index (``kept_indices``); inside a cell, positions follow the
recursive 2x2 (Morton / Z) order, bits ``y_{b-1} x_{b-1} ... y_0 x_0``. Then every 2x2 downsampling window is
four consecutive tokens, children ordered ``(0,0), (0,1), (1,0), (1,1)``, and the parents come out in Morton
order of the coarser stage. So:

- stem (4x4 conv, stride 4): one matmul on the visible 32x32 pixel patches, unfolded by reshape/permute;
- downsample (LayerNorm, 2x2 conv, stride 2): LayerNorm on tokens, a free reshape to ``(N, T/4, 4C)``, one
  matmul with the conv weight viewed as ``(C_out, 4C)``;
- LayerNorm, both Linears, GELU, GRN, residual, drop path: on tokens only;
- GRN: its global norm is a per-sample reduction over the token axis, i.e. over visible positions only;
- 7x7 depthwise conv: tokens are scattered into a zeroed dense grid, convolved, and gathered back. Removed
  positions hold zeros, so they never contribute to visible ones: submanifold sparse convolution.

Parameters are exactly those of the dense model (``ConvNeXtV2Trunk``): same names, same shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcmae.models.convnextv2 import STRIDE, AdoptedTrunk, check_image_size, gather_rows
from fcmae.models.dwconv import compute_dtype, depthwise_input_grad, depthwise_weight_grad

_MORTON: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _morton_tables(num_bits: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
    m = torch.arange(4**num_bits, device=device)
    row = torch.zeros_like(m)
    col = torch.zeros_like(m)
    for j in range(num_bits):
        row |= ((m >> (2 * j + 1)) & 1) << j
        col |= ((m >> (2 * j)) & 1) << j
    return row, col


def morton_decode(num_bits: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``(row, col)`` int64 vectors of length ``4**num_bits``: position of each Morton index in a square block.

    Built once per ``(num_bits, device)`` and cached (a per-shape constant: rebuilding it every forward costs a
    dozen small kernel launches per stage); the returned tensors are shared, never modify them in place. Under
    ``torch.compile`` they are computed in the graph instead (constant-folded there).
    """
    if torch.compiler.is_compiling():
        return _morton_tables(num_bits, device)
    key = (num_bits, torch.device(device if device is not None else "cpu"))
    if key not in _MORTON:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable by any later forward
            _MORTON[key] = _morton_tables(num_bits, key[1])
    return _MORTON[key]


def flat_positions(keep: Tensor, grid_w: int, r: int) -> Tensor:
    """Flat indices into an ``(N * h*r * w*r)`` position list for tokens ordered as described above.

    keep: ``(N, K)`` visible cell indices on the ``h x w`` final grid. Returns ``(N * K * r * r,)`` int64.
    """
    n = keep.shape[0]
    row, col = morton_decode(r.bit_length() - 1, keep.device)
    cy = torch.div(keep, grid_w, rounding_mode="floor")
    cx = keep - cy * grid_w
    y = cy.unsqueeze(-1) * r + row  # (N, K, r*r)
    x = cx.unsqueeze(-1) * r + col
    width = grid_w * r
    return (y * width + x).reshape(n, -1)


class SparseContext:
    """Per-forward index tables: for each stage, flat positions of the tokens in the batch's dense grid."""

    def __init__(self, keep: Tensor, grid_h: int, grid_w: int) -> None:
        self.n = keep.shape[0]
        self.keep = keep
        self.grid_h, self.grid_w = grid_h, grid_w
        self._index: dict[int, Tensor] = {}

    def index(self, r: int) -> Tensor:
        """``(N * T,)`` flat index into ``(N * h*r * w*r)`` for the stage with ``r x r`` positions per cell."""
        if r not in self._index:
            pos = flat_positions(self.keep, self.grid_w, r)  # (N, T)
            offs = torch.arange(self.n, device=pos.device).unsqueeze(1) * (self.grid_h * r * self.grid_w * r)
            self._index[r] = (pos + offs).reshape(-1)
        return self._index[r]


def _scatter_rows(x: Tensor, idx: Tensor, num_rows: int) -> Tensor:
    """``(R, C)`` rows -> ``(num_rows, C)`` zeros with the rows at ``idx`` (unique indices)."""
    out = x.new_zeros(num_rows, x.shape[-1])
    out.index_copy_(0, idx, x)
    return out


class _SparseDWConv(torch.autograd.Function):
    """scatter -> dense depthwise conv -> gather, with a hand-written backward.

    Autograd's version of this chain zero-fills and clones full-size grids several times and turns the gather's
    backward into a scatter-add (slow and single-threaded on CPU). Indices are unique, so plain index copies
    suffice; the dense grid is not kept for backward (rebuilt from the tokens), which also saves memory. The
    weight gradient is ``depthwise_weight_grad`` (a grouped forward convolution, several times faster on CPU).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor, shape: tuple[int, int, int]
                ) -> Tensor:
        n, hs, ws = shape
        t, c = x.shape[1], x.shape[2]
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            grid = _scatter_rows(x.reshape(n * t, c).to(dt), idx, n * hs * ws).view(n, hs, ws, c).permute(0, 3, 1, 2)
            k = weight.shape[-1]
            # bias added on the tokens, not in the conv: cheaper (visible positions only)
            y = F.conv2d(grid, weight.to(dt), None, padding=k // 2, groups=c)
            out = y.permute(0, 2, 3, 1).reshape(n * hs * ws, c).index_select(0, idx).view(n, t, c)
            if bias is not None:
                out = out + bias.to(dt)
        ctx.save_for_backward(x, weight, idx)
        ctx.shape, ctx.dt = shape, dt
        ctx.has_bias = bias is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, idx = ctx.saved_tensors
        n, hs, ws = ctx.shape
        t, c = x.shape[1], x.shape[2]
        dt = ctx.dt
        grid = _scatter_rows(x.reshape(n * t, c).to(dt), idx, n * hs * ws).view(n, hs, ws, c).permute(0, 3, 1, 2)
        g = _scatter_rows(grad_out.reshape(n * t, c).to(dt), idx, n * hs * ws).view(n, hs, ws, c).permute(0, 3, 1, 2)
        w = weight.to(dt)
        grad_x = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = depthwise_input_grad(g, grid, w)
            grad_x = gx.permute(0, 2, 3, 1).reshape(n * hs * ws, c).index_select(0, idx).view(n, t, c).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = depthwise_weight_grad(grid, g, w.shape[-1]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum(dim=(0, 1), dtype=torch.promote_types(grad_out.dtype, torch.float32)).to(weight.dtype)
        return grad_x, gw, gb, None, None


def sparse_dwconv(x: Tensor, conv: nn.Conv2d, ctx: SparseContext, r: int) -> Tensor:
    """Submanifold depthwise conv on tokens ``(N, T, C)`` -> ``(N, T, C)``: scatter, dense conv, gather."""
    shape = (x.shape[0], ctx.grid_h * r, ctx.grid_w * r)
    return _SparseDWConv.apply(x, conv.weight, conv.bias, ctx.index(r), shape)


class _StageConv:
    """The submanifold depthwise conv of one stage, handed to ``Block.forward(tokens, sparse_dwconv=...)``."""

    def __init__(self, ctx: SparseContext, r: int) -> None:
        self.ctx, self.r = ctx, r
        # built here, before the stage runs: a block recomputed under activation checkpointing (or traced inside
        # torch.compile's checkpoint region) then only reads the cache, and never mutates state there
        ctx.index(r)

    def __call__(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        return sparse_dwconv(x, conv, self.ctx, self.r)


def _layer_norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class SparseConvNeXtV2(AdoptedTrunk):
    """ConvNeXt V2 encoder that runs on visible cells only, made from a dense trunk (SparK's
    ``dense_model_to_sparse`` shape): it adopts the trunk's stem, downsample layers and stages, so its parameters
    are the dense model's, names and shapes, and nothing here restates the architecture.

    ``forward(imgs, keep)``: imgs ``(N, in_chans, H, W)`` with ``H, W`` multiples of 32, keep ``(N, K)`` visible
    cell indices on the ``H/32 x W/32`` grid (ascending, see ``fcmae.models.masking.kept_indices``) ->
    ``(N, K, C_last)`` final-stage features, one token per visible cell, in the order of ``keep``.
    """

    def _stem(self, imgs: Tensor, keep: Tensor) -> Tensor:
        """Visible 32x32 patches -> ``(N, K*64, C0)`` tokens (before the stem LayerNorm)."""
        n, cin, height, width = imgs.shape
        h, w = height // STRIDE, width // STRIDE
        k = keep.shape[1]
        patches = imgs.reshape(n, cin, h, STRIDE, w, STRIDE).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, -1)
        patches = gather_rows(patches, keep)
        # 32 = 2*2*2*4 per axis: Morton bits (y2 x2 y1 x1 y0 x0) over 4x4 pixel blocks, then (c, py, px) per block
        patches = patches.reshape(n, k, cin, 2, 2, 2, 4, 2, 2, 2, 4)
        patches = patches.permute(0, 1, 3, 7, 4, 8, 5, 9, 2, 6, 10).reshape(n, k * 64, cin * 16)
        conv = self.downsample_layers[0][0]
        return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)

    @staticmethod
    def _downsample(x: Tensor, ds: nn.Sequential) -> Tensor:
        """LayerNorm + 2x2 stride-2 conv on Morton-ordered tokens: ``(N, T, C)`` -> ``(N, T/4, C_out)``."""
        ln, conv = ds[0], ds[1]
        x = _layer_norm(x, ln)
        n, t, c = x.shape
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)  # (C_out, (dy, dx, c))
        return F.linear(x.reshape(n, t // 4, 4 * c), weight, conv.bias)

    def forward(self, imgs: Tensor, keep: Tensor) -> Tensor:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (N, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        n, _, height, width = imgs.shape
        check_image_size(height, width)
        h, w = height // STRIDE, width // STRIDE
        if keep.ndim != 2 or keep.shape[0] != n:
            raise ValueError(f"keep must have shape (N={n}, K), got {tuple(keep.shape)}")
        ctx = SparseContext(keep, h, w)
        x = _layer_norm(self._stem(imgs, keep), self.downsample_layers[0][1])
        for i in range(4):
            r = 8 >> i
            if i > 0:
                x = self._downsample(x, self.downsample_layers[i])
            x = self.stages[i](x, sparse_dwconv=_StageConv(ctx, r))
        return x


def tokens_to_grid(tokens: Tensor, keep: Tensor, grid_h: int, grid_w: int, fill: Tensor | None = None) -> Tensor:
    """Final-stage tokens ``(N, K, C)`` -> ``(N, h*w, C)`` with ``fill`` (default zeros) at removed cells."""
    n, _, c = tokens.shape
    if fill is None:
        base = tokens.new_zeros(n, grid_h * grid_w, c)
    else:
        base = fill.to(tokens.dtype).expand(n, grid_h * grid_w, c)
    return torch.scatter(base, 1, keep.unsqueeze(-1).expand(-1, -1, c), tokens)
