"""GPU settings of a run (``run.tf32``, ``run.cudnn_benchmark``, ``run.channels_last``): decided once, here.

- TF32 (default on): fp32 matmuls and cuDNN convolutions on Ampere and later use TF32 tensor cores (10-bit
  mantissa products, fp32 accumulation). With bf16 autocast (the default on such GPUs) few fp32 matmuls are left
  (the fp32 parts are GRN's statistics and the loss, which are reductions); with ``mixed_precision=no`` TF32 is what
  makes fp32 training on them fast. timm's and the official ConvNeXt V2 training leave it on. Off restores full fp32
  products (e.g. for exactness checks).
- ``cudnn.benchmark`` (default on): a run's shapes are fixed (the crop size, and the same number of visible cells in
  every image, so the sparse encoder's depthwise convolution runs on the same dense grid every step), so cuDNN's
  autotuner pays once per shape for the fastest depthwise 7x7 algorithm, which differs by width and GPU. Only a
  partial last batch and the evaluation batch add a shape (one more search each).
- channels-last weights (default on): the models compute channels-last (``(N, H, W, C)`` views for LayerNorm and
  the Linears; the depthwise convolution's grid is an NHWC view), and cuDNN's NHWC convolutions take channels-last
  weights without a transpose per call; the 4-D conv weights are stored so once.

None of this changes what is trained (a resume may switch them) and none applies on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def apply_gpu_settings(model: nn.Module, run: Any, device: torch.device) -> list[str]:
    """Set the run's GPU settings for ``device`` (nothing on the CPU); returns them as words for the log."""
    if device.type != "cuda":
        return []
    torch.backends.cuda.matmul.allow_tf32 = bool(run.tf32)
    torch.backends.cudnn.allow_tf32 = bool(run.tf32)
    torch.backends.cudnn.benchmark = bool(run.cudnn_benchmark)
    if run.channels_last:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 4:  # conv weights; in place of the same Parameter (optimizer groups hold it already)
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
    return [f"TF32 {'on' if run.tf32 else 'off'}", f"cudnn.benchmark {'on' if run.cudnn_benchmark else 'off'}",
            f"channels-last weights {'on' if run.channels_last else 'off'}"]
