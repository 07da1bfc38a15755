"""Stage: the scored images, decoded and preprocessed once.

The uint8 crops go to a memory-mapped ``pixels.npy`` that the float reference and every
format's validation read in batches, so memory does not grow with the number of images
and nothing is decoded twice. The key depends only on the data listing and the
preprocessing, so every scheme of a ``make compare`` shares one entry. Decoding runs in
worker processes (torch's DataLoader)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.core.progress import Progress
from pipeline.io.data import (DataConfig, decode_into, fingerprint_data, preprocess_of, resolve_sets,
                              sample_images, workers_for)
from pipeline.io.scored import scoring_meta


@dataclass
class ImagesConfig:
    """The part of ``validate`` that decides which pixels are scored."""
    crop_pct: Optional[float]
    fidelity_images: int
    workers: int


def narrow(cfg) -> ImagesConfig:
    return ImagesConfig(cfg.crop_pct, cfg.fidelity_images, cfg.workers)


def fingerprint(cfg: ImagesConfig, data: DataConfig) -> dict:
    return fingerprint_data(data)


def run(cfg: ImagesConfig, inputs: dict, out_dir: Path, data: DataConfig) -> dict:
    meta = scoring_meta(inputs["reparam"], cfg.crop_pct)
    pre = preprocess_of(meta)
    sets = resolve_sets(data, meta["classes"])
    shape = (pre.size, pre.size, 3)
    if sets.eval is not None:
        n = len(sets.eval)
        pixels = np.lib.format.open_memmap(out_dir / "pixels.npy", "w+", np.uint8, (n, *shape))
        workers = workers_for(n, cfg.workers)
        with Progress(n, f"decoding scored images ({workers or 'no'} decoding threads)") as bar:
            decode_into(pixels, sets.eval.paths, pre, workers, bar.update)
        pixels.flush()
        del pixels
        np.save(out_dir / "labels.npy", np.asarray(sets.eval.labels, np.int64))
        desc = sets.eval_description
    else:
        images = sample_images(cfg.fidelity_images, seed=2)
        n = len(images)
        np.save(out_dir / "pixels.npy", np.stack([pre.pixels(im) for im in images]))
        desc = (f"{n} natural sample photos (scikit-image's bundled images, crops and flips): "
                "label-free fidelity only")
    return {"images": n, "eval_images": desc,
            "dataset": sets.eval.name if sets.eval is not None else None,
            "preprocess": {k: meta[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")}}


