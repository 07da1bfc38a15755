"""Per-variant facts, as data (the role timm's ``default_cfgs`` play).

Architecture: ``embed_dim`` and ``depth`` use timm's description of RepViT; the
official release unrolls it into a flat ``features`` list (see
``pipeline.models.repvit.block_specs``). Published figures come from the RepViT
README (300-epoch distilled checkpoints; latency on iPhone 12, iOS 16, Core ML).

Legacy variants (``legacy=True``: m1, m2, m3) are the first paper version's models, whose
RepVGGDW has a BatchNorm on its 1x1 branch and none after the sum (timm's ``legacy=True``
``repvit_m1`` / ``m2`` / ``m3``); their figures are the release README's at its v1.0 tag.

Weights: release URLs of THU-MIG/RepViT v1.0 (the legacy files were released as
jameslahm/RepViT v1.0, the repository's earlier name). The project found no checksum
published by the authors. ``sha256`` is full where a third party recorded it
(m0.9); ``sha256_prefix`` holds the 16-hex-digit prefixes another public project
recorded. ``size`` pins the byte count those records give. Where neither is known,
the first download records its sha256 and later loads verify against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_URL = "https://github.com/THU-MIG/RepViT/releases/download/v1.0/{file}"
LEGACY_RELEASE_URL = "https://github.com/jameslahm/RepViT/releases/download/v1.0/{file}"


@dataclass(frozen=True)
class Weights:
    file: str
    size: Optional[int] = None          # bytes, pinned where known
    sha256: Optional[str] = None        # full digest, where known
    sha256_prefix: Optional[str] = None  # a recorded prefix, where only that is known
    license: str = "Apache-2.0"
    release: str = RELEASE_URL

    @property
    def url(self) -> str:
        return self.release.format(file=self.file)


@dataclass(frozen=True)
class Published:
    top1: Optional[float]        # ImageNet-1k top-1, %, 300 epochs
    params_m: Optional[float]    # fused, millions
    gmacs: Optional[float]       # at 224x224
    iphone12_ms: Optional[float]  # Core ML, iOS 16


@dataclass(frozen=True)
class Variant:
    name: str                     # "m0.9"
    embed_dim: tuple[int, int, int, int]
    depth: tuple[int, int, int, int]
    published: Published
    weights: Weights
    input_size: int = 224
    crop_pct: float = 0.95
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_id: Optional[str] = None   # timm's Hugging Face hub repo for these weights
    legacy: bool = False           # first-version RepVGGDW (BN on the 1x1 branch, none after)
    extra: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"RepViT-{self.name.upper()}"

    @property
    def timm_name(self) -> str:
        return "repvit_" + self.name.replace(".", "_")


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("m0.6", (40, 80, 160, 320), (1, 1, 8, 1),
            Published(top1=74.1, params_m=None, gmacs=None, iphone12_ms=0.6),
            Weights("repvit_m0_6_distill_300e.pth")),
    Variant("m0.9", (48, 96, 192, 384), (2, 2, 14, 2),
            Published(top1=78.7, params_m=5.1, gmacs=0.8, iphone12_ms=0.9),
            Weights("repvit_m0_9_distill_300e.pth", size=22_422_548,
                    sha256="857eb0e6a992591a16ed96b22a73135270032d2b97c2c1f74dd3d0050e0c83e8"),
            hub_id="timm/repvit_m0_9.dist_300e_in1k"),
    Variant("m1.0", (56, 112, 224, 448), (2, 2, 14, 2),
            Published(top1=80.0, params_m=6.8, gmacs=1.1, iphone12_ms=1.0),
            Weights("repvit_m1_0_distill_300e.pth", size=29_675_245, sha256_prefix="283bb9865f705481"),
            hub_id="timm/repvit_m1_0.dist_300e_in1k"),
    Variant("m1.1", (64, 128, 256, 512), (2, 2, 12, 2),
            Published(top1=80.7, params_m=8.2, gmacs=1.3, iphone12_ms=1.1),
            Weights("repvit_m1_1_distill_300e.pth", size=35_668_677, sha256_prefix="1b364220241273d5"),
            hub_id="timm/repvit_m1_1.dist_300e_in1k"),
    Variant("m1.5", (64, 128, 256, 512), (4, 4, 24, 4),
            Published(top1=82.3, params_m=14.0, gmacs=2.3, iphone12_ms=1.5),
            Weights("repvit_m1_5_distill_300e.pth", size=59_375_411, sha256_prefix="b434320aed41372a"),
            hub_id="timm/repvit_m1_5.dist_300e_in1k"),
    Variant("m2.3", (80, 160, 320, 640), (6, 6, 34, 2),
            Published(top1=83.3, params_m=22.9, gmacs=4.5, iphone12_ms=2.3),
            Weights("repvit_m2_3_distill_300e.pth", size=95_860_931, sha256_prefix="be53c7dfb059ae6d"),
            hub_id="timm/repvit_m2_3.dist_300e_in1k"),
    # Legacy (first paper version): same macro structure as m0.9 / m1.1, legacy RepVGGDW.
    Variant("m1", (48, 96, 192, 384), (2, 2, 14, 2),
            Published(top1=78.5, params_m=5.1, gmacs=0.8, iphone12_ms=0.9),
            Weights("repvit_m1_distill_300.pth", release=LEGACY_RELEASE_URL),
            hub_id="timm/repvit_m1.dist_in1k", legacy=True),
    Variant("m2", (64, 128, 256, 512), (2, 2, 12, 2),
            Published(top1=80.6, params_m=8.2, gmacs=1.3, iphone12_ms=1.1),
            Weights("repvit_m2_distill_300.pth", release=LEGACY_RELEASE_URL),
            hub_id="timm/repvit_m2.dist_in1k", legacy=True),
    Variant("m3", (64, 128, 256, 512), (4, 4, 18, 2),
            Published(top1=81.4, params_m=10.1, gmacs=1.9, iphone12_ms=1.3),
            Weights("repvit_m3_distill_300.pth", release=LEGACY_RELEASE_URL),
            hub_id="timm/repvit_m3.dist_in1k", legacy=True),
]}


class UnknownVariant(ValueError):
    pass


def get_variant(name: str) -> Variant:
    key = name.lower().removeprefix("repvit-").removeprefix("repvit_").replace("_", ".")
    if not key.startswith("m"):
        key = "m" + key
    try:
        return VARIANTS[key]
    except KeyError:
        raise UnknownVariant(
            f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}") from None
