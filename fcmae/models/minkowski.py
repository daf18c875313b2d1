"""The sparse ConvNeXt V2 encoder written with MinkowskiEngine layers: the official formulation, as an optional
backend (``create_fcmae(..., backend="minkowski")``), an independent oracle for ``sparse.py`` and a benchmark.

The official way: the dense stem runs on the whole image, its output at visible positions becomes a
``MinkowskiEngine.SparseTensor`` (coordinates ``(batch, row, col)``), and every later layer is a sparse layer:
channel-wise 7x7 convolution (``MinkowskiChannelwiseConvolution``, submanifold: outputs only at the input
coordinates), LayerNorm / Linear / GELU on the features, GRN, and 2x2 stride-2 sparse convolution
(``MinkowskiConvolution``) for downsampling. Two deliberate differences from the official code:

- GRN pools per sample (over that sample's visible positions), not over the whole batch as the official
  ``MinkowskiGRN`` does; so an image gives the same features alone and in a batch, as in ``sparse.py``;
- the sparse tensor is built from the mask, not from the non-zero entries of the masked stem output.

Parameters are those of the dense model (``ConvNeXtV2Trunk``: same names, same shapes). The MinkowskiEngine
modules live beside them, unregistered (``state_dict`` is exactly the dense one): their LayerNorm and Linear are
ours (shared modules), and their convolution ``kernel``/``bias`` are computed from our weights at every forward, so
gradients flow to our parameters. The kernel offset order is read from MinkowskiEngine's own kernel map, not
assumed. ``official_state_dict`` / ``load_official_state_dict`` export and import the official checkpoint layout
from these live modules.

MinkowskiEngine is optional: build it with ``scripts/install_minkowski.sh``. Its CPU kernels run in fp32 only, so
the encoder disables autocast inside.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcmae.models.convnextv2 import GRN, STRIDE, AdoptedTrunk, Block, ConvNeXtV2Trunk, check_image_size, gather_rows
from fcmae.models.stage import Stage, set_grad_checkpointing

INSTALL_HINT = "scripts/install_minkowski.sh"
SparseTensor = Any  # MinkowskiEngine.SparseTensor (the library is optional, so not imported for annotations)


def import_minkowski() -> ModuleType:
    """``import MinkowskiEngine``, or an ``ImportError`` in one line that names the install script."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
            import MinkowskiEngine
    except ImportError as exc:
        raise ImportError(
            f"the 'minkowski' backend needs MinkowskiEngine, which cannot be imported ({exc}); "
            f"build and install it with {INSTALL_HINT}"
        ) from exc
    return MinkowskiEngine


def minkowski_available() -> bool:
    """Whether ``import MinkowskiEngine`` works here."""
    try:
        import_minkowski()
    except ImportError:
        return False
    return True


def _like(x: SparseTensor, feats: Tensor) -> SparseTensor:
    """A sparse tensor with ``x``'s coordinates and new features ``(M, C')``."""
    me = import_minkowski()
    return me.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


# --- kernel offsets, read from the library ----------------------------------------------------------------------

def kernel_offsets(me_conv: nn.Module) -> list[tuple[int, int]]:
    """``(d_row, d_col)`` of each kernel index of a live MinkowskiEngine 2-D convolution, from its kernel map.

    A probe sparse tensor holding a full square grid goes through the module's own kernel generator; for each
    kernel index the (input - output) coordinate difference of every pair it maps must be one constant offset.
    """
    me = import_minkowski()
    gen = me_conv.kernel_generator
    side = 2 * max(gen.kernel_size)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).int()
    probe = me.SparseTensor(torch.zeros(len(coords), 1), coordinates=coords)
    cm, in_key = probe.coordinate_manager, probe.coordinate_map_key
    region_type, region_offset, _ = gen.get_kernel(probe.tensor_stride, False)
    out_key = cm.stride(in_key, gen.kernel_stride)
    kmap = cm.kernel_map(in_key, out_key, gen.kernel_stride, gen.kernel_size, gen.kernel_dilation,
                         region_type=region_type, region_offset=region_offset)
    c_in, c_out = probe.C, cm.get_coordinates(out_key)
    offsets = []
    for k in range(gen.kernel_volume):
        pairs = kmap[k].long()
        d = (c_in[pairs[0], 1:] - c_out[pairs[1], 1:]).unique(dim=0)
        if d.shape[0] != 1:
            raise RuntimeError(f"kernel index {k} maps several offsets {d.tolist()}")
        offsets.append((int(d[0, 0]), int(d[0, 1])))
    return offsets


