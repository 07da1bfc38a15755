"""qat-int8 ships the fine-tuned artifact only where it beats post-training int8: both
artifacts of a format measured in that format's own runtime on the held-out images, and the
QAT one kept when its mean KL(float || artifact) is lower by more than the noise."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.eval.metrics import kl_per_image, softmax
from pipeline.formats.base import ExportContext, ExportResult
from pipeline.io.data import normalized
from pipeline.search.accuracy_aware import SIGNIFICANCE, measure_drop, probabilities

log = logging.getLogger(__name__)

# What a user can change when the fine-tuned artifact does not beat post-training int8.
HINT = ("more QAT steps and training images (qat.steps, qat.train_images), or a GPU (qat.device: cuda), "
        "as measured in docs/qat.md")


def compare(kl_qat: np.ndarray, kl_ptq: np.ndarray) -> tuple[bool, float, float]:
    """(QAT wins, mean paired KL gain of QAT over PTQ, its standard error). QAT wins only
    when the gain exceeds ``SIGNIFICANCE`` standard errors."""
    diff = np.asarray(kl_ptq, np.float64) - np.asarray(kl_qat, np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    gain = float(diff.mean())
    return gain > SIGNIFICANCE * se, gain, se


def _measure(fmt: str, ctx: ExportContext, pixels, labels, float_probs, simulation: str) -> tuple[dict, np.ndarray]:
    probs = probabilities(fmt, ctx, pixels, simulation)
    drop, se = measure_drop(probs.argmax(1), labels, float_probs.argmax(1))
    kl = kl_per_image(float_probs, probs)
    return ({"drop": round(drop, 3), "standard_error": round(se, 3),
             "agreement": round(float((probs.argmax(1) == float_probs.argmax(1)).mean()), 4),
             "mean_kl": round(float(kl.mean()), 6)}, kl)


def qat_or_ptq(fmt: str, qat: tuple[ExportResult, ExportContext], ptq: tuple[ExportResult, ExportContext],
               reference: torch.nn.Module, quant_dir: Path, budget: Optional[dict], qat_seconds: Optional[float],
               simulation: str = "int8") -> tuple[ExportResult, dict]:
    """Measure both artifacts on the held-out images (``quant_dir``/budget_pixels.npy) against
    the float ``reference``; keep the winner at the QAT artifact's path (the other is
    deleted). Returns the shipped result and the comparison for the report."""
    (qat_result, qat_ctx), (ptq_result, ptq_ctx) = qat, ptq
    pixels = np.load(quant_dir / "budget_pixels.npy")
    labels_file = quant_dir / "budget_labels.npy"
    labels = np.load(labels_file) if labels_file.exists() else None
    with torch.no_grad():
        float_probs = softmax(reference(torch.from_numpy(normalized(pixels, qat_ctx.meta))).numpy())
    rows = {}
    rows["qat"], kl_qat = _measure(fmt, qat_ctx, pixels, labels, float_probs, simulation)
    rows["ptq"], kl_ptq = _measure(fmt, ptq_ctx, pixels, labels, float_probs, simulation)
    wins, gain, se = compare(kl_qat, kl_ptq)
    facts = {**rows, "images": int(len(pixels)), "source": (budget or {}).get("source"),
             "unit": "top-1 points" if labels is not None else "agreement points",
             "kl_gain": round(gain, 8), "kl_gain_se": round(se, 8), "qat_seconds": qat_seconds,
             "criterion": f"QAT ships if its mean KL(float || artifact) is lower by > {SIGNIFICANCE:g} "
                          "standard errors of the paired difference",
             "shipped": "qat" if wins else "ptq"}
    if wins:
        _remove(ptq_ctx.out_path)
        facts["why"] = (f"QAT's artifact is closer to float: KL lower by {gain:.2e} ± {se:.2e} "
                        f"({gain / se:.1f} s.e.)" if se > 0 else "QAT's artifact is closer to float")
        return qat_result, facts
    _remove(qat_ctx.out_path)
    shutil.move(str(ptq_ctx.out_path), str(qat_ctx.out_path))
    facts["why"] = (f"QAT's artifact is not closer to float than post-training int8 beyond the noise "
                    f"(KL gain {gain:.2e} ± {se:.2e}, needs > {SIGNIFICANCE:g} s.e.): the post-training "
                    f"one ships. What would help: {HINT}")
    log.warning(f"{fmt}: {facts['why']}")
    return ExportResult(qat_ctx.out_path, ptq_result.facts), facts


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
