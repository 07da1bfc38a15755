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

from pipeline.formats.base import ExportContext, ExportResult
from pipeline.search.accuracy_aware import (SIGNIFICANCE, Attempt, drop_unit, float_probabilities, held_out,
                                            kl_gain, measure, remove_artifact)

log = logging.getLogger(__name__)

# What a user can change when the fine-tuned artifact does not beat post-training int8.
HINT = ("more QAT steps and training images (qat.steps, qat.train_images), or a GPU (qat.device: cuda), "
        "as measured in docs/qat.md")


def compare(kl_qat: np.ndarray, kl_ptq: np.ndarray) -> tuple[bool, float, float]:
    """(QAT wins, mean paired KL gain of QAT over PTQ, its standard error). QAT wins only
    when the gain exceeds ``SIGNIFICANCE`` standard errors."""
    gain, se = kl_gain(kl_ptq, kl_qat)
    return gain > SIGNIFICANCE * se, gain, se


def _row(a: Attempt) -> dict:
    return {"drop": round(a.drop, 3), "standard_error": round(a.standard_error, 3),
            "agreement": round(a.agreement, 4), "mean_kl": round(float(a.kl.mean()), 6)}


def qat_or_ptq(fmt: str, qat: tuple[ExportResult, ExportContext], ptq: tuple[ExportResult, ExportContext],
               reference: torch.nn.Module, quant_dir: Path, budget: Optional[dict], qat_seconds: Optional[float],
               simulation: str = "int8") -> tuple[ExportResult, dict]:
    """Measure both artifacts on the held-out images (``quant_dir``/budget_pixels.npy) against
    the float ``reference``; keep the winner at the QAT artifact's path (the other is
    deleted). Returns the shipped result and the comparison for the report."""
    (qat_result, qat_ctx), (ptq_result, ptq_ctx) = qat, ptq
    pixels, labels = held_out(quant_dir)
    float_probs = float_probabilities(reference, pixels, qat_ctx.meta)
    tried = {k: measure(fmt, c, pixels, labels, float_probs, simulation) for k, c in (("qat", qat_ctx), ("ptq", ptq_ctx))}
    wins, gain, se = compare(tried["qat"].kl, tried["ptq"].kl)
    facts = {**{k: _row(a) for k, a in tried.items()}, "images": int(len(pixels)), "source": (budget or {}).get("source"),
             "unit": drop_unit(labels),
             "kl_gain": round(gain, 8), "kl_gain_se": round(se, 8), "qat_seconds": qat_seconds,
             "criterion": f"QAT ships if its mean KL(float || artifact) is lower by > {SIGNIFICANCE:g} "
                          "standard errors of the paired difference",
             "shipped": "qat" if wins else "ptq"}
    if wins:
        remove_artifact(ptq_ctx.out_path)
        facts["why"] = (f"QAT's artifact is closer to float: KL lower by {gain:.2e} ± {se:.2e} "
                        f"({gain / se:.1f} s.e.)" if se > 0 else "QAT's artifact is closer to float")
        return qat_result, facts
    remove_artifact(qat_ctx.out_path)
    shutil.move(str(ptq_ctx.out_path), str(qat_ctx.out_path))
    facts["why"] = (f"QAT's artifact is not closer to float than post-training int8 beyond the noise "
                    f"(KL gain {gain:.2e} ± {se:.2e}, needs > {SIGNIFICANCE:g} s.e.): the post-training "
                    f"one ships. What would help: {HINT}")
    log.warning(f"{fmt}: {facts['why']}")
    return ExportResult(qat_ctx.out_path, ptq_result.facts), facts

