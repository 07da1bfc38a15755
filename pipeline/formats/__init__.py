"""Deployment formats behind one small interface.

``export(model, ctx) -> ExportResult``: the fused (float) model and what the format needs
to know -> an artifact on disk and facts for the report. A format that cannot express
a scheme says why (``unsupported``) and is skipped: nothing is ever silently substituted.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from ..data import normalize_pixels


class ExportError(RuntimeError):
    pass


@dataclass
class ExportContext:
    scheme: str                      # fp32 | fp16 | int8 | ...
    meta: dict                       # preprocessing, classes, weights (pipeline checkpoint meta)
    variant: str
    out_path: Path                   # where the artifact must be written
    calibration: Optional[np.ndarray] = None   # uint8 NHWC crops
    check_inputs: Optional[np.ndarray] = None  # uint8 NHWC natural crops for parity checks
    float_layers: tuple[str, ...] = ()         # fused-model layers the int8 scheme keeps in float
    # qat-int8: {layer: {"input": [lo, hi], "output": [lo, hi]}}, the ranges QAT trained with
    activation_ranges: dict = field(default_factory=dict)

    @property
    def int8(self) -> bool:
        """W8A8, post-training or after quantization-aware training (the export is the same)."""
        return self.scheme in ("int8", "qat-int8")

    @property
    def weights_origin(self) -> str:
        return ("weights fine-tuned by quantization-aware training" if self.scheme == "qat-int8"
                else "post-training: no training")


@dataclass
class ExportResult:
    path: Path
    facts: dict = field(default_factory=dict)


class Exporter(Protocol):
    name: str
    suffix: str

    def unsupported(self, scheme: str) -> Optional[str]:
        """Why ``scheme`` cannot be expressed in this format, or None."""

    def export(self, model: torch.nn.Module, ctx: ExportContext, cfg) -> ExportResult:
        ...


class SchemeSupport:
    """``unsupported`` from data: the schemes an exporter produces, and why it cannot
    produce others (keys are scheme prefixes)."""
    name: str
    schemes: tuple[str, ...] = ()
    cannot: dict[str, str] = {}

    def unsupported(self, scheme: str) -> Optional[str]:
        if scheme in self.schemes:
            return None
        for prefix, reason in self.cannot.items():
            if scheme.startswith(prefix):
                return reason
        return f"{scheme} for {self.name} is not available in this version"


def model_metadata(ctx: ExportContext, input_layout: str) -> dict[str, str]:
    """What an app needs to feed and read the model, as strings (ONNX metadata_props; the
    report for formats that keep it beside the model)."""
    m = ctx.meta
    return {"labels": json.dumps(m["classes"]), "mean": json.dumps(m["mean"]), "std": json.dumps(m["std"]),
            "input_layout": input_layout, "input_size": str(m["input_size"]), "crop_pct": str(m["crop_pct"]),
            "interpolation": m["interpolation"], "variant": ctx.variant,
            "weights_sha256": str(m.get("weights", {}).get("sha256")), "scheme": ctx.scheme}


def normalized(pixels: np.ndarray, meta: dict) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, normalized as the model expects."""
    return normalize_pixels(pixels, meta["mean"], meta["std"])


