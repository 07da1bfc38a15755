"""Activation range statistics over calibration images (every format's int8 calibration and QAT use them)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch


def percentile_range(mins, maxs, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """An activation's int8 range from each calibration image's own min and max (rows): the
    range that covers ``percentile`` % of the images whole. Outlier images widen a min/max
    union; the percentile stays put as the calibration set grows (docs/int8-fidelity.md)."""
    return (np.percentile(np.asarray(mins), 100 - percentile, axis=0),
            np.percentile(np.asarray(maxs), percentile, axis=0))


class ValueTails:
    """Per tensor, the values at the two ends of everything the calibration images put
    through it, kept as running bottom-k / top-k: the range that clips the fraction
    ``(100 - percentile) / 200`` of all values at each end, computed exactly. Modelled on
    onnxruntime's percentile calibration, which it is not quite: onnxruntime (1.32, default
    ``CalibTensorRangeSymmetric``) takes the percentile of |x| from a 2048-bin histogram, a
    range -t..t cut to the tensor's min..max (formats/onnx_calibration.py, found 2026-12-02).
    For the formats whose tools offer neither (docs/int8-fidelity.md: better than the
    per-image statistic on the shared reference, worse on a second model; an option, not a
    default)."""

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
