"""Seeded weights for runs without a checkpoint.

RepViT's own initialization zeroes the BatchNorm scale at the end of every residual
branch (``bn_weight_init=0``), so an untrained network is half dead: those convolutions
fold to all-zero weights, their outputs are constant and an int8 quantizer calibrates
degenerate ranges for them. Speed measured on such a model is not the speed of a trained
one (LiteRT's XNNPACK refused the residual adds, splitting the int8 graph into 54
partitions). These statistics make every layer active, as training does.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, and conv biases (defaults:
    mean 0, var 1, gamma 1, beta 0, and gamma 0 on residual branches, also hide folding bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            # Residual-branch BNs start at gamma 0; trained nets keep them small, otherwise
            # deep variants blow activations up to ~1e5.
            centre = 0.0 if bool((m.weight == 0).all()) else 1.0
            spread = 0.2 if centre == 0.0 else 0.5
            m.weight.copy_(torch.randn(n, generator=g) * spread + centre)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()
