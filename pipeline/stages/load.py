"""Stage 1: resolve the weights (official release, a file, or seeded random) and the
preprocessing and labels that go with them; write a pipeline checkpoint."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..checkpoints import build_model, parse, read_file, save_pipeline_checkpoint
from ..data import imagenet_classes
from ..download import WeightsUnavailable, fetch_official, sha256_file
from ..models.repvit import create_model
from ..variants import get_variant


@dataclass
class LoadConfig:
    variant: str = "m0.9"
    checkpoint: str = "official"   # official | random | a file path
    seed: int = 0                  # for checkpoint=random
    num_classes: int = 1000        # for checkpoint=random
    # Overrides; unset values come from the checkpoint, then the variant table.
    input_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    labels: Optional[str] = None   # a text file, one class name per line


@dataclass
class Weights:
    source: str
    sha256: Optional[str]
    trained: bool
    reason: str = ""


@dataclass
class LoadResult:
    checkpoint: Path
    weights: Weights
    meta: dict = field(default_factory=dict)


def fingerprint(cfg: LoadConfig) -> dict:
    """What the cache key must see beyond the config: the checkpoint's bytes."""
    fp = {}
    if cfg.checkpoint not in ("official", "random"):
        fp["checkpoint_sha256"] = sha256_file(Path(cfg.checkpoint))
    if cfg.labels:
        fp["labels_sha256"] = sha256_file(Path(cfg.labels))
    return fp


def _resolve_weights(cfg: LoadConfig):
    """(Checkpoint or None, Weights facts)."""
    variant = get_variant(cfg.variant)
    if cfg.checkpoint == "random":
        return None, Weights("random", None, False, "CKPT=random asked for seeded untrained weights")
    if cfg.checkpoint == "official":
        try:
            path, digest = fetch_official(variant)
        except WeightsUnavailable as e:
            print(f"WARNING: {e}\nWARNING: continuing on seeded UNTRAINED weights: accuracy "
                  "figures will be meaningless.", file=sys.stderr)
            return None, Weights("random", None, False, f"official weights unavailable: {e}")
        return parse(read_file(path), str(path)), Weights(f"official:{variant.weights.url}", digest, True)
    path = Path(cfg.checkpoint)
    return parse(read_file(path), str(path)), Weights(str(path), sha256_file(path), True)


def load(cfg: LoadConfig, out_dir: Path) -> LoadResult:
    variant = get_variant(cfg.variant)
    ckpt, weights = _resolve_weights(cfg)
    if ckpt is None:
        model = create_model(variant, cfg.num_classes, distillation=True, seed=cfg.seed)
        file_meta = {}
    else:
        model = build_model(ckpt, variant, source=weights.source)
        file_meta = ckpt.meta
    meta = {
        "input_size": cfg.input_size or file_meta.get("input_size") or variant.input_size,
        "crop_pct": cfg.crop_pct or file_meta.get("crop_pct") or variant.crop_pct,
        "interpolation": cfg.interpolation or file_meta.get("interpolation") or variant.interpolation,
        "mean": list(cfg.mean or file_meta.get("mean") or variant.mean),
        "std": list(cfg.std or file_meta.get("std") or variant.std),
    }
    if cfg.labels:
        classes = [l.strip() for l in Path(cfg.labels).read_text().splitlines() if l.strip()]
    elif file_meta.get("classes"):
        classes = list(file_meta["classes"])
    elif model.num_classes == 1000:
        classes = imagenet_classes()[0]
    else:
        classes = [f"class_{i}" for i in range(model.num_classes)]
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} labels for a model with {model.num_classes} outputs "
                         f"({cfg.labels or 'checkpoint classes'}); they must match")
    meta["classes"] = classes
    meta["weights"] = weights.__dict__
    path = out_dir / "model.pt"
    save_pipeline_checkpoint(path, model, meta)
    return LoadResult(path, weights, meta)


def run(cfg: LoadConfig, inputs: dict, out_dir: Path) -> dict:
    """Stage entry point: writes ``model.pt``; facts are the weights and preprocessing."""
    result = load(cfg, out_dir)
    return {"weights": result.weights.__dict__,
            **{k: v for k, v in result.meta.items() if k not in ("classes", "weights")},
            "num_classes": len(result.meta["classes"])}
