"""Parity of exported models with PyTorch on natural images: m0.9 ONNX in the default
run; every variant through every format in the slow run."""
import numpy as np
import pytest
import torch

from pipeline.formats import get_exporter
from pipeline.formats.base import ExportContext
from pipeline.formats.coreml import CoreMLConfig
from pipeline.formats.onnx import OnnxConfig
from pipeline.formats.tflite import TFLiteConfig
from pipeline.io.data import Preprocess, normalized, sample_images
from pipeline.models import create_model, randomize_bn, reparameterize
from pipeline.runtimes.coreml import MilRuntime
from pipeline.runtimes.litert import run_tflite
from pipeline.runtimes.ort import run_onnx
from pipeline.variants import VARIANTS

CONFIGS = {"onnx": OnnxConfig, "tflite": TFLiteConfig, "coreml": CoreMLConfig}


def setup(name, size):
    v = VARIANTS[name]
    fused = reparameterize(randomize_bn(create_model(v, num_classes=1000, seed=7), seed=8))
    meta = {"input_size": size, "crop_pct": v.crop_pct, "interpolation": v.interpolation,
            "mean": list(v.mean), "std": list(v.std), "classes": [str(i) for i in range(1000)],
            "weights": {}}
    pre = Preprocess(size, v.crop_pct, v.interpolation, v.mean, v.std)
    pixels = np.stack([pre.pixels(im) for im in sample_images(6, seed=4)])
    with torch.no_grad():
        ref = fused(torch.from_numpy(normalized(pixels, meta))).numpy()
    return fused, meta, pixels, ref


def check(fmt, name, size, tmp_path):
    fused, meta, pixels, ref = setup(name, size)
    exporter = get_exporter(fmt)
    r = exporter.export(fused, ExportContext("fp32", meta, name, tmp_path / f"m{exporter.suffix}"),
                        CONFIGS[fmt]())
    if fmt == "onnx":
        got = run_onnx(r.path, normalized(pixels, meta))
    elif fmt == "tflite":
        got = run_tflite(r.path, pixels)
        e = np.exp(ref - ref.max(1, keepdims=True))
        ref = e / e.sum(1, keepdims=True)
    else:
        got = MilRuntime(r.path, meta).predict(pixels)
        e = np.exp(ref - ref.max(1, keepdims=True))
        ref = e / e.sum(1, keepdims=True)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_m0_9_onnx_parity_at_224(tmp_path):
    check("onnx", "m0.9", 224, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_every_format(fmt, name, tmp_path):
    check(fmt, name, 224, tmp_path)
