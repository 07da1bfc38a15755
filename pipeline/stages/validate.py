"""Stage 5: every artifact in its own runtime: accuracy (with labels), fidelity to the
float PyTorch reference (always), and host latency; each figure says how it was got."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoints import load_model
from ..data import DataConfig, fingerprint_folder, open_image, resolve_sets, sample_images
from ..formats import normalized, softmax
from ..progress import Progress
from ..runner import facts_of
from ..runtimes import open_runtime
from .reparam import preprocess_of


@dataclass
class ValidateConfig:
    fidelity_images: int = 64      # natural photos for label-free fidelity when there is no DATA
    batch_size: int = 16
    latency_runs: int = 50
    latency_warmup: int = 10
    threads: list[int] = field(default_factory=lambda: [1, 0])   # 0: all cores
    iphone: bool = True            # iPhone latency of Core ML artifacts: measured if a device
                                   # is attached (macOS), else estimated
    crop_pct: Optional[float] = None  # evaluation crop; default: the model's

    def validate(self):
        if self.latency_runs < 1 or self.batch_size < 1:
            raise ValueError("latency_runs and batch_size must be at least 1")


def fingerprint(cfg: ValidateConfig, data: DataConfig) -> dict:
    return {"eval": fingerprint_folder(data.eval), "calib": fingerprint_folder(data.calib)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- metrics

def fidelity(reference: np.ndarray, scores: np.ndarray) -> dict:
    """Top-1 agreement, mean cosine and SQNR (dB) of ``scores`` against ``reference``."""
    num = (reference * scores).sum(1)
    den = np.linalg.norm(reference, axis=1) * np.linalg.norm(scores, axis=1) + 1e-30
    noise = ((reference - scores) ** 2).sum()
    sqnr = float("inf") if noise == 0 else float(10 * np.log10((reference ** 2).sum() / noise))
    return {"top1_agreement": float((reference.argmax(1) == scores.argmax(1)).mean()),
            "cosine": float((num / den).mean()), "sqnr_db": sqnr, "n": int(len(reference))}


def accuracy(scores: np.ndarray, labels: np.ndarray, dataset: str) -> dict:
    top5 = np.argsort(-scores, axis=1)[:, :5]
    return {"top1": float((top5[:, 0] == labels).mean()), "top5": float((top5 == labels[:, None]).any(1).mean()),
            "n": int(len(labels)), "dataset": dataset}


def paired_drop(reference: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 points lost against the float model on the same images, and the standard error
    of that paired difference (only images where exactly one of the two is right count)."""
    d = (reference.argmax(1) == labels).astype(np.float64) - (scores.argmax(1) == labels)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"points": float(100 * d.mean()), "standard_error": float(100 * se)}


def measure_latency(call, warmup: int, runs: int) -> dict:
    """Median and p90 milliseconds of ``call()`` (one inference, input already converted)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


# ---------------------------------------------------------------- the stage

def _image_batches(sets, cfg: ValidateConfig, pre):
    """(pixels uint8 NHWC, labels or None) batches, and a description of the images."""
    if sets.eval is not None:
        paths, labels = sets.eval.paths, np.asarray(sets.eval.labels)

        def gen():
            for s in range(0, len(paths), cfg.batch_size):
                yield (np.stack([pre.pixels(open_image(p)) for p in paths[s:s + cfg.batch_size]]),
                       labels[s:s + cfg.batch_size])
        return gen(), len(paths), sets.eval_description
    images = sample_images(cfg.fidelity_images, seed=2)

    def gen():
        for s in range(0, len(images), cfg.batch_size):
            yield np.stack([pre.pixels(im) for im in images[s:s + cfg.batch_size]]), None
    return gen(), len(images), (f"{len(images)} natural sample photos (scikit-image's bundled "
                                "images, crops and flips): label-free fidelity only")


def run(cfg: ValidateConfig, inputs: dict, out_dir: Path, data: DataConfig) -> dict:
    export_dir = inputs["export"]
    exported = facts_of(export_dir)
    reference, ckpt = load_model(inputs["reparam"] / "fused.pt")
    meta = dict(ckpt.meta)
    if cfg.crop_pct:
        meta["crop_pct"] = cfg.crop_pct
    pre = preprocess_of(meta)
    sets = resolve_sets(data, meta["classes"])
    artifacts = [a for a in exported["artifacts"] if a.get("path")]
    runtimes = {a["format"]: open_runtime(a["format"], export_dir / a["path"], meta) for a in artifacts}
    batches, n, eval_desc = _image_batches(sets, cfg, pre)
    ref_scores, scores, labels = [], {f: [] for f in runtimes}, []
    with Progress(n, f"evaluating {len(runtimes) + 1} models on images") as bar:
        for pixels, y in batches:
            with torch.no_grad():
                ref_scores.append(reference(torch.from_numpy(normalized(pixels, meta))).numpy())
            for f, rt in runtimes.items():
                scores[f].append(rt.predict(pixels))
            if y is not None:
                labels.append(y)
            bar.update(len(pixels))
    ref = np.concatenate(ref_scores)
    y = np.concatenate(labels) if labels else None
    dataset = sets.eval.name if sets.eval is not None else None
    out = {"eval_images": eval_desc, "calibration_images": sets.calib_description,
           "preprocess": {k: meta[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")},
           "reference": {"format": "pytorch", "runtime": f"PyTorch {torch.__version__} float32 (fused)",
                         "accuracy": accuracy(ref, y, dataset) if y is not None else None},
           "artifacts": []}
    pixel = sets_pixel(pre)
    threads_all = os.cpu_count() or 1
    for a in artifacts:
        f, rt = a["format"], runtimes[a["format"]]
        s = np.concatenate(scores[f])
        target = softmax(ref) if rt.outputs == "probabilities" else ref
        entry = {"format": f, "runtime": rt.name, "method": rt.method, "outputs": rt.outputs,
                 "accuracy": ({**accuracy(s, y, dataset), "drop_vs_float": paired_drop(ref, s, y)}
                              if y is not None else None),
                 "fidelity": fidelity(target, s), "latency": []}
        if rt.method == "measured":
            for t in cfg.threads:
                threads = t or threads_all
                timed = open_runtime(f, export_dir / a["path"], meta, threads)
                lat = measure_latency(timed.invoker(pixel), cfg.latency_warmup, cfg.latency_runs)
                entry["latency"].append({"target": f"host ({threads} thread{'s' * (threads > 1)})",
                                         "runtime": rt.name, **lat, "method": "measured",
                                         "details": f"{cpu_name()}, batch 1, {cfg.latency_warmup} "
                                                    f"warm-up + {cfg.latency_runs} runs"})
        if f == "coreml" and cfg.iphone:
            entry["latency"] += iphone_latency(export_dir / a["path"], cfg.latency_runs)
        out["artifacts"].append(entry)
    return out


def iphone_latency(path: Path, runs: int) -> list[dict]:
    from ..latency import estimate, measure_on_device

    measured = measure_on_device(path, runs)
    return ([measured] if measured else []) + [estimate(path)]


def sets_pixel(pre) -> np.ndarray:
    """One natural image, the latency probe input."""
    return pre.pixels(sample_images(1)[0])[None]
