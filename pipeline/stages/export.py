"""Stage 4: the model of ``quantize`` -> one artifact per requested format, each checked
against its PyTorch twin on natural images."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ..checkpoints import load_model
from ..data import sample_images
from ..formats import ExportContext, ExportError, get_exporter, normalized
from ..runner import facts_of
from ..runtimes import open_runtime
from ..formats.coreml import CoreMLConfig
from ..formats.onnx import OnnxConfig
from ..formats.tflite import TFLiteConfig
from .qat import model_file
from .reparam import preprocess_of

Format = Literal["coreml", "onnx", "tflite"]


@dataclass
class ExportConfig:
    formats: list[Format] = field(default_factory=lambda: ["coreml", "onnx", "tflite"])
    check_images: int = 8   # natural images for the parity check of each artifact
    coreml: CoreMLConfig = field(default_factory=CoreMLConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    tflite: TFLiteConfig = field(default_factory=TFLiteConfig)

    def validate(self):
        if not self.formats:
            raise ValueError("formats is empty: name at least one of coreml, onnx, tflite")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats lists a format twice: {self.formats}")


def artifact_stem(variant: str, scheme: str) -> str:
    return f"RepViT-{variant.upper()}-{scheme}"


def run(cfg: ExportConfig, inputs: dict, out_dir: Path) -> dict:
    quant = inputs["quantize"]
    fused, ckpt = load_model(quant / "model.pt")
    quant_facts = facts_of(quant)
    scheme = quant_facts["scheme"]
    calib_file = quant / "calibration_pixels.npy"
    calibration = np.load(calib_file) if calib_file.exists() else None
    pre = preprocess_of(ckpt.meta)
    check = np.stack([pre.pixels(im) for im in sample_images(cfg.check_images, seed=1)])
    stem = artifact_stem(fused.variant.name, scheme)
    artifacts = []
    for name in cfg.formats:
        exporter = get_exporter(name)
        reason = exporter.unsupported(scheme)
        if reason:
            artifacts.append({"format": name, "path": None, "skipped": reason})
            print(f"    {name}: skipped: {reason}", file=sys.stderr)
            continue
        model = model_for(name, quant, scheme, fused)
        ctx = ExportContext(scheme, ckpt.meta, fused.variant.name, out_dir / (stem + exporter.suffix),
                            calibration, check)
        result, budget = export_within_budget(exporter, model, ctx, getattr(cfg, name), quant, quant_facts,
                                              reference=fused)
        artifacts.append({"format": name, "path": result.path.name, **result.facts,
                          **({"accuracy_aware": budget} if budget else {})})
        print(f"    {name}: {result.path.name}", file=sys.stderr)
    (out_dir / "labels.txt").write_text("\n".join(ckpt.meta["classes"]) + "\n")
    return {"scheme": scheme, "variant": fused.variant.name, "artifacts": artifacts}


def model_for(fmt: str, quant: Path, scheme: str, fused):
    """The model to export as ``fmt``: QAT's fine-tuned one for that format, else the fused one."""
    trained = quant / model_file(fmt)
    if trained.exists():
        return load_model(trained)[0]
    if scheme == "qat-int8":
        raise ExportError(f"no QAT model for {fmt}: add {fmt} to qat.formats (it lists the formats "
                          "QAT trains for)")
    return fused


def measure_drop(fmt: str, ctx: ExportContext, pixels: np.ndarray, labels: Optional[np.ndarray],
                 float_pred: np.ndarray) -> tuple[float, float]:
    """What the artifact loses against the float model, in the artifact's runtime, and the
    standard error of that paired difference: top-1 points with ``labels``, else top-1
    agreement points (the share of images whose class changes)."""
    rt = open_runtime(fmt, ctx.out_path, ctx.meta)
    pred = np.concatenate([rt.predict(pixels[i:i + 32]) for i in range(0, len(pixels), 32)]).argmax(1)
    if labels is None:
        diff = (pred != float_pred).astype(np.float64)
    else:
        diff = (float_pred == labels).astype(np.float64) - (pred == labels)
    return float(100 * diff.mean()), float(100 * diff.std(ddof=1) / np.sqrt(len(diff)))


