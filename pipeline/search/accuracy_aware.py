"""The accuracy-aware pass: int8 with the most sensitive layers kept in float while that brings the artifact closer to float."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.eval.metrics import kl_per_image, points_with_se, softmax
from pipeline.eval.timing import alternate_latency, cpu_name
from pipeline.formats.base import ExportContext, ExportError
from pipeline.io.data import normalized
from pipeline.runtimes import open_runtime

log = logging.getLogger(__name__)


def probabilities(fmt: str, ctx: ExportContext, pixels: np.ndarray, simulation: str = "int8") -> np.ndarray:
    """Class probabilities of the artifact at ``ctx.out_path``, in its own runtime
    (``simulation``: how Core ML is simulated where it cannot run)."""
    rt = open_runtime(fmt, ctx.out_path, ctx.meta, simulation=simulation)
    scores = np.concatenate([rt.predict(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    return scores if rt.outputs == "probabilities" else softmax(scores)


def held_out(quant_dir: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The quantize stage's held-out images (the budget's) and their labels, if any."""
    labels = quant_dir / "budget_labels.npy"
    return np.load(quant_dir / "budget_pixels.npy"), (np.load(labels) if labels.exists() else None)


def drop_unit(labels: Optional[np.ndarray]) -> str:
    return "top-1 points" if labels is not None else "agreement points"


def float_probabilities(reference: torch.nn.Module, pixels: np.ndarray, meta: dict) -> np.ndarray:
    with torch.no_grad():
        return softmax(reference(torch.from_numpy(normalized(pixels, meta))).numpy())


