"""Stage 5, one unit per format: the artifact in its own runtime: accuracy (with labels),
fidelity to the float PyTorch reference (always), and host latency; each figure says how
it was got. The scored images and the reference logits are the ``images`` and
``reference`` stages' (computed once for all formats)."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.core.compiled import Setting, wanted
from pipeline.core.progress import Progress
from pipeline.core.runner import facts_of
from pipeline.eval import scoring
from pipeline.eval.metrics import accuracy, fidelity, paired_drop, softmax
from pipeline.eval.timing import cpu_name, measure_latency, measured_throughput
from pipeline.io.data import preprocess_of, sample_images
from pipeline.io.scored import scored, scoring_meta
from pipeline.runtimes import open_runtime


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
    workers: int = 0               # image-decoding threads for large DATA (0: one per core, up to 8)
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


# ---------------------------------------------------------------- metrics


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
    from pipeline.eval.latency import estimate, measure_on_device

    measured = measure_on_device(path, runs)
    return ([measured] if measured else []) + [estimate(path)]


def sets_pixel(pre) -> np.ndarray:
    """One natural image, the latency probe input."""
    return pre.pixels(sample_images(1)[0])[None]
