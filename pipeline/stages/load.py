"""Stage 1: resolve the weights (official release, a file, or seeded random) and the
preprocessing and labels that go with them; write a pipeline checkpoint."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.core.hashing import sha256_file
from pipeline.io.checkpoints import build_model, parse, read_file, save_pipeline_checkpoint
from pipeline.io.data import imagenet_classes
from pipeline.io.download import (HUB_PREFIX, DownloadUnavailable, fetch_hub, fetch_official, hub_meta,
                                  parse_hub_spec)
from pipeline.models.init import randomize_bn
from pipeline.models.repvit import create_model
from pipeline.variants import get_variant

log = logging.getLogger(__name__)


@dataclass
class LoadConfig:
    variant: str = "m0.9"
    checkpoint: str = "official"   # official | random | hf-hub:<repo>[@revision] | a file path
    seed: int = 0                  # for checkpoint=random
    num_classes: int = 1000        # for checkpoint=random
    # Overrides; unset values come from the checkpoint, then the variant table.
    input_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    labels: Optional[str] = None   # a text file, one class name per line

    def validate(self):
        get_variant(self.variant)
        if self.checkpoint.startswith(HUB_PREFIX):
            parse_hub_spec(self.checkpoint)


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
    """What the cache key must see beyond the config: the checkpoint's bytes. For official
    weights, the verified file's sha256 (downloading it now if needed), or that they were
    unavailable: an untrained fallback is cached under its own key, never under the real
    weights', so the first run that can get them uses them."""
    fp = {}
    if cfg.checkpoint == "official":
        fp["official_sha256"] = _official(cfg.variant)[1]
    elif cfg.checkpoint.startswith(HUB_PREFIX):
        hub = fetch_hub(cfg.checkpoint)
        fp["hub_sha256"] = hub.sha256
        fp["hub_config"] = hub.config
    elif cfg.checkpoint != "random":
        fp["checkpoint_sha256"] = sha256_file(Path(cfg.checkpoint))
    if cfg.labels:
        fp["labels_sha256"] = sha256_file(Path(cfg.labels))
    return fp


def _official(variant_name: str) -> tuple[Optional[Path], str]:
    """(path, sha256) of the verified official weights, or (None, "unavailable: <why>")."""
    try:
        path, digest = fetch_official(get_variant(variant_name))
        return path, digest
    except DownloadUnavailable as e:
        return None, f"unavailable: {e}"


def _resolve_weights(cfg: LoadConfig):
    """(Checkpoint or None, Weights facts)."""
    variant = get_variant(cfg.variant)
    if cfg.checkpoint == "random":
        return None, Weights("random", None, False, "CKPT=random asked for seeded untrained weights (BatchNorm statistics randomized: speed is representative, accuracy is not)")
    if cfg.checkpoint == "official":
        path, digest = _official(cfg.variant)
        if path is None:
            reason = digest.removeprefix("unavailable: ")
            log.warning(f"{reason}\ncontinuing on seeded UNTRAINED weights: accuracy figures will be "
                        "meaningless.")
            return None, Weights("random", None, False, f"official weights unavailable: {reason}")
        return parse(read_file(path), str(path)), Weights(f"official:{variant.weights.url}", digest, True)
    if cfg.checkpoint.startswith(HUB_PREFIX):
        # Asked for by name: unavailable is an error (with what to do), never a fallback.
        hub = fetch_hub(cfg.checkpoint)
        ckpt = parse(read_file(hub.path), cfg.checkpoint)
        meta = hub_meta(hub.config)
        ckpt.meta = {**{k: v for k, v in meta.items() if k != "architecture"}, **ckpt.meta}
        return ckpt, Weights(f"{HUB_PREFIX}{hub.repo}@{hub.revision}/{hub.path.name}", hub.sha256, True)
    path = Path(cfg.checkpoint)
    return parse(read_file(path), str(path)), Weights(str(path), sha256_file(path), True)


def load(cfg: LoadConfig, out_dir: Path) -> LoadResult:
    variant = get_variant(cfg.variant)
    ckpt, weights = _resolve_weights(cfg)
    if ckpt is None:
        # Every layer active (see models/init.py): speed and int8 behave as with trained weights.
        model = randomize_bn(create_model(variant, cfg.num_classes, distillation=True, seed=cfg.seed), cfg.seed)
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
