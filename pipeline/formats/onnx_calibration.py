"""onnxruntime's percentile calibration, a stride of images per run, counted by torch.

``quantize_static`` calibrates by running the float model's augmented graph (every tensor
it quantizes made an output) one image at a time, and folds each stride of images into a
histogram of |x| per tensor with numpy (``HistogramCollector.collect_absolute_value``: its
percentile method is symmetric unless told otherwise). Here the same augmented graph
(onnxruntime's own ``PercentileCalibrater.augment_graph``: the same tensors), in the same
kind of session, one image per run, and the same histograms are counted by ``torch.histc``
on every core instead of ``np.histogram``'s sorted search. The thresholds are onnxruntime's own ``compute_percentile``
of those histograms; they reach ``quantize_static`` as its calibration cache
(``calibration_cache_path``), so everything after calibration (range adjustments, QAT
overrides, QDQ placement) is onnxruntime's, unchanged. Same ranges to 1e-7 of each range
(tests/formats/test_quantization.py), in less time (docs/benchmarks.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


class AbsoluteHistograms:
    """onnxruntime's ``HistogramCollector.collect_absolute_value``, the statistic of its
    percentile calibration (``CalibTensorRangeSymmetric`` defaults to true for it): per
    tensor a histogram of |x|, its bins set by the first stride's range and extended by
    whole bins when a later stride's max|x| exceeds the last edge (values below the first
    edge are not counted, as there), and the tensor's min and max. Counted by
    ``torch.histc`` over the bins' span instead of ``np.histogram``'s sorted search."""

    def __init__(self, num_bins: int = 2048):
        self.num_bins = num_bins
        self.histogram_dict: dict = {}

    def collect(self, tensor: str, values: np.ndarray, owned: bool = False) -> None:
        """Fold one stride's ``values`` in (``owned``: a copy that may be overwritten)."""
        data = torch.from_numpy(np.ascontiguousarray(values)).reshape(-1)
        dtype = data.numpy().dtype
        if data.numel():
            lo, hi = (v.numpy() for v in torch.aminmax(data))
        else:
            lo = hi = np.array(0, dtype=dtype)
        magnitude = data.abs_() if owned else data.abs()   # in place where the values are a copy
        old = self.histogram_dict.get(tensor)
        if old is None:
            first, last = (float(v) for v in torch.aminmax(magnitude)) if data.numel() else (0.0, 0.0)
            if first == last:               # np.histogram widens an empty span by 0.5 each side
                first, last = first - 0.5, last + 0.5
            edges = np.linspace(first, last, self.num_bins + 1).astype(dtype)
            hist = torch.histc(magnitude, self.num_bins, min=first, max=last).to(torch.int64).numpy()
            self.histogram_dict[tensor] = (hist, edges, lo, hi)
            return
        old_hist, edges, old_min, old_max = old
        top = magnitude.max().numpy()
        if top > edges[-1]:
            width = edges[1] - edges[0]
            edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width))).astype(dtype)
        hist = torch.histc(magnitude, len(edges) - 1, min=float(edges[0]), max=float(edges[-1])).to(torch.int64).numpy()
        hist[:len(old_hist)] += old_hist
        self.histogram_dict[tensor] = (hist, edges, min(old_min, lo), max(old_max, hi))


def percentile_calibration_cache(model_path: Path, calibration: np.ndarray, percentile: float, stride: int,
                                 cache: Path, input_name: str = "input", num_bins: int = 2048) -> int:
    """Write onnxruntime's percentile calibration of ``model_path`` on ``calibration``
    (float NCHW) to ``cache`` (its calibration-cache JSON); returns the number of tensors."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, HistogramCollector,
                                                    PercentileCalibrater, TensorsData, save_tensors_data)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))   # quantize_static's default op types
    with tempfile.TemporaryDirectory() as tmp:
        calibrater = PercentileCalibrater(model_path, op_types_to_calibrate=ops,
                                          augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                          symmetric=True, num_bins=num_bins, percentile=percentile)
        calibrater.augment_graph()
        calibrater.create_inference_session()
        session, wanted = calibrater.infer_session, calibrater.tensors_to_calibrate
        names = [o.name for o in session.get_outputs()]
        histograms = AbsoluteHistograms(num_bins)
        for start in range(0, len(calibration), stride):
            # One image per run, as onnxruntime's calibrator: a batched run needs that many
            # images' intermediate buffers at once (m0.9 at 224 px, 16 images: +1 GB peak).
            runs = [session.run(None, {input_name: calibration[i:i + 1]})
                    for i in range(start, min(start + stride, len(calibration)))]
            for k, name in enumerate(names):
                if name in wanted:
                    histograms.collect(name, np.concatenate([run[k] for run in runs]), owned=True)
            del runs
        collector = HistogramCollector(method="percentile", symmetric=True, num_bins=num_bins,
                                       num_quantized_bins=128, percentile=percentile, scenario="same")
        collector.histogram_dict = histograms.histogram_dict
        thresholds = collector.compute_collection_result()
    save_tensors_data(TensorsData(CalibrationMethod.Percentile, thresholds), cache)
    return len(thresholds)
