"""Readers of the scored images' cache entry and the preprocessing they were made with."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.io.checkpoints import parse, read_file


def scoring_meta(reparam_dir: Path, crop_pct: Optional[float]) -> dict:
    """The fused model's preprocessing facts, with validate's evaluation crop if set."""
    meta = dict(parse(read_file(reparam_dir / "fused.pt")).meta)
    if crop_pct:
        meta["crop_pct"] = crop_pct
    return meta


def scored(images_dir: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(pixels, memory-mapped uint8 NHWC; labels or None) of an ``images`` entry."""
    labels = images_dir / "labels.npy"
    return (np.load(images_dir / "pixels.npy", mmap_mode="r"),
            np.load(labels) if labels.exists() else None)