def kl_gain(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Mean per-image KL(float || artifact) that ``after`` gains over ``before`` (paired), and
    its standard error (infinite with one image)."""
    diff = np.asarray(before, np.float64) - np.asarray(after, np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    return float(diff.mean()), se


def measure_drop(pred: np.ndarray, labels: Optional[np.ndarray], float_pred: np.ndarray) -> tuple[float, float]:
    """What the artifact loses against the float model, and the standard error of that
    paired difference: top-1 points with ``labels``, else top-1 agreement points (the share
    of images whose class changes)."""
    if labels is None:
        return points_with_se(pred != float_pred)
    return points_with_se((float_pred == labels).astype(np.float64) - (pred == labels))


# A float layer is kept only when its KL gain is this many standard errors above zero.
SIGNIFICANCE = 2.0


@dataclass
class Attempt:   # one artifact measured on the held-out images
    float_layers: tuple
    drop: float
    standard_error: float
    agreement: float
    kl: np.ndarray          # per image

    def summary(self, gain: Optional[tuple[float, float]] = None) -> dict:
        out = {"float_layers": len(self.float_layers), "drop": round(self.drop, 3),
               "agreement": round(self.agreement, 4), "mean_kl": round(float(self.kl.mean()), 6)}
        if gain is not None:
            out["kl_gain"], out["kl_gain_se"] = round(gain[0], 6), round(gain[1], 6)
        return out


def measure(fmt: str, ctx: ExportContext, pixels: np.ndarray, labels: Optional[np.ndarray],
            float_probs: np.ndarray, simulation: str = "int8", layers: tuple = ()) -> Attempt:
    """The artifact at ``ctx.out_path`` on the held-out images, in its own runtime: its drop
    against float, agreement and per-image KL(float || artifact)."""
    probs = probabilities(fmt, ctx, pixels, simulation)
    pred, float_pred = probs.argmax(1), float_probs.argmax(1)
    return Attempt(layers, *measure_drop(pred, labels, float_pred), float((pred == float_pred).mean()),
                   kl_per_image(float_probs, probs))


def export_within_budget(exporter, model, ctx: ExportContext, cfg, quant_dir: Path, facts: dict,
                         reference=None):
    """Export ``model`` (every exporter honours ``ctx.float_layers``). For int8 with a
    budget, keep the most sensitive layers in float (1, 2, 4, ...) while the drop against
    ``reference`` (the float model, where QAT fine-tuned ``model``; default ``model``) on
    held-out images exceeds ``max_drop`` (top-1 points with labels, agreement points
    without). Each attempt is measured in the artifact's own runtime and accepted only when
    it brings the artifact's outputs closer to float by more than the noise: the mean
    per-image KL(float || artifact) falls by more than ``SIGNIFICANCE`` standard errors of
    the paired difference. Top-1 flips on a few thousand images are too noisy to decide on
    (a float layer that does not really help only costs speed). The first attempt that
    does not help ends the pass; the best accepted attempt ships. A budget still missed
    warns, or fails with ``on_budget_miss: error``."""
    result = exporter.export(model, ctx, cfg)
    max_drop = facts.get("max_drop")
    if not ctx.int8 or max_drop is None:
        return result, None
    budget = facts.get("budget_set")
    if budget is None or "skipped" in budget:
        return result, {"checked": False, "reason": (budget or {}).get("skipped", "no budget images")}
    pixels, labels = held_out(quant_dir)
    unit = drop_unit(labels)
    ranking = [r["layer"] for r in json.loads((quant_dir / "sensitivity.json").read_text())]
    float_probs = float_probabilities(model if reference is None else reference, pixels, ctx.meta)
    simulation = getattr(cfg, "simulation", "int8")

    def attempt(layers: tuple) -> Attempt:
        return measure(exporter.name, ctx, pixels, labels, float_probs, simulation, layers)

    best = attempt(())
    attempts = [best.summary()]
    k, stopped = 1, None
    all_int8 = ctx.out_path.with_name(ctx.out_path.stem + ".all-int8" + ctx.out_path.suffix)
    if best.drop > max_drop and k <= budget["max_float_layers"]:
        _copy(ctx.out_path, all_int8)   # kept to time against the shipped artifact
    while best.drop > max_drop and k <= budget["max_float_layers"]:
        log.info(f"    {exporter.name}: drop {best.drop:.2f} {unit} > max_drop {max_drop}: "
                 f"{k} layer(s) in float")
        kept = tuple(ranking[:k])
        remove_artifact(ctx.out_path)
        result = exporter.export(model, replace(ctx, float_layers=kept), cfg)
        tried = attempt(kept)
        gain = kl_gain(best.kl, tried.kl)
        attempts.append(tried.summary(gain))
        if not gain[0] > SIGNIFICANCE * gain[1]:
            # Not closer to float beyond the noise: the loss is not in the layers int8 hurts
            # most one at a time; keeping more would cost speed for nothing.
            stopped = (f"{k} layer(s) in float did not bring the outputs closer to float "
                       f"(KL gain {gain[0]:.2e} ± {gain[1]:.2e}, needs > {SIGNIFICANCE:g} s.e.)")
            break
        best = tried
        k *= 2
    if len(attempts) > 1 and best is not tried:
        remove_artifact(ctx.out_path)   # the last attempt was refused: ship the best accepted one
        result = exporter.export(model, replace(ctx, float_layers=best.float_layers), cfg)
    met = best.drop <= max_drop
    summary = {"checked": True, "unit": unit, "images": int(len(pixels)), "source": budget.get("source"),
               "met": met, "drop_before": attempts[0]["drop"], "drop_after": round(best.drop, 3),
               "standard_error": round(best.standard_error, 3), "float_layers": list(best.float_layers),
               "criterion": f"mean KL(float || artifact) lower by > {SIGNIFICANCE:g} standard errors",
               "attempts": attempts, "stopped": stopped}
    if all_int8.exists():
        try:
            if best.float_layers:
                summary["latency_vs_all_int8"] = latency_vs_all_int8(exporter.name, ctx, all_int8, pixels[:1])
        finally:
            remove_artifact(all_int8)
    if not met:
        hint = ("" if labels is not None else
                " Without labels the drop is in agreement points (an upper bound on the top-1 drop): "
                "pass a labelled CALIB to check top-1.")
        message = (f"{exporter.name} int8 misses max_drop {max_drop}: best drop {best.drop:.2f} "
                   f"± {best.standard_error:.2f} {unit} (1 s.e.) on "
                   f"{budget.get('source') or f'{len(pixels)} images'}, with {len(best.float_layers)} "
                   f"layers in float. Raise quantize.max_drop or quantize.max_float_layers, or use a "
                   f"weight-only scheme (w8, pal6).{hint}")
        if budget.get("on_miss") == "error":
            raise ExportError(message)
        log.warning(message)
    return result, summary


def latency_vs_all_int8(fmt: str, ctx: ExportContext, all_int8: Path, pixel: np.ndarray) -> dict:
    """Host latency of the shipped artifact (some layers float) next to the all-int8 one:
    what the accuracy-aware pass cost in speed. 1 thread, batch 1, alternating runs."""
    shipped, plain = open_runtime(fmt, ctx.out_path, ctx.meta), open_runtime(fmt, all_int8, ctx.meta)
    if shipped.method != "measured":
        return {"method": "not measured", "details": f"{shipped.name} cannot be timed on this host"}
    ms_shipped, ms_plain = alternate_latency([shipped, plain], pixel, warmup=5, runs=30)
    return {"shipped_ms": round(ms_shipped, 3), "all_int8_ms": round(ms_plain, 3),
            "ratio": round(ms_shipped / ms_plain, 3), "method": "measured",
            "details": f"{shipped.name}, {cpu_name()}, 1 thread, batch 1, medians of 30 alternating runs"}


def _copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)


def remove_artifact(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
