"""Stage 5, one unit per format: the artifact in its own runtime: accuracy (with labels),
fidelity to the float PyTorch reference (always), and host latency; each figure says how
it was got. The scored images and the reference logits are the ``images`` and
``reference`` stages' (computed once for all formats)."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from .. import scoring
from ..compiled import Setting, wanted
from ..data import sample_images
from ..formats import kl_per_image, softmax
from ..progress import Progress
from ..runner import facts_of
from ..runtimes import open_runtime
from .images import scored, scoring_meta
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
    workers: int = 0               # image-decoding processes for large DATA (0: one per core, up to 8)
    processes: int = 1             # > 1: each format scored by this many processes under torchrun
    # PyTorch scorers (float reference, Core ML simulation) compiled with inductor: auto from
    # compiled.AUTO_MIN_IMAGES scored images on (compiling costs 5-60 s).
    compile: Setting = "auto"

    def validate(self):
        if self.latency_runs < 1 or self.batch_size < 1:
            raise ValueError("latency_runs and batch_size must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 (one per core) or more")
        if self.processes < 1:
            raise ValueError("processes must be at least 1 (1: score in this process)")


def narrow(cfg: ValidateConfig) -> ValidateConfig:
    """What one format's validation reads (the images and their decoding are the ``images`` stage's)."""
    return replace(cfg, fidelity_images=0, workers=0)


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

# Bins of the float model's top-1 minus top-2 probability. On the trained reference, 93% of
# post-training int8's disagreements with float fell on the 10% of images below 0.05: an
# int8 model flips near-ties, not decisions (README, int8 fidelity).
MARGIN_EDGES = (0.0, 0.05, 0.1, 0.2, 0.5)


def agreement_by_float_margin(float_probs: np.ndarray, probs: np.ndarray) -> list[dict]:
    """Top-1 agreement per bin of the float model's top-1 / top-2 probability margin: where
    an artifact's disagreements lie (near-ties, or images float was sure about)."""
    top2 = np.sort(float_probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    agree = float_probs.argmax(1) == probs.argmax(1)
    bins = []
    for lo, hi in zip(MARGIN_EDGES, MARGIN_EDGES[1:] + (None,)):
        m = (margin >= lo) & (margin < hi if hi is not None else True)
        n = int(m.sum())
        bins.append({"float_margin": [lo, hi], "images": n, "disagreements": int((~agree[m]).sum()),
                     "agreement": float(agree[m].mean()) if n else None})
    return bins


def fidelity(reference: np.ndarray, scores: np.ndarray, float_probs: Optional[np.ndarray] = None,
             probs: Optional[np.ndarray] = None) -> dict:
    """Top-1 agreement, mean cosine and SQNR (dB) of ``scores`` against ``reference`` (both
    logits or both probabilities), and, given both models' class probabilities, the mean
    KL(float || artifact) and the agreement per bin of float's top-2 margin."""
    num = (reference * scores).sum(1)
    den = np.linalg.norm(reference, axis=1) * np.linalg.norm(scores, axis=1) + 1e-30
    noise = ((reference - scores) ** 2).sum()
    sqnr = float("inf") if noise == 0 else float(10 * np.log10((reference ** 2).sum() / noise))
    return {"top1_agreement": float((reference.argmax(1) == scores.argmax(1)).mean()),
            "cosine": float((num / den).mean()), "sqnr_db": sqnr, "n": int(len(reference)),
            **({"mean_kl": float(kl_per_image(float_probs, probs).mean()),
                "agreement_by_float_margin": agreement_by_float_margin(float_probs, probs)}
               if probs is not None else {})}


def accuracy(scores: np.ndarray, labels: np.ndarray, dataset: str) -> dict:
    top5 = np.argsort(-scores, axis=1)[:, :5]
    return {"top1": float((top5[:, 0] == labels).mean()), "top5": float((top5 == labels[:, None]).any(1).mean()),
            "n": int(len(labels)), "dataset": dataset}


def points_with_se(diff: np.ndarray) -> tuple[float, float]:
    """Mean of a per-image paired difference (1, 0 or -1 per image) in points, and its
    standard error."""
    d = np.asarray(diff, np.float64)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(100 * d.mean()), float(100 * se)


def paired_drop(reference: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 points lost against the float model on the same images, and the standard error
    of that paired difference (only images where exactly one of the two is right count)."""
    points, se = points_with_se((reference.argmax(1) == labels).astype(np.float64) - (scores.argmax(1) == labels))
    return {"points": points, "standard_error": se}


def measured_throughput(images: int, seconds: float, runtime: str, batch_size: int) -> dict:
    """Scoring speed as measured (wall clock of the scoring loop alone: no runtime
    loading, no latency timing), what ImageNet-scale estimates scale by."""
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else None,
            "method": "measured", "details": f"{runtime}, batch {batch_size}, {cpu_name()}, {os.cpu_count()} cores"}


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

def run(fmt: str, cfg: ValidateConfig, inputs: dict, out_dir: Path) -> dict:
    """One format's artifact (``export.<fmt>``) scored on the ``images`` entry, against
    the ``reference`` logits, and timed. Its own cached unit: a failing runtime costs only
    this format."""
    export_dir = inputs[f"export.{fmt}"]
    artifacts = [a for a in facts_of(export_dir)["artifacts"] if a.get("path")]
    if not artifacts:
        return {"artifacts": []}
    (a,) = artifacts
    meta = scoring_meta(inputs["reparam"], cfg.crop_pct)
    pixels, y = scored(inputs["images"])
    ref = np.load(inputs["reference"] / "logits.npy", mmap_mode="r")
    # Scoring uses every core (ONNX int8 105 -> 137, TFLite 153 -> 284 images/s with 2;
    # onnxruntime as one-thread lanes, OnnxRuntime); latency below is timed at each of ``threads``.
    compile = wanted(cfg.compile, len(pixels))
    cores = os.cpu_count() or 1
    simulation = a.get("simulation", "int8")   # export.coreml.simulation, as the export's check used
    rt = open_runtime(fmt, export_dir / a["path"], meta, threads=cores, compile=compile,
                      batch_size=cfg.batch_size, lanes=cores, simulation=simulation)
    how = f"{cfg.processes} processes (torchrun)" if cfg.processes > 1 else rt.name
    start = time.perf_counter()
    with Progress(len(pixels), f"{fmt}: scoring images in {how}") as bar:
        s = scoring.score(fmt, export_dir / a["path"], meta, inputs["images"] / "pixels.npy", cfg.batch_size,
                          cfg.processes, out_dir / ".shards", bar.update, runtime=rt, compile=compile,
                          simulation=simulation)
    throughput = measured_throughput(len(pixels), time.perf_counter() - start,
                                     how if cfg.processes > 1 else rt.name, cfg.batch_size)
    shutil.rmtree(out_dir / ".shards", ignore_errors=True)
    ref = np.asarray(ref)
    dataset = facts_of(inputs["images"])["dataset"]
    ref_probs = softmax(ref)
    probs = s if rt.outputs == "probabilities" else softmax(s)
    target = ref_probs if rt.outputs == "probabilities" else ref
    entry = {"format": fmt, "runtime": rt.name, "method": rt.method, "outputs": rt.outputs,
             "accuracy": ({**accuracy(s, y, dataset), "drop_vs_float": paired_drop(ref, s, y)}
                          if y is not None else None),
             "fidelity": fidelity(target, s, ref_probs, probs), "throughput": throughput, "latency": []}
    if getattr(rt, "compiled", None) and cfg.processes == 1:
        entry["compiled"] = rt.compiled.facts
    if rt.method == "measured":
        pixel = sets_pixel(preprocess_of(meta))
        for t in cfg.threads:
            threads = t or os.cpu_count() or 1
            timed = open_runtime(fmt, export_dir / a["path"], meta, threads)
            lat = measure_latency(timed.invoker(pixel), cfg.latency_warmup, cfg.latency_runs)
            entry["latency"].append({"target": f"host ({threads} thread{'s' * (threads > 1)})",
                                     "runtime": timed.name, **lat, "method": "measured",
                                     "details": f"{cpu_name()}, batch 1, {cfg.latency_warmup} "
                                                f"warm-up + {cfg.latency_runs} runs"})
    if fmt == "coreml" and cfg.iphone:
        entry["latency"] += iphone_latency(export_dir / a["path"], cfg.latency_runs)
    return {"artifacts": [entry]}


def iphone_latency(path: Path, runs: int) -> list[dict]:
    from ..latency import estimate, measure_on_device

    measured = measure_on_device(path, runs)
    return ([measured] if measured else []) + [estimate(path)]


def sets_pixel(pre) -> np.ndarray:
    """One natural image, the latency probe input."""
    return pre.pixels(sample_images(1)[0])[None]
