"""How close an artifact is to its float twin, and how accurate: pure numpy, no runtimes."""
from __future__ import annotations

from typing import Optional

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (what Core ML and TFLite artifacts output)."""
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kl_per_image(float_probs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """KL(float || artifact) of each image's class probabilities: how far the artifact's
    whole output moved, a continuous measure with far less variance than a flipped top-1."""
    eps = 1e-12
    return (float_probs * (np.log(float_probs + eps) - np.log(probs + eps))).sum(1)


# Bins of the float model's top-1 minus top-2 probability. On the trained reference, 93% of
# post-training int8's disagreements with float fell on the 10% of images below 0.05: an
# int8 model flips near-ties, not decisions (docs/int8-fidelity.md).
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
