"""The OpenVINO IR against its PyTorch twin, on the small trained RepViT: parity, the
pixels-in preprocessing, the facts in rt_info, and nncf's int8 and int8-weight schemes."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import fidelity
from pipeline.formats import get_exporter
from pipeline.formats.base import ExportContext, ExportError
from pipeline.formats.openvino import OpenVINOConfig
from pipeline.runtimes.openvino import OpenVINORuntime, model_xml, rt_facts

from .test_exporters import reference_logits
from .test_quantization import size

pytest.importorskip("openvino")

# Logit SQNR of a correct nncf int8 model here: about 32 dB (histogram ranges; mean_minmax: 18 dB;
# 8-bit weights on a CPU without VNNI: 15 dB).
FLOOR_DB = 26.0


def export(scheme, trained, tmp_path, cfg=None, **ctx):
    exporter = get_exporter("openvino")
    context = ExportContext(scheme, trained.meta, "m0.6", tmp_path / f"m-{scheme}{exporter.suffix}",
                            trained.calibration, trained.check[:8])
    return exporter.export(trained.fused, replace(context, **ctx), cfg or OpenVINOConfig())


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory):
    return export("fp32", trained, tmp_path_factory.mktemp("ov-fp32"))


@pytest.fixture(scope="module")
def int8(trained, tmp_path_factory):
    return export("int8", trained, tmp_path_factory.mktemp("ov-int8"))


def test_fp32_ir_takes_pixels_and_matches_pytorch(fp32, trained):
    import openvino as ov

    assert fp32.path.name.endswith("_openvino_model") and model_xml(fp32.path).with_suffix(".bin").exists()
    model = ov.Core().read_model(model_xml(fp32.path))
    (inp,) = model.inputs
    assert inp.get_element_type() == ov.Type.u8 and inp.get_names() == {"pixels"}
    assert str(inp.get_partial_shape()) == "[?,32,32,3]"          # NHWC, any batch
    facts = rt_facts(model)
    assert facts["labels"] == '["astronaut", "chelsea", "coffee", "rocket"]' and facts["variant"] == "m0.6"
    assert facts["inference_precision"] == "f32" and facts["input_layout"].startswith("NHWC uint8")
    rt = OpenVINORuntime(fp32.path, trained.meta)
    assert rt.precision == "f32" and "(f32 inference precision)" in rt.name
    got, want = rt.predict(trained.check), reference_logits(trained)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    one_by_one = np.concatenate([rt.predict(trained.check[i:i + 1]) for i in range(8)])
    assert np.abs(one_by_one - got[:8]).max() <= 1e-5 * np.abs(want).max()
    assert fp32.facts["parity"]["relative"] <= 1e-5 and "OpenVINO" in fp32.facts["parity"]["runtime"]


def test_a_wrong_normalization_fails_the_parity_gate(trained, tmp_path, monkeypatch):
    """The gate compares the IR (normalizing inside) with PyTorch on normalized input: a
    preprocessing mistake (here a mean in 0..1 where the IR needs 0..255) is caught."""
    from pipeline.formats.openvino import OpenVINOExporter

    wrong = {**trained.meta, "mean": [m / 255 for m in trained.meta["mean"]]}
    real = OpenVINOExporter._with_pixels_in
    monkeypatch.setattr(OpenVINOExporter, "_with_pixels_in", staticmethod(lambda m, meta: real(m, wrong)))
    with pytest.raises(ExportError, match="OpenVINO parity failed"):
        export("fp32", trained, tmp_path)


def test_fp16_halves_the_weights(fp32, trained, tmp_path):
    r = export("fp16", trained, tmp_path)
    assert 0.45 < size(r.path) / size(fp32.path) < 0.55
    got, want = OpenVINORuntime(r.path, trained.meta).predict(trained.check), reference_logits(trained)
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert "fp16 weights" in r.facts["precision"]


def test_int8_fidelity_size_and_execution(int8, fp32, trained):
    got = OpenVINORuntime(int8.path, trained.meta).predict(trained.check)
    fid = fidelity(reference_logits(trained), got)
    assert fid["top1_agreement"] >= 0.97 and fid["sqnr_db"] >= FLOOR_DB, fid
    assert 0.2 < size(int8.path) / size(fp32.path) < 0.35
    assert "nncf" in int8.facts["precision"] and "histogram activation ranges" in int8.facts["precision"]
    assert "bias correction none" in int8.facts["precision"]
    # Every convolution runs in integers but the squeeze-excite pair on each pooled vector
    # (nncf puts no quantizer there), and the classifier too.
    e = int8.facts["execution"]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in trained.fused.modules())
    se = sum(type(m).__name__ == "SqueezeExcite" for m in trained.fused.modules())
    assert e["float_layers"] == {"Convolution": 2 * se} and e["integer_layers"]["FullyConnected"] == 1
    assert e["integer_layers"]["Convolution"] == convs - 2 * se


def test_w8_is_int8_weights_with_float_activations(fp32, trained, tmp_path):
    r = export("w8", trained, tmp_path)
    assert 0.2 < size(r.path) / size(fp32.path) < 0.35
    fid = fidelity(reference_logits(trained), OpenVINORuntime(r.path, trained.meta).predict(trained.check))
    assert fid["top1_agreement"] >= 0.99 and fid["sqnr_db"] >= 35, fid


def test_float_layers_run_in_float(int8, trained, tmp_path):
    layers = ("features.0.0", "features.1.token_mixer.1.fc1", "classifier")
    kept = export("int8", trained, tmp_path, float_layers=layers).facts["execution"]
    before = int8.facts["execution"]
    # features.0.0 leaves the integer convolutions (the SE fc1 already ran in float), the
    # classifier runs in float.
    assert before["integer_layers"]["Convolution"] - kept["integer_layers"]["Convolution"] == 1
    assert kept["float_layers"]["Convolution"] - before["float_layers"]["Convolution"] == 1
    assert "FullyConnected" not in kept["integer_layers"] and kept["float_layers"]["FullyConnected"] == 1


def test_a_layer_the_ir_does_not_have_is_an_error(trained, tmp_path):
    with pytest.raises(ExportError, match="nncf"):
        export("int8", trained, tmp_path, float_layers=("features.99.conv",))


def test_exports_send_no_telemetry(fp32, monkeypatch):
    """OpenVINO's converter and nncf report usage to Google Analytics from a forked process
    unless the user opted out; after an export, the one sending point sends nothing and
    forks nothing (a fork after JAX is loaded can deadlock)."""
    import os

    from openvino_telemetry.backend.backend_ga4 import GA4Backend

    forks = []

    def fork():
        forks.append(1)
        raise OSError("no fork in this test")
    monkeypatch.setattr(os, "fork", fork)
    backend = GA4Backend("G-TEST", "repvit-test", "0")
    backend.send(backend.build_event_message("category", "action", "label"))
    assert forks == []
