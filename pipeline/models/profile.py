"""Parameter and multiply-accumulate counts, measured by running the model once."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelProfile:
    params: int
    macs: int
    convs: int
    linears: int
    batchnorms: int


@torch.no_grad()
def profile(model: nn.Module, input_size: int = 224) -> ModelProfile:
    """Counts Conv2d and Linear MACs (what the RepViT paper reports); adds and
    activations are not counted, as in the paper's fvcore/thop figures."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal macs
        macs += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    modules = list(model.modules())
    return ModelProfile(
        params=sum(p.numel() for p in model.parameters()),
        macs=macs,
        convs=sum(isinstance(m, nn.Conv2d) for m in modules),
        linears=sum(isinstance(m, nn.Linear) for m in modules),
        batchnorms=sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules),
    )
