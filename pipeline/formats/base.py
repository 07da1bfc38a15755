"""The exporter interface: what every format's exporter takes and returns."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from pipeline.schemes import unsupported
from pipeline.variants import get_variant


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
    """``unsupported`` from the one scheme table (pipeline/schemes.py), by format name."""
    name: str

    def unsupported(self, scheme: str) -> Optional[str]:
        return unsupported(self.name, scheme)


def model_metadata(ctx: ExportContext, input_layout: str) -> dict[str, str]:
    """What an app needs to feed and read the model, as strings (ONNX metadata_props; the
    report for formats that keep it beside the model)."""
    m = ctx.meta
    return {"labels": json.dumps(m["classes"]), "mean": json.dumps(m["mean"]), "std": json.dumps(m["std"]),
            "input_layout": input_layout, "input_size": str(m["input_size"]), "crop_pct": str(m["crop_pct"]),
            "interpolation": m["interpolation"], "variant": ctx.variant,
            "weights_sha256": str(m.get("weights", {}).get("sha256")), "scheme": ctx.scheme}


def weights_license(ctx: ExportContext) -> str:
    """The licence an artifact's metadata names: the release's (the variant table's) for the
    official weights; otherwise the pipeline cannot know it."""
    if str(ctx.meta.get("weights", {}).get("source", "")).startswith("official"):
        return f"{get_variant(ctx.variant).weights.license} (RepViT official weights)"
    return "see the weights' source"


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
