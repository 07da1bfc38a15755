"""Each exporter against its PyTorch twin, on a small trained RepViT."""
import json

import numpy as np
import pytest
import torch

from pipeline.formats import get_exporter
from pipeline.formats.base import ExportContext, ExportError
from pipeline.formats.coreml import CoreMLConfig
from pipeline.formats.onnx import OnnxConfig
from pipeline.formats.tflite import TFLiteConfig
from pipeline.io.data import normalized
from pipeline.models.wrap import StdFoldedClassifier
from pipeline.runtimes.litert import run_tflite
from pipeline.runtimes.mil import MilInterpreter
from pipeline.runtimes.ort import run_onnx


def export(fmt, scheme, trained, tmp_path, cfg=None):
    exporter = get_exporter(fmt)
    cfg = cfg or {"coreml": CoreMLConfig, "onnx": OnnxConfig, "tflite": TFLiteConfig}[fmt]()
    ctx = ExportContext(scheme, trained.meta, "m0.6", tmp_path / f"m-{scheme}{exporter.suffix}",
                        trained.calibration, trained.check[:8])
    return exporter.export(trained.fused, ctx, cfg)


def reference_logits(trained, pixels=None):
    pixels = trained.check if pixels is None else pixels
    with torch.no_grad():
        return trained.fused(torch.from_numpy(normalized(pixels, trained.meta))).numpy()


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------- Core ML

def test_std_folding_into_the_stem_is_exact(trained):
    """(pixel/255 - mean) through the folded stem == normalized input through the original,
    borders included (zero padding sees the same zeros). A single averaged std is not."""
    pixels = trained.check[:8]
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
                         - np.asarray(trained.meta["mean"], np.float32).reshape(1, 3, 1, 1))
    folded = StdFoldedClassifier(trained.fused, trained.meta["std"]).eval()
    with torch.no_grad():
        got = folded(x).numpy()
        avg = StdFoldedClassifier(trained.fused, [float(np.mean(trained.meta["std"]))] * 3).eval()(x).numpy()
    want = softmax(reference_logits(trained, pixels))
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(avg - want).max() > 1e-3, "an averaged std must be visibly wrong"


def test_coreml_fp32_package_and_interpreter(trained, tmp_path):
    r = export("coreml", "fp32", trained, tmp_path)
    interp = MilInterpreter(r.path)
    desc = interp.spec.description
    assert [i.name for i in desc.input] == ["image"]
    assert desc.input[0].type.imageType.width == 32 and desc.input[0].type.imageType.colorSpace == 20  # RGB
    assert desc.predictedFeatureName == "classLabel" and desc.predictedProbabilitiesName == "classLabel_probs"
    ud = desc.metadata.userDefined
    assert ud["com.apple.coreml.model.preview.type"] == "imageClassifier" and ud["variant"] == "m0.6"
    assert desc.metadata.shortDescription and desc.metadata.author and desc.metadata.license
    assert r.facts["ops"]["conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in trained.fused.modules())
    assert "batch_norm" not in r.facts["ops"] and r.facts["compute_precision"] == "fp32"
    # The interpreter reproduces PyTorch on the fp32 program to ~1e-5 relative.
    x = trained.check[:16].transpose(0, 3, 1, 2).astype(np.float32)
    probs = np.concatenate([interp.run(x[i:i + 1]) for i in range(len(x))])
    want = softmax(reference_logits(trained, trained.check[:16]))
    assert np.abs(probs - want).max() <= 1e-5 * np.abs(want).max()
    # One batch through the batch-1 program (reshapes take the batch) gives the same rows.
    batched = interp.run(x)
    assert batched.shape == probs.shape and np.abs(batched - probs).max() <= 1e-6
    # Each intermediate is dropped after its last reader; keeping them all gives the same bits.
    assert sum(map(len, interp._free_after.values())) > r.facts["ops"]["conv"]
    keep_all = MilInterpreter(r.path)
    keep_all._free_after = {}
    assert np.array_equal(keep_all.run(x), batched)


def test_coreml_fp16_weights_within_fp16_rounding(trained, tmp_path):
    r = export("coreml", "fp16", trained, tmp_path)
    assert r.facts["compute_precision"] == "fp16" and "within fp16 rounding" in r.facts["weights_vs_fused"]
    p = r.facts["parity"]
    assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] < 5e-3 and "simulated" in p["runtime"]


def test_coreml_package_check_catches_wrong_weights(trained, tmp_path, monkeypatch):
    """Tamper with the weights after tracing: the read-back check must refuse the package."""
    from pipeline.formats import coreml

    original = coreml.StdFoldedClassifier.__init__

    def tampered(self, fused, std):
        original(self, fused, std)
        if std == trained.meta["std"]:  # the exported twin, not the checker's reference
            with torch.no_grad():
                self.model.features[3].channel_mixer.m[0].weight.mul_(1.01)
    monkeypatch.setattr(coreml.StdFoldedClassifier, "__init__", tampered)
    monkeypatch.setattr(coreml, "check_package", _check_against_untampered(coreml, original, trained))
    with pytest.raises(ExportError, match="weights read back differ"):
        export("coreml", "fp32", trained, tmp_path)


def _check_against_untampered(coreml, original, trained):
    real = coreml.check_package

    def check(path, fused, ctx, precision, weights_exact=True):
        coreml.StdFoldedClassifier.__init__ = original  # the reference side is built untampered
        return real(path, fused, ctx, precision, weights_exact)
    return check


# ---------------------------------------------------------------- ONNX