def export_within_budget(exporter, model, ctx: ExportContext, cfg, quant_dir: Path, facts: dict,
                         reference=None):
    """Export ``model`` (every exporter honours ``ctx.float_layers``). For int8 with a
    budget, keep the most sensitive layers in float (1, 2, 4, ...) until the drop against
    ``reference`` (the float model, where QAT fine-tuned ``model``; default ``model``) on
    held-out images is within ``max_drop`` (top-1 points with labels, agreement points
    without), or until keeping more stops lowering it, and ship the best attempt. A budget
    still missed warns, or fails with ``on_budget_miss: error``."""
    result = exporter.export(model, ctx, cfg)
    max_drop = facts.get("max_drop")
    if not ctx.int8 or max_drop is None:
        return result, None
    budget = facts.get("budget_set")
    if budget is None or "skipped" in budget:
        return result, {"checked": False, "reason": (budget or {}).get("skipped", "no budget images")}
    pixels = np.load(quant_dir / "budget_pixels.npy")
    labels_file = quant_dir / "budget_labels.npy"
    labels = np.load(labels_file) if labels_file.exists() else None
    unit = "top-1 points" if labels is not None else "agreement points"
    ranking = [r["layer"] for r in json.loads((quant_dir / "sensitivity.json").read_text())]
    reference = model if reference is None else reference
    with torch.no_grad():
        float_pred = reference(torch.from_numpy(normalized(pixels, ctx.meta))).argmax(1).numpy()

    attempts = [((), *measure_drop(exporter.name, ctx, pixels, labels, float_pred))]
    k, stopped = 1, None
    while attempts[-1][1] > max_drop and k <= budget["max_float_layers"]:
        print(f"    {exporter.name}: drop {attempts[-1][1]:.2f} {unit} > max_drop {max_drop}: "
              f"{k} layer(s) in float", file=sys.stderr)
        kept = tuple(ranking[:k])
        best_so_far = min(a[1] for a in attempts)
        _remove(ctx.out_path)
        result = exporter.export(model, replace(ctx, float_layers=kept), cfg)
        attempts.append((kept, *measure_drop(exporter.name, ctx, pixels, labels, float_pred)))
        if attempts[-1][1] >= best_so_far:
            # More float layers did not help: the loss is not in the layers int8 hurts
            # most one at a time (or is within the noise); keeping more would cost speed.
            stopped = f"{k} layer(s) in float did not lower the drop"
            break
        k *= 2
    best = min(attempts, key=lambda a: a[1])
    if best is not attempts[-1]:   # an earlier attempt was better: ship that one
        _remove(ctx.out_path)
        result = exporter.export(model, replace(ctx, float_layers=best[0]), cfg)
    met = best[1] <= max_drop
    summary = {"checked": True, "unit": unit, "images": int(len(pixels)), "source": budget.get("source"),
               "met": met, "drop_before": round(attempts[0][1], 3), "drop_after": round(best[1], 3),
               "standard_error": round(best[2], 3), "float_layers": list(best[0]),
               "attempts": [{"float_layers": len(a[0]), "drop": round(a[1], 3)} for a in attempts],
               "stopped": stopped}
    if not met:
        hint = ("" if labels is not None else
                " Without labels the drop is in agreement points (an upper bound on the top-1 drop): "
                "pass a labelled CALIB to check top-1.")
        message = (f"{exporter.name} int8 misses max_drop {max_drop}: best drop {best[1]:.2f} "
                   f"± {best[2]:.2f} {unit} (1 s.e.) on {budget.get('source') or f'{len(pixels)} images'}, "
                   f"with {len(best[0])} layers in float. Raise quantize.max_drop or "
                   f"quantize.max_float_layers, or use a weight-only scheme (w8, pal6).{hint}")
        if budget.get("on_miss") == "error":
            raise ExportError(message)
        print(f"    WARNING: {message}", file=sys.stderr)
    return result, summary


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
