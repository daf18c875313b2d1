"""The depthwise convolution with the grouped-forward weight gradient: same values and gradients as the library's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcmae.models.dwconv import depthwise_conv, depthwise_weight_grad


@pytest.mark.parametrize("k,channels_last", [(3, False), (7, True), (5, True)])
def test_depthwise_conv_passes_gradcheck(k, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 1, k, k, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(depthwise_conv, (x.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("n,c,h,w", [(4, 40, 28, 28), (3, 16, 7, 7), (2, 8, 14, 10)])
def test_weight_grad_equals_autograd_of_conv2d(n, c, h, w):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, 7, 7, generator=g, requires_grad=True)
    gout = torch.randn(n, c, h, w, generator=g)
    F.conv2d(x, weight, padding=3, groups=c).backward(gout)
    torch.testing.assert_close(depthwise_weight_grad(x, gout, 7), weight.grad, rtol=1e-4, atol=1e-4)
    # forward and input gradient through the autograd Function match as well
    xr = x.clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    y = depthwise_conv(xr, w2)
    xs = x.clone().requires_grad_()
    want = F.conv2d(xs, weight.detach(), padding=3, groups=c)
    torch.testing.assert_close(y, want)
    y.backward(gout)
    want.backward(gout)
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-5, atol=1e-5)


def test_autocast_on_cpu_runs_the_depthwise_conv_in_fp32():
    x = torch.randn(2, 8, 14, 14, requires_grad=True)
    w = torch.randn(8, 1, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv(x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.conv2d(x, w, padding=3, groups=8))
    y.sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32


def test_other_devices_keep_the_library_weight_gradient():
    # the meta device stands in for an accelerator: the library's kernel is called (shapes only, no data)
    x = torch.empty(2, 3, 8, 8, device="meta")
    gw = depthwise_weight_grad(x, torch.empty_like(x), 7)
    assert gw.shape == (3, 1, 7, 7) and gw.device.type == "meta"