def percentile_range(mins, maxs, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """An activation's int8 range from each calibration image's own min and max (rows): the
    range that covers ``percentile`` % of the images whole. Outlier images widen a min/max
    union; the percentile stays put as the calibration set grows (README "int8 fidelity")."""
    return (np.percentile(np.asarray(mins), 100 - percentile, axis=0),
            np.percentile(np.asarray(maxs), percentile, axis=0))


class ValueTails:
    """Per tensor, the values at the two ends of everything the calibration images put
    through it, kept as running bottom-k / top-k: the range that clips the fraction
    ``(100 - percentile) / 200`` of all values at each end. This is onnxruntime's percentile
    calibration (``CalibPercentile``, 99.999: 0.0005% of the values, split over both tails),
    computed exactly instead of from a 2048-bin histogram, for the formats whose tools do not
    offer it (README "int8 fidelity": better than the per-image statistic on the shared
    reference, worse on a second model; an option, not a default)."""

    def __init__(self, percentile: float, n_images: int):
        self.tail = (100.0 - percentile) / 200.0
        self.n_images = n_images
        self.low: dict = {}
        self.high: dict = {}

    def add(self, key, values, images: int = 1) -> None:
        """``values``: one tensor's values for ``images`` calibration images (any shape)."""
        flat = torch.as_tensor(values).detach().reshape(-1).float().cpu()
        k = max(1, math.ceil(self.tail * self.n_images * flat.numel() / images))
        for ends, largest in ((self.low, False), (self.high, True)):
            both = torch.cat([ends[key], flat]) if key in ends else flat
            ends[key] = both.topk(min(k, both.numel()), largest=largest).values

    def range(self, key) -> tuple[float, float]:
        """[the k-th smallest, the k-th largest] value seen."""
        return float(self.low[key].max()), float(self.high[key].min())

    def __contains__(self, key) -> bool:
        return key in self.high


def ranged_per_tensor(observer) -> bool:
    """A per-tensor observer whose range comes from the data (not a fixed one, such as
    coremltools' FixedQParamsObserver for sigmoid outputs, which has no min / max)."""
    return (hasattr(observer, "min_val")
            and getattr(observer, "qscheme", None) in (torch.per_tensor_affine, torch.per_tensor_symmetric))


@contextlib.contextmanager
def _inputs_to(modules, record):
    """``record(module, input)`` on every call of each module while the block runs."""
    handles = [m.register_forward_pre_hook(lambda m, args: record(m, args[0])) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def per_image_extremes(modules):
    """Each module's input minima and maxima, one per image, while the block runs (forward
    pre-hooks): the statistics ``percentile_range`` takes. Modules never called keep empty lists."""
    seen = {m: ([], []) for m in modules}

    def record(module, x):
        flat = x.detach().reshape(x.shape[0], -1)
        seen[module][0].append(flat.amin(1))
        seen[module][1].append(flat.amax(1))

    with _inputs_to(modules, record):
        yield seen


@contextlib.contextmanager
def input_ranges(modules, percentile: float, of_values: bool, n_images: int):
    """Each module's input range over the calibration images that run through the block:
    ``percentile_range`` of the images' own extremes, or with ``of_values`` the range that
    clips ``(100 - percentile) / 200`` of all values at each end (``ValueTails``; the
    batch's first dimension counts images). Yields a dict, filled on exit with
    ``{module: (lo, hi)}`` for every module that was called."""
    ranges = {}
    if of_values:
        tails = ValueTails(percentile, n_images)
        with _inputs_to(modules, lambda module, x: tails.add(module, x, images=x.shape[0])):
            yield ranges
        ranges.update({m: tails.range(m) for m in modules if m in tails})
    else:
        with per_image_extremes(modules) as extremes:
            yield ranges
        ranges.update({m: tuple(float(v) for v in percentile_range(torch.cat(mins).cpu(), torch.cat(maxs).cpu(),
                                                                   percentile))
                       for m, (mins, maxs) in extremes.items() if mins})


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (what Core ML and TFLite artifacts output)."""
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kl_per_image(float_probs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """KL(float || artifact) of each image's class probabilities: how far the artifact's
    whole output moved, a continuous measure with far less variance than a flipped top-1."""
    eps = 1e-12
    return (float_probs * (np.log(float_probs + eps) - np.log(probs + eps))).sum(1)


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """max |diff| relative to max |reference| and top-1 agreement."""
    diff = float(np.abs(reference - candidate).max())
    scale = float(np.abs(reference).max())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / max(scale, 1e-12),
            "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
            "n": int(len(reference))}


def check_parity(name: str, reference: np.ndarray, candidate: np.ndarray, runtime: str,
                 gate: Optional[float]) -> dict:
    """Parity facts of ``candidate`` against ``reference``; with ``gate`` (a tolerance
    relative to max |reference|, for float schemes) a larger difference is an error."""
    p = {**parity(reference, candidate), "runtime": runtime}
    if gate is not None and p["relative"] > gate:
        raise ExportError(f"{name} parity failed: max |diff| {p['max_abs_diff']:.3g} > "
                          f"{gate:g} x max |output| {p['max_abs_logit']:.3g}")
    return p


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def get_exporter(name: str) -> Exporter:
    if name == "onnx":
        from .onnx import OnnxExporter
        return OnnxExporter()
    if name == "coreml":
        from .coreml import CoreMLExporter
        return CoreMLExporter()
    if name == "tflite":
        from .tflite import TFLiteExporter
        return TFLiteExporter()
    raise ExportError(f"unknown format {name!r}; formats: coreml, onnx, tflite")
