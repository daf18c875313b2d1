"""The 7x7 depthwise convolution with a faster weight gradient, shared by the dense and the sparse model.

oneDNN's depthwise weight gradient runs at 3-20 GFLOP/s on CPU against 110-190 for its forward (measured on
2 cores, fp32). But the weight gradient of a depthwise convolution *is* a depthwise convolution: for every
sample ``n`` and channel ``c``, ``dW[c] = sum_n xcorr(pad(x[n, c]), g[n, c])``, a ``k x k`` output computed with
``g[n, c]`` (``H x W``) as the kernel. Run as one grouped convolution with ``N * C`` groups it takes the fast
forward path: 1.6-5x less time for the stages of ConvNeXt V2 at 224 px, including the layout copies it needs
(``benchmarks/README.md``). Only the summation order changes; the result is the same gradient. CPU only:
other devices keep their library's weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _library_backward(grad_out: Tensor, x: Tensor, weight: Tensor, which: int) -> Tensor:
    """The library's own gradient of ``conv2d(x, weight, padding=k//2, groups=C)``: input (0) or weight (1)."""
    k, c = weight.shape[-1], weight.shape[0]
    mask = [which == 0, which == 1, False]
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], c, mask)[which]


def depthwise_weight_grad(x: Tensor, grad_out: Tensor, kernel_size: int) -> Tensor:
    """Weight gradient of a stride-1, ``padding = k // 2`` depthwise convolution.

    x, grad_out: ``(N, C, H, W)`` in any memory format, same dtype -> ``(C, 1, k, k)``. On CPU as a grouped
    forward convolution; elsewhere with the library's own kernel (the reason for the detour, oneDNN's slow weight
    gradient, is a CPU one, and huge-kernel grouped convolutions are not what GPU libraries tune for).
    """
    n, c, h, w = grad_out.shape
    p = kernel_size // 2
    if x.device.type != "cpu":
        return _library_backward(grad_out, x, x.new_empty(c, 1, kernel_size, kernel_size), 1)  # shape only
    xp = x.new_zeros(n, c, h + 2 * p, w + 2 * p)  # NCHW, one input plane per group: pad and transpose in one copy
    xp[:, :, p:p + h, p:p + w] = x
    kernels = grad_out.contiguous().view(n * c, 1, h, w)  # the output gradient as N*C kernels of H x W
    out = F.conv2d(xp.view(1, n * c, h + 2 * p, w + 2 * p), kernels, groups=n * c)  # (1, N*C, k, k)
    return out.view(n, c, kernel_size, kernel_size).sum(0).unsqueeze(1)


def depthwise_input_grad(grad_out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of the same convolution (oneDNN's own, fast): -> like ``x``."""
    return _library_backward(grad_out, x, weight, 0)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a depthwise convolution of ``x`` runs in: autocast's where it is on, but fp32 on CPU for bf16/fp16
    (CPUs without AVX512-BF16/AMX run a bf16 depthwise convolution ~50x slower than fp32; its FLOPs are
    negligible)."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return torch.float32 if x.device.type == "cpu" and dt in (torch.bfloat16, torch.float16) else dt


class _DepthwiseConv(torch.autograd.Function):
    """``conv2d(x, weight, padding=k//2, groups=C)`` (no bias) with ``depthwise_weight_grad`` in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xf, wf = x.to(dt), weight.to(dt)
            ctx.save_for_backward(xf, wf)
            ctx.dtypes = (x.dtype, weight.dtype)
            return F.conv2d(xf, wf, None, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        g = grad_out.to(x.dtype)
        gx = depthwise_input_grad(g, x, weight).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = depthwise_weight_grad(x, g, weight.shape[-1]).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gx, gw


def depthwise_conv(x: Tensor, weight: Tensor) -> Tensor:
    """x ``(N, C, H, W)``, weight ``(C, 1, k, k)`` (odd k) -> ``(N, C, H, W)``: stride 1, same padding, no bias."""
    return _DepthwiseConv.apply(x, weight)
