"""Dense ConvNeXt V2 (Woo et al., CVPR 2023) and V1 (Liu et al., CVPR 2022) with a registry of variants.

Internally the network runs channels-last: feature maps are ``(N, C, H, W)`` tensors in
``torch.channels_last`` memory format, so ``x.permute(0, 2, 3, 1)`` is a free view on which
LayerNorm and the two Linears of every block run as plain matmuls.

Parameter names follow the official dense ConvNeXt V2 code (``downsample_layers``, ``stages``,
``dwconv``, ``pwconv1``, ``grn``, ``pwconv2``, ``norm``, ``head``), except that GRN's ``gamma`` and
``beta`` are stored as ``(4C,)`` vectors; a V1 block's LayerScale is ``gamma`` ``(C,)``, as in the official
V1 code. The two families differ only in the block's channel-mixing finisher (``Block``). The sparse encoder
(``sparse.py``) reuses these modules, so the dense and sparse encoders have identical state dict keys and shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from fcmae.models.dwconv import depthwise_conv
from fcmae.models.registry import get_variant, pretrained_cfg
from fcmae.models.stage import Stage, set_grad_checkpointing

STRIDE = 32  # total stride of the encoder: stem 4 x three 2x downsamples
_STAGE_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.")
_DOWNSAMPLE_RE = re.compile(r"^downsample_layers\.(\d+)\.")


def check_image_size(height: int, width: int, stride: int = STRIDE) -> None:
    """Raise a clear error unless both sides are positive multiples of ``stride``."""
    if height <= 0 or width <= 0 or height % stride or width % stride:
        raise ValueError(
            f"image size {height}x{width} (HxW) is not supported: height and width must be positive "
            f"multiples of {stride} (the encoder's total stride)"
        )


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[n, rows[n]]`` for every sample: x ``(N, L, D)``, rows ``(N, R)`` int64 -> ``(N, R, D)``."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``(N, C, H, W)`` map (any memory format)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _grn_scale(x: Tensor, gamma: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, ...]:
    """GRN's statistics of channels-last ``x``, in fp32 (fp64 stays fp64 for gradcheck): ``Gx = ||x||_2`` over
    ``dims`` per sample and channel, ``m = mean_c Gx + eps``, ``Nx = Gx / m`` and the scale ``s = 1 + gamma * Nx``
    (all shaped like ``x`` with ``dims`` kept as 1)."""
    sd = torch.promote_types(x.dtype, torch.float32)
    xs = x if x.dtype == sd else x.to(sd)
    # square+sum: multi-threaded on CPU, unlike vector_norm over several dims (~2x faster there)
    gx = xs.square().sum(dim=dims, keepdim=True).sqrt()
    m = gx.mean(dim=-1, keepdim=True) + eps
    nx = gx / m
    return gx, m, nx, 1.0 + gamma.to(sd) * nx


def _grn_norm_grad(gs: Tensor, gamma: Tensor, gx: Tensor, m: Tensor) -> Tensor:
    """Given ``gs = dL/ds``, the factor ``r`` with ``dL/dx = (dL/dy) * s + x * r`` (the path through ``Gx``)."""
    grad_nx = gs * gamma.to(gs.dtype)
    grad_gx = grad_nx / m - (grad_nx * gx).sum(dim=-1, keepdim=True) / (m * m * gx.shape[-1])
    return torch.where(gx > 0, grad_gx / gx.clamp_min(1e-30), torch.zeros_like(gx))


class _GRNFunction(torch.autograd.Function):
    """GRN with a fused backward: ``out = x * (1 + gamma * Nx) + beta``, ``Nx = Gx / (mean_c Gx + eps)``,
    ``Gx = ||x||_2`` over ``dims`` per sample and channel, statistics in fp32.

    Autograd's version makes ~8 passes over the (large, 4C-wide) activation in backward; this one makes 3:
    ``sum(g * x)``, ``sum(g)`` and ``g * s + x * r``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
        gx, m, nx, s = _grn_scale(x, gamma, dims, eps)
        ctx.save_for_backward(x, gamma, gx, m, nx, s)
        ctx.dims = dims
        return torch.addcmul(beta.to(x.dtype), x, s.to(x.dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, gamma, gx, m, nx, s = ctx.saved_tensors
        dims = ctx.dims
        g = g.contiguous()
        lead = tuple(range(g.ndim - 1))
        sd = gx.dtype
        gs = (g * x).sum(dim=dims, keepdim=True, dtype=sd)  # dL/ds per sample and channel
        grad_gamma = (gs * nx).sum(dim=lead).to(gamma.dtype) if ctx.needs_input_grad[1] else None
        grad_beta = g.sum(dim=lead, dtype=sd).to(gamma.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            r = _grn_norm_grad(gs, gamma, gx, m)
            grad_x = torch.addcmul(g * s.to(g.dtype), x, r.to(x.dtype))
        return grad_x, grad_gamma, grad_beta, None, None


class _GRNLinear(torch.autograd.Function):
    """``linear(grn(x))`` for token-major ``x`` ``(N, T, D)`` without materialising GRN's output.

    GRN scales each sample's channels by ``s[n] = 1 + gamma * Nx[n]`` and adds ``beta``; folded into the Linear
    that follows, that is one matmul per sample with the weight ``W * s[n]`` and the bias ``b + W @ beta``:
    ``y[n] = x[n] @ (W * s[n]).T + b + W @ beta``. The backward gets GRN's ``sum_t(g * x)`` for free from the
    per-sample weight gradient ``P[n] = gy[n].T @ x[n]`` (``(C, D)``): ``dL/ds[n] = sum_c P[n] * W``. This saves
    four passes over the 4C-wide activation (GRN's output, ``g * x``, its sum, ``g * s``). Worth it where the
    per-sample weights are small next to the activation (``T >= C``: the early stages); see ``_fuse_grn_linear``.
    Statistics in fp32 (fp64 stays fp64); matmuls in ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, bias: Tensor | None, eps: float
                ) -> Tensor:
        gx, m, nx, s = _grn_scale(x, gamma, (1,), eps)  # (N, 1, D) each
        sd = gx.dtype
        w = weight.to(sd)
        ws = (w * s).to(x.dtype)  # (N, C, D): per-sample weights
        b_eff = w @ beta.to(sd) if bias is None else torch.addmv(bias.to(sd), w, beta.to(sd))
        ctx.save_for_backward(x, gamma, beta, weight, gx, m, nx, s, ws)
        ctx.has_bias = bias is not None
        return torch.baddbmm(b_eff.to(x.dtype), x, ws.transpose(1, 2))

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, gamma, beta, weight, gx, m, nx, s, ws = ctx.saved_tensors
        sd = gx.dtype
        gy = gy.to(x.dtype)
        p = torch.bmm(gy.transpose(1, 2), x).to(sd)  # (N, C, D)
        w = weight.to(sd)
        gsum = gy.sum(dim=(0, 1), dtype=sd)  # (C,)
        gs = (p * w).sum(dim=1, keepdim=True)  # (N, 1, D): dL/ds = sum_t (dL/d grn(x)) * x
        need = ctx.needs_input_grad
        grad_gamma = (gs * nx).sum(dim=(0, 1)).to(gamma.dtype) if need[1] else None
        grad_beta = (gsum @ w).to(beta.dtype) if need[2] else None
        grad_w = torch.addr((p * s).sum(dim=0), gsum, beta.to(sd)).to(weight.dtype) if need[3] else None
        grad_b = gsum.to(weight.dtype) if ctx.has_bias and need[4] else None
        grad_x = None
        if need[0]:
            r = _grn_norm_grad(gs, gamma, gx, m)
            grad_x = torch.bmm(gy, ws).addcmul_(x, r.to(x.dtype))  # (gy @ W) * s + x * r
        return grad_x, grad_gamma, grad_beta, grad_w, grad_b, None


class GRN(nn.Module):
    """Global Response Normalisation on channels-last features.

    The global feature norm is taken per sample over the spatial/token axes ``dims`` and in fp32,
    whatever the input dtype. ``gamma`` and ``beta`` have shape ``(C,)`` and start at zero, so a
    fresh GRN is the identity.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor, dims: tuple[int, ...] = (1, 2)) -> Tensor:
        """x: ``(N, ..., C)`` channels-last; ``dims`` are the axes pooled per sample."""
        return _GRNFunction.apply(x, self.gamma, self.beta, tuple(dims), self.eps)


def _fuse_grn_linear(tokens: Tensor, linear: nn.Linear) -> bool:
    """Use ``_GRNLinear`` for ``linear(grn(tokens))``? Only where its per-sample weights ``(N, C, 4C)`` are no
    larger than the activation ``(N, T, 4C)`` (``T >= C``: ConvNeXt V2's stages 0-1 at 224 px, sparse or dense;
    later stages and the decoder have few positions and wide channels). Under autocast only when the activation
    already has autocast's dtype, so the fused matmuls run in the dtype the plain Linear would."""
    device = tokens.device.type
    if torch.is_autocast_enabled(device) and tokens.dtype != torch.get_autocast_dtype(device):
        return False
    return tokens.shape[1] >= linear.out_features


class Block(nn.Module):
    """ConvNeXt block: dwconv 7x7 -> LayerNorm -> Linear 4x -> GELU -> [GRN] -> Linear -> [LayerScale], residual.

    The finisher of the channel mixing comes from the variant's record: ConvNeXt V2 has GRN after the activation
    (``use_grn``), ConvNeXt V1 a learned per-channel scale ``gamma`` ``(C,)`` of the MLP's output, initialised to
    ``ls_init_value`` (LayerScale). ``use_grn=False`` without LayerScale is the ablation of the ConvNeXt V2 paper.
    Absent parts have no parameters at all (``grn``/``gamma`` are None).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7, use_grn: bool = True,
                 ls_init_value: float | None = None) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if use_grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _scale(self, y: Tensor) -> Tensor:
        """LayerScale of the MLP's channels-last output ``(..., C)`` (identity without one), in ``y``'s dtype."""
        return y if self.gamma is None else y * self.gamma.to(y.dtype)

    def mlp(self, x: Tensor) -> Tensor:
        """The per-position part on channels-last ``(N, ..., C)`` input -> same shape; GRN pools each sample over
        all axes between the first and the last (the visible tokens of the sparse encoder, ``H, W`` when dense)."""
        return self._scale(self._mix(self._expand(x)))

    def _mix(self, x: Tensor) -> Tensor:
        """[GRN ->] the last Linear: the expansion's output ``(N, ..., 4C)`` -> ``(N, ..., C)``."""
        if self.grn is None:
            return self.pwconv2(x)
        n, d = x.shape[0], x.shape[-1]
        tokens = x.reshape(n, -1, d)  # a view for token-major and channels-last maps
        if _fuse_grn_linear(tokens, self.pwconv2):
            y = _GRNLinear.apply(tokens, self.grn.gamma, self.grn.beta, self.pwconv2.weight, self.pwconv2.bias,
                                 self.grn.eps)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return self.pwconv2(self.grn(x, dims=tuple(range(1, x.ndim - 1))))

    def _expand(self, x: Tensor) -> Tensor:
        """LayerNorm -> Linear 4x -> GELU: channels-last ``(..., C)`` -> ``(..., 4C)``, the expansion layer."""
        return self.act(self.pwconv1(self.norm(x)))

    def _dwconv(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> the depthwise conv's output as a channels-last ``(N, H, W, C)`` view."""
        dw = self.dwconv
        # bias added apart from the conv (a cheap pass whose gradient is a per-channel sum); depthwise_conv's
        # weight gradient is a grouped forward convolution, several times faster than oneDNN's on CPU
        y = depthwise_conv(x, dw.weight).permute(0, 2, 3, 1)
        return y + dw.bias.to(y.dtype)

    def forward(self, x: Tensor, sparse_dwconv: Callable[[Tensor, nn.Conv2d], Tensor] | None = None,
                rows: Tensor | None = None) -> Tensor:
        """Dense: x ``(N, C, H, W)``, preferably channels_last -> same shape.

        Sparse: x tokens ``(N, T, C)`` and ``sparse_dwconv(tokens, self.dwconv) -> (N, T, C)`` the submanifold
        depthwise conv (``fcmae.models.sparse``); everything after it runs on the tokens. ``rows``: the dense
        block's output at those positions only (``forward_rows``). Every path goes through this ``forward``, so
        module hooks (FSDP's per-block wrapping among them: it gathers the block's parameters) see every call.
        """
        if rows is not None:
            return self.forward_rows(x, rows)
        if sparse_dwconv is not None:
            return x + self.drop_path(self.mlp(sparse_dwconv(x, self.dwconv)))
        y = self.mlp(self._dwconv(x))  # (N, H, W, C)
        return x + self.drop_path(y.permute(0, 3, 1, 2))

    def forward_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        """The block's output at chosen positions only: x ``(N, C, H, W)``, rows ``(N, R)`` flat ``y * W + x``
        indices -> ``(N, R, C)`` (call it as ``block(x, rows=rows)``, so that module hooks run). Everything up to
        GRN runs on the whole map (the depthwise conv needs the neighbours, GRN's statistics all positions); the last
        Linear and the residual only at ``rows``."""
        n, c = x.shape[:2]
        h = self._expand(self._dwconv(x))  # (N, H, W, 4C)
        if self.grn is not None:
            h = self.grn(h, dims=(1, 2))
        h = gather_rows(h.reshape(n, -1, h.shape[-1]), rows)
        shortcut = gather_rows(x.permute(0, 2, 3, 1).reshape(n, -1, c), rows)
        return shortcut + self.drop_path(self._scale(self.pwconv2(h)))


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=4, stride=4), LayerNorm2d(dim, eps=1e-6))


def _downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2))


