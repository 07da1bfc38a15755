"""Structural reparameterization: the training-time RepViT to its inference-time twin.

Unlike the official ``replace_batchnorm`` (which turns any BatchNorm it cannot fold
into Identity, silently changing the function), a BatchNorm left after fusion is an
error here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ReparamError(RuntimeError):
    pass


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if hasattr(child, "fuse"):
            setattr(module, name, child.fuse())
        else:
            _fuse_children(child)


def unfolded_batchnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """A fused copy of ``model`` in eval mode (the input is left as it was)."""
    fused = copy.deepcopy(model).eval()
    _fuse_children(fused)
    left = unfolded_batchnorms(fused)
    if left:
        raise ReparamError(
            f"{len(left)} BatchNorm layer(s) could not be folded: {', '.join(left[:5])}. "
            "Each must follow a convolution or precede a linear layer that the fusion knows; "
            "leaving it would change the model's outputs.")
    fused.fused = True
    return fused


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, "fused", False))