def test_onnx_fp32_parity_metadata_dynamic_batch(trained, tmp_path):
    import onnx

    r = export("onnx", "fp32", trained, tmp_path)
    model = onnx.load(str(r.path))
    assert model.opset_import[0].version == 20 and "Gelu" in r.facts["ops"]
    assert "BatchNormalization" not in r.facts["ops"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == trained.meta["classes"] and props["variant"] == "m0.6"
    assert {"mean", "std", "input_layout", "crop_pct", "weights_sha256"} <= props.keys()
    x = normalized(trained.check[:5], trained.meta)   # batch 5: the batch dimension is dynamic
    ref = reference_logits(trained, trained.check[:5])
    assert np.abs(run_onnx(r.path, x) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_float_graph_is_exported_once_per_model(trained, tmp_path, monkeypatch):
    """The accuracy-aware pass exports one model per attempt: its float graph is exported
    once and reused; other weights are exported anew (a stale graph would fail parity)."""
    import copy

    from pipeline.core.hashing import sha256_state
    from pipeline.formats.onnx import OnnxExporter

    calls = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(OnnxExporter, "_last_float_graph", None)
    for d in "abc":
        (tmp_path / d).mkdir()
    first = export("onnx", "fp32", trained, tmp_path / "a")
    again = export("onnx", "fp32", trained, tmp_path / "b")
    assert len(calls) == 1 and first.path.read_bytes() == again.path.read_bytes()
    changed = copy.deepcopy(trained)
    with torch.no_grad():
        changed.fused.classifier.weight.mul_(1.5)
    assert sha256_state(changed.fused) != sha256_state(trained.fused) == sha256_state(copy.deepcopy(trained.fused))
    r = export("onnx", "fp32", changed, tmp_path / "c")   # parity against the changed model holds
    assert len(calls) == 2 and r.facts["parity"]["relative"] <= 1e-4


# ---------------------------------------------------------------- TFLite

def test_tflite_fp32_raw_pixel_nhwc_parity(trained, tmp_path):
    """Raw RGB pixel values in (the normalization is inside the model, the mean removed
    before the stem's zero padding, exactly), probabilities out."""
    from pipeline.runtimes.litert import interpreter

    r = export("tflite", "fp32", trained, tmp_path)
    d = interpreter(r.path).get_input_details()[0]
    assert list(d["shape"]) == [1, 32, 32, 3] and d["dtype"] == np.float32
    ref = softmax(reference_logits(trained))
    got = run_tflite(r.path, trained.check)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)


def test_tflite_int8_takes_uint8_pixels_and_gives_float_probabilities(trained, tmp_path):
    from pipeline.runtimes.litert import interpreter

    r = export("tflite", "int8", trained, tmp_path)
    it = interpreter(r.path)
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    assert d["dtype"] == np.uint8 and d["quantization"] == (pytest.approx(1 / 255), 0) and o["dtype"] == np.float32
    got = run_tflite(r.path, trained.check)
    assert np.allclose(got.sum(1), 1.0, atol=1e-3)
    assert (got.argmax(1) == reference_logits(trained).argmax(1)).mean() >= 0.97
    assert r.facts["execution"]["fast_path"]


def test_tflite_fp16_halves_the_file(trained, tmp_path):
    f32 = export("tflite", "fp32", trained, tmp_path).path.stat().st_size
    r = export("tflite", "fp16", trained, tmp_path)
    assert 0.45 < r.path.stat().st_size / f32 < 0.6 and r.facts["parity"]["top1_agreement"] == 1.0


@pytest.mark.skipif(__import__("platform").system() != "Darwin", reason="Core ML prediction needs macOS")
@pytest.mark.parametrize("scheme", ["fp32", "fp16", "int8"])
def test_coreml_prediction_matches_the_simulation_on_macos(scheme, trained, tmp_path):
    from pipeline.runtimes.coreml import CoreMLRuntime, MilRuntime

    r = export("coreml", scheme, trained, tmp_path)
    real = CoreMLRuntime(r.path, trained.meta, compute_units="CPU_ONLY").predict(trained.check[:32])
    simulated = MilRuntime(r.path, trained.meta).predict(trained.check[:32])
    assert (real.argmax(1) == simulated.argmax(1)).mean() >= 0.97
    assert np.abs(real - simulated).max() < (1e-4 if scheme == "fp32" else 3e-2)


def test_artifacts_name_the_release_licence_only_for_the_official_weights():
    from pathlib import Path

    from pipeline.formats.base import weights_license
    from pipeline.variants import get_variant

    def ctx(source):
        return ExportContext("fp32", {"weights": {"source": source}}, "m1.1", Path("x"))

    official = weights_license(ctx("official:https://example/repvit_m1_1.pth"))
    assert official == f"{get_variant('m1.1').weights.license} (RepViT official weights)" and "Apache" in official
    assert weights_license(ctx("/models/mine.pth")) == "see the weights' source"


def test_the_onnx_file_carries_no_build_paths(trained, tmp_path):
    """torch.onnx writes Python stack traces (this machine's file paths) into node metadata:
    none reach the shipped .onnx; the module scopes stay."""
    import onnx

    r = get_exporter("onnx").export(trained.fused, ExportContext("fp32", trained.meta, "m0.6", tmp_path / "m.onnx",
                                                                 check_inputs=trained.check), OnnxConfig())
    data = r.path.read_bytes()
    assert b"pipeline/models/repvit.py" not in data and b"site-packages" not in data
    keys = {p.key for n in onnx.load(str(r.path)).graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "namespace" in keys