class ConvNeXtV2Trunk(nn.Module):
    """The encoder's modules (stem, downsample layers, stages) without a forward: the one constructor of the
    architecture. The dense classifier extends it; the sparse encoders adopt a built trunk's modules
    (``SparseConvNeXtV2(trunk)``), so their parameters are these, by construction."""

    def __init__(self, *, depths: Sequence[int], dims: Sequence[int], in_chans: int = 3, drop_path_rate: float = 0.0,
                 use_grn: bool = True, ls_init_value: float | None = None) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 stages, got depths={depths} dims={dims}")
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.use_grn = use_grn
        # the block's finisher (``Block``): GRN (V2) and/or LayerScale (V1); the FCMAE decoder builds its blocks alike
        self.block_args: dict[str, Any] = {"use_grn": use_grn, "ls_init_value": ls_init_value}
        # "single" (one layer per block) or "group" (the official rule of base/large/huge): see group_matcher
        self.layer_decay_type = "single"
        self.downsample_layers = nn.ModuleList([_stem(in_chans, dims[0])])
        for i in range(3):
            self.downsample_layers.append(_downsample(dims[i], dims[i + 1]))
        total = sum(depths)
        # plain Python (not torch.linspace) so the model can be built on the meta device
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            blocks = [Block(dims[i], rates[cur + j], **self.block_args) for j in range(depths[i])]
            self.stages.append(Stage(blocks))
            cur += depths[i]
        self.num_features = dims[-1]
        # timm's feature_info: what detection/segmentation necks take from a backbone, one entry per stage
        self.feature_info = [{"num_chs": dims[i], "reduction": 4 << i, "module": f"stages.{i}"} for i in range(4)]

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """Layer ordinals of parameter names for layer-wise lr decay (timm's ``group_matcher`` interface: timm ranks
        the ordinals into consecutive layer ids 0 .. last, and the head is the last layer).

        fine (``coarse=False``, the official ``single`` rule): one layer per block; the stem shares the first
        block's layer and each downsample layer the first block of its stage; final norm + head come last.
        coarse (the official ``group`` rule of base/large/huge, for any depths): stem; stage 0; stage 1 with its
        downsample; stage 2 in groups of three consecutive blocks, its downsample with the first; stage 3 with its
        downsample; final norm + head. For depths (3, 3, 27, 3) these are the official ids 0 .. 13.
        ``layer_decay_type = "group"`` makes the coarse rule the default, so timm's ``param_groups_layer_decay``
        (which asks for ``coarse=False``) takes the model as it is.
        """

        coarse = coarse or self.layer_decay_type == "group"

        def ordinal(name: str) -> tuple[float, ...]:
            if m := _DOWNSAMPLE_RE.match(name):
                stage, block = int(m[1]), 0
            elif m := _STAGE_RE.match(name):
                stage, block = int(m[1]), int(m[2])
            else:
                return (math.inf,)
            if not coarse:
                return (stage, block)
            if _DOWNSAMPLE_RE.match(name) and stage == 0:
                return (0,)
            return (stage + 1, block // 3) if stage == 2 else (stage + 1,)

        return ordinal

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay besides the 1-D ones and biases: none in ConvNeXt (GRN gamma/beta,
        LayerScale gamma and LayerNorm weights are 1-D). timm's ConvNeXt defines none either (its optimizer factory
        then exempts exactly the 1-D parameters, as ``fcmae.train.trainer.param_groups`` does)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block in every stage (timm's method; ``fcmae.models.stage``)."""
        set_grad_checkpointing(self, enable)

    def init_weights(self) -> None:
        """Truncated normal (std .02) for conv/linear weights, zero biases; LayerNorm 1/0; GRN 0/0; LayerScale
        ``ls_init_value`` (set when built)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class AdoptedTrunk(nn.Module):
    """Base of the sparse encoders: made from a built ``ConvNeXtV2Trunk`` whose stem, downsample layers and stages
    it adopts (so its parameters are the dense model's, names and shapes), with the trunk's architecture facts."""

    set_grad_checkpointing = ConvNeXtV2Trunk.set_grad_checkpointing

    def __init__(self, trunk: ConvNeXtV2Trunk) -> None:
        super().__init__()
        self.in_chans, self.depths, self.dims = trunk.in_chans, trunk.depths, trunk.dims
        self.use_grn, self.num_features = trunk.use_grn, trunk.num_features
        self.block_args = trunk.block_args
        self.downsample_layers = trunk.downsample_layers
        self.stages = trunk.stages


class ConvNeXtV2(ConvNeXtV2Trunk):
    """Dense ConvNeXt V2 classifier.

    ``forward_features``: ``(N, in_chans, H, W)`` -> ``(N, C, H/32, W/32)``;
    ``forward_head``: that map -> ``(N, num_classes)`` logits (global average pool, LayerNorm, Linear);
    with ``num_classes=0`` the head is the identity and ``forward`` returns the normalised pooled features.
    ``trunk``: the architecture's keywords (``ConvNeXtV2Trunk``: in_chans, depths, dims, drop_path_rate, use_grn,
    ls_init_value).
    """

    def __init__(self, *, num_classes: int = 1000, head_init_scale: float = 1.0, **trunk: Any) -> None:
        super().__init__(**trunk)
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        check_image_size(x.shape[2], x.shape[3])
        return x.contiguous(memory_format=torch.channels_last)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's backbone interface: the output maps of the chosen stages (``indices``: stage numbers, or an int n
        for the last n; default all four), stage ``i`` ``(N, dims[i], H / 4 / 2**i, W / 4 / 2**i)``.

        Returns the list, or ``(final features, list)`` unless ``intermediates_only`` (the final norm and head are
        not applied: use ``forward_head`` on the final features)."""
        take = list(range(4 - indices, 4)) if isinstance(indices, int) else list(indices or range(4))
        if any(not 0 <= i < 4 for i in take):
            raise ValueError(f"stage indices must be in 0..3, got {take}")
        x, out = self._check_input(x), []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                out.append(x)
        return out if intermediates_only else (x, out)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, in_chans, H, W)`` -> ``(N, C_last, H/32, W/32)`` (channels_last memory format)."""
        x = self._check_input(x)
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(N, C, h, w)`` -> ``(N, num_classes)``."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's record of the model's data and head (``fcmae.models.registry.pretrained_cfg``; 224 px):
        ``timm.data.resolve_data_config(model=...)`` reads it, ``classifier`` names ``self.head``."""
        return pretrained_cfg(self.in_chans, self.num_classes)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The classifier module (timm's interface)."""
        return self.head

    def reset_classifier(self, num_classes: int, init_std: float = 2e-5) -> None:
        """Replace the head (trunc normal ``init_std``, zero bias), e.g. for fine-tuning on a new label set."""
        self.num_classes = num_classes
        if num_classes > 0:
            ref = self.norm.weight
            head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            trunc_normal_(head.weight, std=init_std)
            nn.init.zeros_(head.bias)
            self.head = head
        else:
            self.head = nn.Identity()




def architecture(name: str, use_grn: bool | None = None) -> dict[str, Any]:
    """The trunk's architecture keywords of a registered variant: depths, dims and its block (GRN, LayerScale).
    ``use_grn``: None for the record's (V2: GRN, V1: none); False removes GRN (the ablation), True adds it."""
    v = get_variant(name)
    return {"depths": v.depths, "dims": v.dims, "use_grn": v.use_grn if use_grn is None else use_grn,
            "ls_init_value": v.ls_init_value}


def build_convnextv2(name: str, *, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                     head_init_scale: float = 1.0, use_grn: bool | None = None) -> ConvNeXtV2:
    """A dense ConvNeXt variant (V2 or V1) from the registry, freshly initialised (``fcmae.create_model`` adds
    ``pretrained=``). ``use_grn``: see ``architecture`` (False: blocks without GRN, no GRN parameters)."""
    return ConvNeXtV2(num_classes=num_classes, head_init_scale=head_init_scale, in_chans=in_chans,
                      drop_path_rate=drop_path_rate, **architecture(name, use_grn))


def build_trunk(name: str, *, in_chans: int = 3, drop_path_rate: float = 0.0, use_grn: bool | None = None
                ) -> ConvNeXtV2Trunk:
    """The encoder modules of a registered variant, initialised (no final norm, no head): what the sparse encoders
    and the masked-dense reference are made from."""
    trunk = ConvNeXtV2Trunk(in_chans=in_chans, drop_path_rate=drop_path_rate, **architecture(name, use_grn))
    trunk.init_weights()
    return trunk
