"""The arithmetic of folding BatchNorm into the layer before it.

BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta, so for y = W x + b:
BN(y) = (W * s) x + (b - mean) * s + beta with s = gamma / sqrt(var + eps).
"""
from __future__ import annotations

import torch
from torch import nn


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight
        shift = bn.bias - bn.running_mean * scale
    else:
        shift = -bn.running_mean * scale
    return scale, shift


@torch.no_grad()
def fold_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None,
                 bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv(x) followed by ``bn``, as one conv (output channels on dim 0)."""
    scale, shift = _bn_scale_shift(bn)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else shift + bias * scale
    return w, b


@torch.no_grad()
def fold_bn_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``linear(bn(x))`` as one Linear (BN acts on the input features)."""
    scale, shift = _bn_scale_shift(bn)
    w = linear.weight * scale[None, :]
    b = linear.weight @ shift
    if linear.bias is not None:
        b = b + linear.bias
    return w, b


def conv_from(reference: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased Conv2d with ``reference``'s geometry and the given parameters."""
    conv = nn.Conv2d(reference.in_channels, reference.out_channels, reference.kernel_size,
                     stride=reference.stride, padding=reference.padding,
                     dilation=reference.dilation, groups=reference.groups, bias=True,
                     device=weight.device, dtype=weight.dtype)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv


def linear_from(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(bias)
    return linear
