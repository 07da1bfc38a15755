"""RepViT in its training-time structure, with the official release's module names.

Names follow THU-MIG/RepViT ``model/repvit.py`` (``features.N...``,
``classifier.classifier.l...``, ``classifier.classifier_dist...``) so that a release
checkpoint ``{"model": state_dict}`` loads with ``strict=True``. Every module that
holds a BatchNorm has a ``fuse()`` returning its inference-time equivalent; see
``pipeline.models.reparam`` for the whole-model pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.fusion import conv_from, fold_bn_linear, fold_conv_bn, linear_from
from pipeline.variants import Variant, get_variant


class ConvBN(nn.Sequential):
    """Conv2d without bias, then BatchNorm2d (official ``Conv2d_BN``)."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    def fuse(self) -> nn.Conv2d:
        return conv_from(self.c, *fold_conv_bn(self.c.weight, None, self.bn))


class BNLinear(nn.Sequential):
    """BatchNorm1d, then Linear (official ``BN_Linear``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(cin))
        self.add_module("l", nn.Linear(cin, cout))
        nn.init.trunc_normal_(self.l.weight, std=0.02)
        nn.init.constant_(self.l.bias, 0)

    def fuse(self) -> nn.Linear:
        return linear_from(*fold_bn_linear(self.bn, self.l))


class Residual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class SqueezeExcite(nn.Module):
    """timm's ``SqueezeExcite(channels, 0.25)`` as RepViT uses it (ReLU, sigmoid gate)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, divisor: int = 8):
        super().__init__()
        rd = max(divisor, int(channels * rd_ratio + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        # timm's SE also holds an Identity ``bn``: left out, since quantizers would wrap
        # the no-op in its own quantize/dequantize pair.
        s = self.fc2(self.act(self.fc1(s)))
        return x * self.gate(s)


class RepVGGDW(nn.Module):
    """BN(dw3x3_bn(x) + dw1x1(x) + x): three branches that fold into one 3x3 depthwise conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim)
        self.dim = dim
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv = self.conv.fuse()
        # 1x1 and identity branches become 3x3 kernels with only the centre tap set.
        w = conv.weight + F.pad(self.conv1.weight, [1, 1, 1, 1])
        w = w + F.pad(torch.ones_like(self.conv1.weight), [1, 1, 1, 1])
        b = conv.bias + self.conv1.bias
        return conv_from(conv, *fold_conv_bn(w, b, self.bn))


class LegacyRepVGGDW(nn.Module):
    """The first paper version's (RepViT-M1/M2/M3): dw3x3_bn(x) + dw1x1_bn(x) + x, a
    BatchNorm on each branch and none after the sum (timm's ``legacy=True``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)
        self.conv1 = ConvBN(dim, dim, 1, 1, 0, groups=dim)
        self.dim = dim

    def forward(self, x):
        return self.conv(x) + self.conv1(x) + x

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv, conv1 = self.conv.fuse(), self.conv1.fuse()
        w = conv.weight + F.pad(conv1.weight, [1, 1, 1, 1])
        w = w + F.pad(torch.ones_like(conv1.weight), [1, 1, 1, 1])
        return conv_from(conv, w, conv.bias + conv1.bias)


class RepViTBlock(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, use_se: bool, legacy: bool = False):
        super().__init__()
        hidden = 2 * oup
        if stride == 2:
            self.token_mixer = nn.Sequential(
                ConvBN(inp, inp, 3, 2, 1, groups=inp),
                SqueezeExcite(inp) if use_se else nn.Identity(),
                ConvBN(inp, oup, 1, 1, 0),
            )
        else:
            assert inp == oup, "a stride-1 RepViT block keeps its width"
            self.token_mixer = nn.Sequential(
                LegacyRepVGGDW(inp) if legacy else RepVGGDW(inp),
                SqueezeExcite(inp) if use_se else nn.Identity(),
            )
        self.channel_mixer = Residual(nn.Sequential(
            ConvBN(oup, hidden, 1, 1, 0),
            nn.GELU(),
            ConvBN(hidden, oup, 1, 1, 0, bn_weight_init=0.0),
        ))

    def forward(self, x):
        return self.channel_mixer(self.token_mixer(x))


class Classifier(nn.Module):
    """Official ``Classfier``: a head, and optionally a distillation head averaged in eval."""

    def __init__(self, dim: int, num_classes: int, distillation: bool):
        super().__init__()
        self.classifier = BNLinear(dim, num_classes)
        self.distillation = distillation
        if distillation:
            self.classifier_dist = BNLinear(dim, num_classes)

    def forward(self, x):
        if not self.distillation:
            return self.classifier(x)
        # Always the average: the pipeline never trains the two heads apart.
        return (self.classifier(x) + self.classifier_dist(x)) / 2

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        head = self.classifier.fuse()
        if self.distillation:
            dist = self.classifier_dist.fuse()
            return linear_from((head.weight + dist.weight) / 2, (head.bias + dist.bias) / 2)
        return head


@dataclass(frozen=True)
class BlockSpec:
    inp: int
    oup: int
    stride: int
    use_se: bool


def block_specs(variant: Variant) -> list[BlockSpec]:
    """Unroll timm's (embed_dim, depth) into the official flat list of blocks.

    Official stage s>0 starts with a stride-2 block; each stage holds ``depth[s]``
    blocks with SE on every other one (first on); stages 0-2 end with one more block
    without SE (timm calls it the next downsample's ``pre_block``).
    """
    specs, cin = [], variant.embed_dim[0]
    for s, (dim, depth) in enumerate(zip(variant.embed_dim, variant.depth)):
        if s > 0:
            specs.append(BlockSpec(cin, dim, 2, False))
        specs += [BlockSpec(dim, dim, 1, j % 2 == 0) for j in range(depth)]
        if s < len(variant.depth) - 1:
            specs.append(BlockSpec(dim, dim, 1, False))
        cin = dim
    return specs


class RepViT(nn.Module):
    def __init__(self, variant: Variant | str, num_classes: int = 1000, distillation: bool = True):
        super().__init__()
        self.variant = get_variant(variant) if isinstance(variant, str) else variant
        self.num_classes = num_classes
        c0 = self.variant.embed_dim[0]
        stem = nn.Sequential(ConvBN(3, c0 // 2, 3, 2, 1), nn.GELU(), ConvBN(c0 // 2, c0, 3, 2, 1))
        blocks = [RepViTBlock(b.inp, b.oup, b.stride, b.use_se, self.variant.legacy)
                  for b in block_specs(self.variant)]
        self.features = nn.ModuleList([stem, *blocks])
        self.classifier = Classifier(self.variant.embed_dim[-1], num_classes, distillation)

    @property
    def distillation(self) -> bool:
        return isinstance(self.classifier, Classifier) and self.classifier.distillation

    def forward(self, x):
        for f in self.features:
            x = f(x)
        # mean over H, W rather than adaptive_avg_pool2d(1).flatten(1): the same values, but
        # no reshape between two quantizers, which coremltools 9 (W8A8) folds into a
        # dequantize with the wrong scale.
        return self.classifier(x.mean((2, 3)))


def create_model(variant: Variant | str, num_classes: int = 1000, distillation: bool = True,
                 seed: int | None = None) -> RepViT:
    """A training-time RepViT; with ``seed``, deterministically initialized."""
    if seed is None:
        return RepViT(variant, num_classes, distillation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RepViT(variant, num_classes, distillation)