def dense_positions(offsets: list[tuple[int, int]], kernel_size: int) -> tuple[int, ...]:
    """For each MinkowskiEngine kernel index (its ``(d_row, d_col)`` offset), the flat ``i * K + j`` position in a
    PyTorch ``(.., K, K)`` weight. PyTorch's odd ``K`` with padding ``K//2`` reads ``x[y + i - K//2]``; an even ``K``
    (here the 2x2 stride-2 conv, no padding) reads ``x[s*y + i]``."""
    low = -(kernel_size // 2) if kernel_size % 2 else 0
    flat = tuple((dr - low) * kernel_size + (dc - low) for dr, dc in offsets)
    if sorted(flat) != list(range(kernel_size * kernel_size)):
        raise RuntimeError(f"MinkowskiEngine offsets {offsets} do not tile a {kernel_size}x{kernel_size} kernel")
    return flat


def weight_to_kernel(weight: Tensor, positions: tuple[int, ...], depthwise: bool) -> Tensor:
    """PyTorch ``(C_out, C_in, K, K)`` -> MinkowskiEngine ``(K*K, C_in, C_out)``; depthwise ``(C, 1, K, K)`` ->
    ``(K*K, C)``. Differentiable (an index and a permute)."""
    idx = torch.tensor(positions, device=weight.device)
    kernel = weight.flatten(2).index_select(2, idx).permute(2, 1, 0)
    return (kernel.squeeze(1) if depthwise else kernel).contiguous()  # the library's C++ kernels require it


def kernel_to_weight(kernel: Tensor, positions: tuple[int, ...], depthwise: bool) -> Tensor:
    """Inverse of ``weight_to_kernel``: ``(K*K, C_in, C_out)`` or ``(K*K, C)`` -> ``(C_out, C_in, K, K)``."""
    if depthwise:
        kernel = kernel.unsqueeze(1)
    volume, c_in, c_out = kernel.shape
    k = int(round(volume**0.5))
    out = kernel.new_empty(c_out, c_in, volume)
    out[:, :, torch.tensor(positions, device=kernel.device)] = kernel.permute(2, 1, 0)
    return out.reshape(c_out, c_in, k, k)


# --- MinkowskiEngine modules bound to our parameters -------------------------------------------------------------

class _BoundConv(nn.Module):
    """A live MinkowskiEngine convolution whose ``kernel``/``bias`` are computed from a PyTorch ``nn.Conv2d``.

    The library module's own parameters are removed; ``forward`` sets ``kernel`` (in the library's layout, from
    ``src.weight``) and ``bias`` ``(1, C_out)``, runs the library's forward, then clears them.
    """

    def __init__(self, me_conv: nn.Module, src: nn.Conv2d, depthwise: bool) -> None:
        super().__init__()
        self.me = me_conv
        object.__setattr__(self, "src", src)  # not a submodule: its parameters belong to the trunk
        self.kernel_shape = tuple(me_conv.kernel.shape)
        self.depthwise = depthwise
        self.positions = dense_positions(kernel_offsets(me_conv), me_conv.kernel_generator.kernel_size[0])
        del me_conv._parameters["kernel"]
        del me_conv._parameters["bias"]
        me_conv.kernel = None
        me_conv.bias = None

    def kernel(self) -> Tensor:
        """``src.weight`` in the library's layout: ``(K*K, C)`` channel-wise or ``(K*K, C_in, C_out)``."""
        kernel = weight_to_kernel(self.src.weight, self.positions, self.depthwise)
        if tuple(kernel.shape) != self.kernel_shape:
            raise RuntimeError(f"kernel shape {tuple(kernel.shape)} != MinkowskiEngine's {self.kernel_shape}")
        return kernel

    def bias(self) -> Tensor:
        """``src.bias`` as the library's ``(1, C_out)``."""
        return self.src.bias.reshape(1, -1)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self.me.kernel, self.me.bias = self.kernel(), self.bias()
        try:
            return self.me(x)
        finally:
            self.me.kernel, self.me.bias = None, None


class _SparseLayerNorm(nn.Module):
    """LayerNorm over a sparse tensor's features (stock MinkowskiEngine 0.5.4 has none); ``ln`` is ours (an
    ``nn.LayerNorm`` or the channels-first ``LayerNorm2d``: only its parameters are used)."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.ln = ln

    def forward(self, x: SparseTensor) -> SparseTensor:
        ln = self.ln
        return _like(x, F.layer_norm(x.F, ln.normalized_shape, ln.weight, ln.bias, ln.eps))


class _SparseGRN(nn.Module):
    """GRN on sparse features ``(M, C)``, the norm pooled per sample over its own positions (batch index
    ``x.C[:, 0]``), statistics in fp32. The official ``MinkowskiGRN`` pools over the whole batch."""

    def __init__(self, grn: GRN) -> None:
        super().__init__()
        object.__setattr__(self, "src", grn)  # gamma/beta belong to the trunk; exported as (1, C)

    def forward(self, x: SparseTensor) -> SparseTensor:
        f = x.F
        b = x.C[:, 0].long().to(f.device)
        sd = torch.promote_types(f.dtype, torch.float32)
        sq = torch.zeros(int(b.max()) + 1, f.shape[1], dtype=sd, device=f.device).index_add_(0, b, f.to(sd).square())
        nonzero = sq > 0  # an all-zero channel (e.g. GELU underflow) has norm 0 and gradient 0, not NaN
        gx = torch.where(nonzero, torch.where(nonzero, sq, 1.0).sqrt(), 0.0)  # (N, C)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + self.src.eps)).to(f.dtype)
        return _like(x, f + self.src.gamma * (f * nx[b]) + self.src.beta)


class _SparseDropPath(nn.Module):
    """Drop path per sample on sparse features, drawing its per-sample mask exactly as the trunk's ``DropPath``
    does on a ``(N, ...)`` tensor (same random numbers, same order), so both backends drop the same samples."""

    def __init__(self, drop_path: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "src", drop_path)

    def forward(self, x: SparseTensor, num_samples: int) -> SparseTensor:
        if isinstance(self.src, nn.Identity) or not self.src.training or self.src.drop_prob == 0.0:
            return x
        scale = self.src(x.F.new_ones(num_samples, 1))  # (N, 1): 0 or 1/keep_prob
        return _like(x, x.F * scale[x.C[:, 0].long().to(x.F.device)])


class _SparseBlock(nn.Module):
    """The official sparse block: dwconv -> norm -> pwconv1 -> GELU -> GRN -> pwconv2, residual with drop path."""

    def __init__(self, blk: Block, me: ModuleType) -> None:
        super().__init__()
        dim = blk.dwconv.in_channels
        k = blk.dwconv.kernel_size[0]
        self.dwconv = _BoundConv(me.MinkowskiChannelwiseConvolution(dim, kernel_size=k, bias=True, dimension=2),
                                 blk.dwconv, depthwise=True)
        self.norm = _SparseLayerNorm(blk.norm)
        self.pwconv1 = me.MinkowskiLinear(dim, 4 * dim)
        self.pwconv1.linear = blk.pwconv1
        self.act = me.MinkowskiGELU()
        self.grn = _SparseGRN(blk.grn)
        self.pwconv2 = me.MinkowskiLinear(4 * dim, dim)
        self.pwconv2.linear = blk.pwconv2
        self.drop_path = _SparseDropPath(blk.drop_path)

    def forward(self, x: SparseTensor, num_samples: int) -> SparseTensor:
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(self.dwconv(x))))))
        return x + self.drop_path(y, num_samples)


class _OfficialLayout(nn.Module):
    """The official encoder's module tree (``downsample_layers``, ``stages``) made of MinkowskiEngine modules bound to
    a trunk's parameters; its module paths are the official checkpoint's key prefixes."""

    def __init__(self, trunk: ConvNeXtV2Trunk, me: ModuleType) -> None:
        super().__init__()
        with warnings.catch_warnings():  # the library instantiates autograd Functions (deprecated in torch)
            warnings.filterwarnings("ignore", message=".*should not be instantiated.*", category=DeprecationWarning)
            self._build(trunk, me)

    def _build(self, trunk: ConvNeXtV2Trunk, me: ModuleType) -> None:
        self.downsample_layers = nn.ModuleList([trunk.downsample_layers[0]])  # dense stem (as in the official code)
        for i in range(1, 4):
            ln, conv = trunk.downsample_layers[i]
            me_conv = me.MinkowskiConvolution(conv.in_channels, conv.out_channels, kernel_size=2, stride=2, bias=True,
                                              dimension=2)
            bound = _BoundConv(me_conv, conv, depthwise=False)
            self.downsample_layers.append(nn.Sequential(_SparseLayerNorm(ln), bound))
        self.stages = nn.ModuleList(Stage(_SparseBlock(blk, me) for blk in stage) for stage in trunk.stages)


# --- the encoder --------------------------------------------------------------------------------------------------

class MinkowskiConvNeXtV2(AdoptedTrunk):
    """ConvNeXt V2 encoder computed with MinkowskiEngine sparse layers; drop-in for ``SparseConvNeXtV2``, made the
    same way: from a dense trunk whose modules it adopts.

    ``forward(imgs, keep)``: imgs ``(N, in_chans, H, W)`` with ``H, W`` multiples of 32, keep ``(N, K)`` visible
    cell indices on the ``H/32 x W/32`` grid (ascending) -> ``(N, K, C_last)`` final-stage features in the order of
    ``keep``. Same parameters (names, shapes, initialisation) as the dense model; the bound MinkowskiEngine modules
    are in ``self.official`` (not registered, so ``state_dict`` holds only the trunk's parameters).
    """

    def __init__(self, trunk: ConvNeXtV2Trunk) -> None:
        me = import_minkowski()
        if not trunk.use_grn or trunk.block_args["ls_init_value"] is not None:
            raise ValueError("the minkowski backend builds ConvNeXt V2 blocks with GRN only (not model.use_grn=false, "
                             "not ConvNeXt V1's LayerScale blocks); use model.backend=torch")
        super().__init__(trunk)
        object.__setattr__(self, "official", _OfficialLayout(trunk, me))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block of the MinkowskiEngine stages (``self.official``, not a registered
        child); their blocks take and return SparseTensors, which ``torch.utils.checkpoint`` passes through."""
        set_grad_checkpointing(self.official, enable)

    def _to_sparse(self, imgs: Tensor, keep: Tensor) -> SparseTensor:
        """Dense stem on the whole image; its ``(N, C0, H/4, W/4)`` output at the visible positions becomes a sparse
        tensor with coordinates ``(batch, row, col)`` on the H/4 grid (every visible cell is 8x8 positions)."""
        me = import_minkowski()
        stem = self.downsample_layers[0](imgs).permute(0, 2, 3, 1)  # (N, H/4, W/4, C0)
        n, k = keep.shape
        r = STRIDE // 4
        grid_w = imgs.shape[3] // STRIDE
        d = torch.arange(r, device=keep.device)
        rows = (torch.div(keep, grid_w, rounding_mode="floor")[:, :, None, None] * r + d[:, None]).expand(n, k, r, r)
        cols = ((keep % grid_w)[:, :, None, None] * r + d).expand(n, k, r, r)
        batch = torch.arange(n, device=keep.device)[:, None, None, None].expand(n, k, r, r)
        coords = torch.stack([batch, rows, cols], dim=-1).reshape(-1, 3)
        feats = stem[coords[:, 0], coords[:, 1], coords[:, 2]]  # (N*K*64, C0)
        return me.SparseTensor(feats, coordinates=coords.int().contiguous())

    @staticmethod
    def _to_tokens(x: SparseTensor, keep: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """Final sparse tensor (one position per visible cell, tensor stride 8) -> tokens ``(N, K, C)`` in ``keep``'s
        order."""
        n, c = keep.shape[0], x.F.shape[1]
        coords = x.C.long().to(x.F.device)
        s = x.tensor_stride[0]
        flat = coords[:, 0] * (grid_h * grid_w) + (coords[:, 1] // s) * grid_w + coords[:, 2] // s
        grid = x.F.new_zeros(n * grid_h * grid_w, c).index_copy(0, flat, x.F).view(n, grid_h * grid_w, c)
        return gather_rows(grid, keep)

    def forward(self, imgs: Tensor, keep: Tensor) -> Tensor:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (N, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        n, _, height, width = imgs.shape
        check_image_size(height, width)
        if keep.ndim != 2 or keep.shape[0] != n:
            raise ValueError(f"keep must have shape (N={n}, K), got {tuple(keep.shape)}")
        # MinkowskiEngine's CPU kernels take fp32/fp64 only: no autocast inside the encoder
        with torch.autocast(imgs.device.type, enabled=False):
            x = self._to_sparse(imgs.to(self.downsample_layers[0][0].weight.dtype), keep)
            for i in range(4):
                if i > 0:
                    x = self.official.downsample_layers[i](x)
                x = self.official.stages[i](x, n)
        return self._to_tokens(x, keep, height // STRIDE, width // STRIDE)


# --- the official checkpoint layout, from the live modules -------------------------------------------------------

def _official_entries(encoder: MinkowskiConvNeXtV2) -> Iterator[tuple[str, nn.Parameter, Any, Any]]:
    """``(official key, our parameter, ours -> official, official -> ours)`` for every encoder parameter."""
    tree = encoder.official
    for name, p in tree.named_parameters():  # stem, ``.ln.``, ``.linear.``: shared modules, same tensors
        yield name, p, (lambda t: t), (lambda t: t)
    for path, mod in tree.named_modules():
        if isinstance(mod, _BoundConv):
            yield (f"{path}.kernel", mod.src.weight, lambda _t, m=mod: m.kernel(),
                   lambda t, m=mod: kernel_to_weight(t, m.positions, m.depthwise))
            yield f"{path}.bias", mod.src.bias, lambda _t, m=mod: m.bias(), lambda t: t.reshape(-1)
        elif isinstance(mod, _SparseGRN):
            for attr in ("gamma", "beta"):
                yield f"{path}.{attr}", getattr(mod.src, attr), lambda t: t.reshape(1, -1), lambda t: t.reshape(-1)


def official_state_dict(encoder: MinkowskiConvNeXtV2, prefix: str = "encoder.") -> dict[str, Tensor]:
    """The encoder's weights in the official FCMAE checkpoint layout, read off the live MinkowskiEngine modules.

    Stem ``downsample_layers.0.*`` dense; ``….ln.*`` LayerNorm; ``….linear.*`` Linear; convolution ``kernel`` in the
    library's own shape and offset order (``(K*K, C)`` channel-wise, ``(4, C_in, C_out)`` downsample), biases
    ``(1, C)``; GRN ``gamma``/``beta`` ``(1, 4C)``. Keys under ``prefix`` (the official checkpoint uses ``encoder.``).
    """
    with torch.no_grad():
        return {prefix + key: to_official(p).detach().clone() for key, p, to_official, _ in _official_entries(encoder)}


def load_official_state_dict(encoder: MinkowskiConvNeXtV2, state_dict: Mapping[str, Tensor],
                             prefix: str = "encoder.") -> None:
    """Load an official-layout encoder (keys under ``prefix``; others, e.g. the decoder, ignored): strict on keys and
    shapes, converting kernels with the offset order read from the library."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    entries = {key: (p, to_ours) for key, p, _, to_ours in _official_entries(encoder)}
    missing, unexpected = sorted(set(entries) - set(sd)), sorted(set(sd) - set(entries))
    if missing or unexpected:
        raise KeyError(f"official layout mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for key, (p, to_ours) in entries.items():
            t = to_ours(sd[key])
            if t.shape != p.shape:
                raise ValueError(f"{prefix}{key}: shape {tuple(sd[key].shape)} does not fit {tuple(p.shape)}")
            p.copy_(t)
