"""Reconstruction figures: original | masked | prediction at the removed patches | prediction pasted into the visible
patches, with these column titles drawn on top (``TITLES``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from fcmae.models.fcmae import FCMAE, patchify, unpatchify
from fcmae.models.masking import upsample_mask


@torch.no_grad()
def reconstruct(model: FCMAE, imgs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """-> (reconstruction ``(N, C, H, W)`` in the input's normalised space, pixel mask ``(N, 1, H, W)`` True=removed).

    With ``norm_pix_loss`` the model predicts per-patch normalised pixels; they are mapped back with each patch's
    own mean and std, as in the MAE papers' figures.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(imgs, mask, predict_all=True)
    finally:
        model.train(was_training)
    pred = out["pred"].float()
    h, w = imgs.shape[2] // model.patch_size, imgs.shape[3] // model.patch_size
    if model.norm_pix_loss:
        target = patchify(imgs.float(), model.patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    rec = unpatchify(pred, (h, w), imgs.shape[1], model.patch_size)
    pix_mask = upsample_mask(out["mask"], (h, w), model.patch_size).unsqueeze(1)
    return rec, pix_mask


def _to_uint8(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``(C, H, W)`` normalised -> ``(H, W, 3)`` uint8."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    img = (x * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] > 3:
        img = img[:3]
    return (img.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _draw_titles(canvas: Image.Image, cell: int, pad: int, header: int) -> None:
    """The column titles, centred over each column in the ``header`` pixels on top."""
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, header - 8))
    for j, title in enumerate(TITLES):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = pad + j * (cell + pad) + (cell - (right - left)) // 2 - left
        y = (header - (bottom - top)) // 2 - top
        draw.text((x, y), title, fill=(0, 0, 0), font=font)


def reconstruction_grid(
    model: FCMAE,
    imgs: Tensor,
    mask: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    min_cell: int = 160,
) -> Image.Image:
    """One row per image: original | masked (removed patches grey) | the prediction at the removed patches (visible
    ones grey: the decoder is never trained there, its output at visible cells is noise) | the prediction pasted
    into the visible patches; the column titles (``TITLES``) on top."""
    rec, pix = reconstruct(model, imgs, mask)
    imgs = imgs.float().cpu()
    rec, pix = rec.cpu(), pix.cpu()
    grey = torch.zeros_like(imgs)  # 0 in normalised space = the dataset mean colour
    masked = torch.where(pix, grey, imgs)
    predicted = torch.where(pix, rec, grey)
    pasted = torch.where(pix, rec, imgs)
    n, _, height, width = imgs.shape
    scale = max(1, -(-min_cell // max(height, width)))
    pad = 4
    cols = len(TITLES)
    header = max(16, min(28, width * scale // 8))
    canvas = Image.new("RGB", (cols * (width * scale + pad) + pad, header + n * (height * scale + pad) + pad),
                       (255, 255, 255))
    _draw_titles(canvas, width * scale, pad, header)
    for i in range(n):
        for j, t in enumerate((imgs[i], masked[i], predicted[i], pasted[i])):
            tile = Image.fromarray(_to_uint8(t, mean, std))
            if scale > 1:
                tile = tile.resize((width * scale, height * scale), Image.NEAREST)
            canvas.paste(tile, (pad + j * (width * scale + pad), header + pad + i * (height * scale + pad)))
    return canvas


def save_reconstruction_figure(
    model: FCMAE, imgs: Tensor, mask: Tensor, mean: tuple[float, ...], std: tuple[float, ...], path: str | Path
) -> Path:
    """Write the grid as PNG (atomically) and return its path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    reconstruction_grid(model, imgs, mask, mean, std).save(tmp, format="PNG")
    tmp.replace(p)
    return p
