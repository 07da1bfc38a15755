"""The wrapper an app-facing classifier is exported from: 1/std folded into the stem, softmax on top."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.models.reparam import ReparamError


class StdFoldedClassifier(nn.Module):
    """Fused RepViT with 1/std folded into the stem and a softmax on top. Its input is
    ``pixel/255 - mean`` (what Core ML's image input produces; TFLite's wrapper subtracts the
    mean itself). Removing the mean before the stem's zero padding, as here, is exact."""

    def __init__(self, fused: nn.Module, std: list[float]):
        super().__init__()
        self.model = copy.deepcopy(fused).eval()
        stem = self.model.features[0][0]
        if not isinstance(stem, nn.Conv2d):
            raise ReparamError("an app-facing export needs the fused model (its stem is not a plain Conv2d): "
                               "reparameterize it first (the reparam stage)")
        with torch.no_grad():
            stem.weight.div_(torch.tensor(std, dtype=stem.weight.dtype).reshape(1, 3, 1, 1))

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)
