"""Masked-dense FCMAE: the oracle for the sparse encoder, and the baseline it is benchmarked against.

This is what the official code effectively computes when MinkowskiEngine is replaced by dense convolutions
(their own "numerically identical" training mode): every layer runs on the full dense grid, the mask is
multiplied in before and after every depthwise convolution, GRN pools over visible positions only, and
downsampling is an ordinary strided convolution. The decoder runs on all cells and the loss is weighted by the
mask. It is written with plain functional ops, independently of ``sparse.py``, and has the same parameter
names as ``FCMAE``, so ``ReferenceFCMAE.load_state_dict(fcmae.state_dict())`` works.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcmae.models.convnextv2 import STRIDE, Block, ConvNeXtV2Trunk, build_trunk
from fcmae.models.masking import MASK_RATIO, random_masking


def _ln_last(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _ln_channels(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    return _ln_last(x.permute(0, 2, 3, 1), ln).permute(0, 3, 1, 2)


def _masked_grn(x: Tensor, grn: nn.Module, visible: Tensor) -> Tensor:
    """x ``(N, H, W, C)``; visible ``(N, H, W, 1)`` float 0/1. Norms over visible positions of each sample."""
    xf = x.float()
    gx = torch.sqrt(((xf * visible) ** 2).sum(dim=(1, 2), keepdim=True))
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)
    return (grn.gamma * (xf * nx) + grn.beta + xf).to(x.dtype)


def _masked_block(x: Tensor, blk: Block, visible_nchw: Tensor, visible_nhwc: Tensor) -> Tensor:
    y = x * visible_nchw
    y = F.conv2d(y, blk.dwconv.weight, blk.dwconv.bias, padding=blk.dwconv.padding, groups=blk.dwconv.groups)
    y = (y * visible_nchw).permute(0, 2, 3, 1)
    y = _ln_last(y, blk.norm)
    y = F.gelu(F.linear(y, blk.pwconv1.weight, blk.pwconv1.bias))
    if blk.grn is not None:
        y = _masked_grn(y, blk.grn, visible_nhwc)
    y = _layer_scale(F.linear(y, blk.pwconv2.weight, blk.pwconv2.bias), blk)
    return x + blk.drop_path(y.permute(0, 3, 1, 2))


def _layer_scale(y: Tensor, blk: Block) -> Tensor:
    """ConvNeXt V1's LayerScale on channels-last ``y`` (nothing for V2 blocks, which have no ``gamma``)."""
    return y if blk.gamma is None else y * blk.gamma


def _plain_block(x: Tensor, blk: Block) -> Tensor:
    """The decoder's block as the official code runs it (nn.Conv2d with bias, autograd's backward)."""
    y = F.conv2d(x, blk.dwconv.weight, blk.dwconv.bias, padding=blk.dwconv.padding, groups=blk.dwconv.groups)
    y = _ln_last(y.permute(0, 2, 3, 1), blk.norm)
    y = F.gelu(F.linear(y, blk.pwconv1.weight, blk.pwconv1.bias))
    if blk.grn is not None:
        y = blk.grn(y, dims=(1, 2))
    y = _layer_scale(F.linear(y, blk.pwconv2.weight, blk.pwconv2.bias), blk)
    return x + blk.drop_path(y.permute(0, 3, 1, 2))


def masked_dense_encoder(trunk: ConvNeXtV2Trunk, imgs: Tensor, mask: Tensor) -> Tensor:
    """imgs ``(N, C, H, W)``, mask ``(N, L)`` True = removed -> ``(N, C_last, H/32, W/32)``, zero at removed cells."""
    n, _, height, width = imgs.shape
    h, w = height // STRIDE, width // STRIDE
    visible = (~mask.bool()).to(imgs.dtype).reshape(n, 1, h, w)
    x = imgs.contiguous(memory_format=torch.channels_last)
    for i in range(4):
        scale = 8 >> i
        vis = F.interpolate(visible, scale_factor=scale, mode="nearest") if scale > 1 else visible
        vis_nhwc = vis.permute(0, 2, 3, 1)
        ds = trunk.downsample_layers[i]
        if i == 0:
            x = F.conv2d(x, ds[0].weight, ds[0].bias, stride=4)
            x = _ln_channels(x * vis, ds[1])
        else:
            x = _ln_channels(x, ds[0])
            x = F.conv2d(x, ds[1].weight, ds[1].bias, stride=2)
        for blk in trunk.stages[i]:
            x = _masked_block(x, blk, vis, vis_nhwc)
    return x * visible


class ReferenceFCMAE(nn.Module):
    """Masked-dense FCMAE with ``FCMAE``'s parameter names; forward returns the same dict. ``trunk``: the dense
    encoder (``ConvNeXtV2Trunk``), run densely with the mask applied around every depthwise conv."""

    def __init__(self, trunk: ConvNeXtV2Trunk, *, decoder_depth: int = 1, decoder_embed_dim: int = 512,
                 norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.in_chans = trunk.in_chans
        self.norm_pix_loss = norm_pix_loss
        self.encoder = trunk
        self.proj = nn.Linear(trunk.num_features, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_embed_dim))
        self.decoder = nn.Sequential(*[Block(decoder_embed_dim, **trunk.block_args) for _ in range(decoder_depth)])
        self.pred = nn.Linear(decoder_embed_dim, STRIDE * STRIDE * trunk.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        return masked_dense_encoder(self.encoder, imgs, mask)

    def forward(self, imgs: Tensor, mask: Tensor | None = None, *, mask_ratio: float = MASK_RATIO,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n, c, height, width = imgs.shape
        h, w = height // STRIDE, width // STRIDE
        if mask is None:
            mask = random_masking(n, (h, w), mask_ratio, generator=generator, device=imgs.device)
        feats = self.forward_encoder(imgs, mask).permute(0, 2, 3, 1)  # (N, h, w, C)
        x = F.linear(feats, self.proj.weight, self.proj.bias)
        m = mask.reshape(n, h, w, 1).to(x.dtype)
        x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        x = x.permute(0, 3, 1, 2)
        for blk in self.decoder:
            x = _plain_block(x, blk)
        x = x.permute(0, 2, 3, 1)
        pred = F.linear(x, self.pred.weight, self.pred.bias).reshape(n, h * w, -1)
        # targets: independent patchify via unfold (channel-major), reordered to (py, px, c)
        target = F.unfold(imgs.float(), kernel_size=STRIDE, stride=STRIDE)  # (N, C*p*p, L)
        target = target.reshape(n, c, STRIDE * STRIDE, h * w).permute(0, 3, 2, 1).reshape(n, h * w, -1)
        if self.norm_pix_loss:
            mu = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mu) / (var + 1e-6) ** 0.5
        per_cell = ((pred.float() - target) ** 2).mean(dim=-1)
        mf = mask.float()
        loss = (per_cell * mf).sum() / mf.sum()
        return {"loss": loss, "pred": pred, "mask": mask}


def create_reference_fcmae(name: str, *, in_chans: int = 3, drop_path_rate: float = 0.0,
                           use_grn: bool | None = None, **decoder: Any) -> ReferenceFCMAE:
    """The masked-dense reference of ``create_fcmae(name, ...)``; ``decoder``: ``ReferenceFCMAE``'s keywords."""
    trunk = build_trunk(name, in_chans=in_chans, drop_path_rate=drop_path_rate, use_grn=use_grn)
    return ReferenceFCMAE(trunk, **decoder)
