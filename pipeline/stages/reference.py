"""Stage: the float model's logits on the scored images, computed once and shared by every
format's validation (and every scheme of a compare: the key depends on the fused model and
the images only)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.compiled import FixedBatch, Setting, wanted
from pipeline.core.progress import Progress
from pipeline.core.runner import facts_of
from pipeline.eval.metrics import accuracy
from pipeline.eval.timing import measured_throughput
from pipeline.io.checkpoints import load_model
from pipeline.io.data import normalized_tensor
from pipeline.io.scored import scored


@dataclass
class ReferenceConfig:
    batch_size: int
    compile: Setting = "auto"


def narrow(cfg) -> ReferenceConfig:
    return ReferenceConfig(cfg.batch_size, cfg.compile)


def run(cfg: ReferenceConfig, inputs: dict, out_dir: Path) -> dict:
    model, ckpt = load_model(inputs["reparam"] / "fused.pt")
    pixels, labels = scored(inputs["images"])
    logits = np.lib.format.open_memmap(out_dir / "logits.npy", "w+", np.float32,
                                       (len(pixels), ckpt.num_classes))
    # Batches of about sixteen 224 px images' worth of pixels, whatever the input size: m0.9,
    # 2 threads, freed memory kept mapped (allocator.py), ran 78 / 74 / 71 / 53 images/s at
    # batch 8 / 16 / 32 / 64 at 224 px (bigger batches leave the caches), and 802 / 888 /
    # 915 / 898 at 32 / 64 / 128 / 256 at 64 px (smaller ones pay per-op overhead).
    # Channels-last: oneDNN's convolutions skip their layout reorders (0.20 against 0.23 s
    # per batch of 16).
    size = ckpt.meta["input_size"]
    step = max(cfg.batch_size, min(256, 16 * 224 * 224 // (size * size)))
    model = model.to(memory_format=torch.channels_last)
    # Compiled (large sets): within the ONNX parity gate's 1e-4 of max |logit| of eager, or
    # eager is used; inductor's freezing pre-packs the weights (1.1-1.3x eager here).
    forward = (FixedBatch(model, step, tolerance=1e-4, freezing=True)
               if wanted(cfg.compile, len(pixels)) else model)
    start = time.perf_counter()
    with Progress(len(pixels), "float reference on images") as bar, torch.no_grad():
        for s in range(0, len(pixels), step):
            x = normalized_tensor(pixels[s:s + step], ckpt.meta["mean"], ckpt.meta["std"])
            logits[s:s + step] = forward(x).numpy()
            bar.update(len(pixels[s:s + step]))
    logits.flush()
    compiled = isinstance(forward, FixedBatch)
    runtime = f"PyTorch {torch.__version__} float32 (fused{forward.how if compiled else ''})"
    dataset = facts_of(inputs["images"])["dataset"]
    return {"format": "pytorch", "runtime": runtime, **({"compiled": forward.facts} if compiled else {}),
            "throughput": measured_throughput(len(pixels), time.perf_counter() - start, runtime, step),
            "accuracy": accuracy(np.asarray(logits), labels, dataset) if labels is not None else None}
