"""Post-training compression in each format, on a small trained RepViT: fidelity floors
that a broken scale or zero point falls below, and the sizes each scheme should give."""
import numpy as np
import pytest
import torch

from pipeline.eval.metrics import fidelity
from pipeline.formats import get_exporter
from pipeline.io.data import normalized
from pipeline.quant.ranges import ValueTails, percentile_range
from pipeline.runtimes.coreml import MilRuntime
from pipeline.runtimes.litert import run_tflite
from pipeline.runtimes.ort import run_onnx

from .test_exporters import export, reference_logits, softmax

# Logit SQNR (probabilities for Core ML and TFLite, whose models end in a softmax) of a
# correct int8 model here: ONNX ~33 dB, TFLite (full integer, uint8 input) ~27 dB, Core ML ~42 dB.
FLOOR_DB = {"onnx": 25.0, "tflite": 20.0, "coreml": 30.0}


def size(path):
    return sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size


def outputs(fmt, path, trained):
    if fmt == "onnx":
        return run_onnx(path, normalized(trained.check, trained.meta))
    if fmt == "tflite":
        return run_tflite(path, trained.check)
    return MilRuntime(path, trained.meta).predict(trained.check)


@pytest.fixture(scope="module")
def fp32_sizes(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32")
    return {fmt: size(export(fmt, "fp32", trained, d).path) for fmt in ("onnx", "tflite", "coreml")}


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "coreml"])
def test_int8_fidelity_and_size(fmt, trained, tmp_path, fp32_sizes, request):
    r = request.getfixturevalue("coreml_int8") if fmt == "coreml" else export(fmt, "int8", trained, tmp_path)
    ref = reference_logits(trained)
    got = outputs(fmt, r.path, trained)
    fid = fidelity(softmax(ref) if fmt in ("coreml", "tflite") else ref, got)
    assert fid["top1_agreement"] >= 0.97 and fid["sqnr_db"] >= FLOOR_DB[fmt], fid
    assert 0.2 < size(r.path) / fp32_sizes[fmt] < 0.35
    # How it executes, read from the runtime (the report's "How each artifact executes").
    e = r.facts["execution"]
    gelus = sum(isinstance(m, torch.nn.GELU) for m in trained.fused.modules())
    if fmt == "onnx":   # the SE squeezes and the head's pool are integer pools; GELU alone is float
        n_se = sum(type(m).__name__ == "SqueezeExcite" for m in trained.fused.modules())
        assert e["integer_ops"]["QLinearGlobalAveragePool"] == n_se + 1
        assert e["float_between_dq_q"] == {"Gelu": gelus} and "ReduceMean" not in r.facts["ops"]
    elif fmt == "coreml":   # W8A8: no quantize/dequantize around GELU, so it stays fp16
        assert e["fp16_ops"]["gelu"] == gelus and e["int8_input_ops"]["conv"] == r.facts["ops"]["conv"]
    else:
        assert e["xnnpack_partitions"] == 1 and e["fast_path"]


@pytest.mark.slow   # about 35 s (inductor compiles the whole program); tests/test_compiled.py covers the mechanism
def test_compiled_coreml_simulation_is_the_interpreters(trained, tmp_path):
    """Large sets run the simulation compiled with inductor: the same probabilities as the
    interpreter, every fp16 rounding kept, the last batch padded (128 = 3 x 40 + 8)."""
    r = export("coreml", "int8", trained, tmp_path)
    interpreted = MilRuntime(r.path, trained.meta).predict(trained.check)
    compiled = MilRuntime(r.path, trained.meta, compile=True, batch_size=40)
    got = np.concatenate([compiled.predict(trained.check[s:s + 40]) for s in range(0, 128, 40)])
    assert compiled.compiled.facts["compiled"] and "inductor-compiled" in compiled.name, compiled.compiled.facts
    assert np.array_equal(got, got.astype(np.float16).astype(np.float32))
    assert np.abs(got - interpreted).max() <= 1e-3 and (got.argmax(1) == interpreted.argmax(1)).all()


@pytest.mark.slow   # two Core ML int8 conversions; the default reaches the program in every int8 test
def test_coreml_activation_options_reach_the_program(trained, tmp_path):
    """export.coreml.quantization_scheme / activation_observer are what coremltools uses:
    symmetric programs quantize activations without zero points (uint8 from 0 after a ReLU,
    int8 around 0 elsewhere), affine ones with them; both stay above the fidelity floor."""
    from pipeline.formats.coreml import CoreMLConfig
    from pipeline.runtimes.mil import load_program

    for scheme, observer in (("symmetric", "moving_average_min_max"), ("affine", "min_max")):
        cfg = CoreMLConfig(quantization_scheme=scheme, activation_observer=observer)
        (tmp_path / scheme).mkdir()
        r = export("coreml", "int8", trained, tmp_path / scheme, cfg)
        assert f"({scheme}), ranges by {observer}" in r.facts["compression"]
        _, prog = load_program(r.path)
        quantize = [op for op in prog.functions["main"].operations if op.op_type == "quantize"]
        zero_points = [op for op in quantize if "zero_point" in op.inputs and np.any(op.inputs["zero_point"].val)]
        assert quantize and (bool(zero_points) == (scheme == "affine")), (scheme, len(zero_points))
        fid = fidelity(softmax(reference_logits(trained)), outputs("coreml", r.path, trained))
        assert fid["top1_agreement"] >= 0.97 and fid["sqnr_db"] >= FLOOR_DB["coreml"], (scheme, fid)


def test_a_wrong_zero_point_falls_below_the_floor(trained, tmp_path, monkeypatch):
    """The same TFLite int8 model fed pixels as if its uint8 input had a zero point off by
    30: caught."""
    from pipeline.runtimes import litert

    r = export("tflite", "int8", trained, tmp_path)
    real = litert.to_input
    monkeypatch.setattr(litert, "to_input", lambda x, d: np.clip(real(x, d).astype(int) + 30, 0, 255).astype(np.uint8))
    fid = fidelity(softmax(reference_logits(trained)), run_tflite(r.path, trained.check))
    assert fid["sqnr_db"] < FLOOR_DB["tflite"]


def test_a_wrong_weight_scale_falls_below_the_floor(trained, tmp_path):
    """Double one conv's weight scale in the ONNX QDQ graph: caught."""
    import onnx
    from onnx import numpy_helper

    r = export("onnx", "int8", trained, tmp_path)
    model = onnx.load(str(r.path))
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits][3]
    scale = numpy_helper.to_array(inits[dq.input[1]])
    model.graph.initializer.append(numpy_helper.from_array(scale * 2, "broken_scale"))
    dq.input[1] = "broken_scale"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    fid = fidelity(reference_logits(trained), run_onnx(broken, normalized(trained.check, trained.meta)))
    assert fid["sqnr_db"] < FLOOR_DB["onnx"]


@pytest.mark.parametrize("scheme,low,high", [("w8", 0.22, 0.32), ("pal6", 0.17, 0.25),
                                             pytest.param("pal4", 0.11, 0.18, marks=pytest.mark.slow)])
def test_coreml_weight_compression(scheme, low, high, trained, tmp_path, fp32_sizes):
    r = export("coreml", scheme, trained, tmp_path)
    assert low < size(r.path) / fp32_sizes["coreml"] < high
    fid = fidelity(softmax(reference_logits(trained)), outputs("coreml", r.path, trained))
    assert fid["top1_agreement"] >= 0.97
    # coremltools leaves tensors under 2048 elements (small depthwise kernels) uncompressed.
    large = sum(m.weight.numel() >= 2048 for m in trained.fused.modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    ops = r.facts["ops"]
    compressed = sum(ops.get(k, 0) for k in ("constexpr_lut_to_dense", "constexpr_affine_dequantize",
                                              "constexpr_blockwise_shift_scale"))
    assert compressed == large


@pytest.mark.parametrize("fmt,scheme", [("onnx", "pal4"), ("tflite", "pal6")])
def test_formats_that_cannot_express_palettes_say_so(fmt, scheme):
    assert "no palettized" in get_exporter(fmt).unsupported(scheme)


def test_too_few_calibration_images(tmp_path):
    from pipeline.io.data import DataConfig, DataError
    from pipeline.stages import load, quantize, reparam

    (tmp_path / "load").mkdir()
    (tmp_path / "reparam").mkdir()
    (tmp_path / "q").mkdir()
    load.load(load.LoadConfig(variant="m0.6", checkpoint="random", input_size=32), tmp_path / "load")
    reparam.reparam(reparam.ReparamConfig(verify=False), tmp_path / "load" / "model.pt", tmp_path / "reparam")
    with pytest.raises(DataError, match=r"only 8 calibration images.*at least 32.*CALIB="):
        quantize.run(quantize.QuantizeConfig(scheme="int8"), {"reparam": tmp_path / "reparam"},
                     tmp_path / "q", data=DataConfig(calib_images=8))


def test_tflite_dynamic_range_w8(trained, tmp_path, fp32_sizes):
    r = export("tflite", "w8", trained, tmp_path)
    assert 0.2 < size(r.path) / fp32_sizes["tflite"] < 0.35
    fid = fidelity(softmax(reference_logits(trained)), outputs("tflite", r.path, trained))
    assert fid["top1_agreement"] >= 0.97 and fid["sqnr_db"] >= 25, fid


def test_sensitivity_ranks_every_layer_most_harmful_first(trained):
    from pipeline.io.data import normalized as norm
    from pipeline.quant.sensitivity import layer_sensitivity, quantizable_layers

    x = torch.from_numpy(norm(trained.calibration[:16], trained.meta))
    ranking = layer_sensitivity(trained.fused, x)
    assert [r["layer"] for r in ranking] != [] and \
        sorted(r["layer"] for r in ranking) == sorted(quantizable_layers(trained.fused))
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 10 for r in ranking)
    # Make one layer fragile: a huge constant channel in its input (its weights ignore that
    # channel, so the float model barely changes) makes the per-tensor 8-bit input grid
    # coarse for every other channel. That layer must rank first, by far.
    import copy
    fragile = copy.deepcopy(trained.fused)
    first, second = fragile.features[0][0], fragile.features[0][2]   # stem: conv, GELU, conv
    with torch.no_grad():
        first.bias[0] = 500.0          # GELU(500) = 500 in the second conv's input
        second.weight[:, 0] = 0.0
    ranking = layer_sensitivity(fragile, x)
    assert ranking[0]["layer"] == "features.0.2", ranking[:3]
    assert ranking[0]["sqnr_db"] < ranking[1]["sqnr_db"] - 10


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("coreml", marks=pytest.mark.slow), "tflite"])
def test_float_layers_stay_float(fmt, trained, tmp_path):
    from dataclasses import replace

    from pipeline.formats.base import ExportContext

    layers = ("features.0.0", "features.1.token_mixer.1.fc1", "classifier")
    exporter = get_exporter(fmt)
    ctx = ExportContext("int8", trained.meta, "m0.6", tmp_path / f"m{exporter.suffix}", trained.calibration)
    cfg = {"onnx": __import__("pipeline.formats.onnx", fromlist=["OnnxConfig"]).OnnxConfig,
           "coreml": __import__("pipeline.formats.coreml", fromlist=["CoreMLConfig"]).CoreMLConfig,
           "tflite": __import__("pipeline.formats.tflite", fromlist=["TFLiteConfig"]).TFLiteConfig}[fmt]()
    all_int8_facts = exporter.export(trained.fused, ctx, cfg).facts
    kept_facts = exporter.export(trained.fused, replace(ctx, out_path=tmp_path / f"k{exporter.suffix}",
                                                        float_layers=layers), cfg).facts
    all_int8, kept = all_int8_facts["ops"], kept_facts["ops"]
    if fmt == "coreml":   # one compressed weight per quantized layer
        assert all_int8["constexpr_affine_dequantize"] - kept["constexpr_affine_dequantize"] == len(layers)
    elif fmt == "tflite":  # float islands: dequantize in, quantize out (outputs checked float by export)
        assert kept.get("DEQUANTIZE", 0) > all_int8.get("DEQUANTIZE", 0)
    else:                 # weight DQ + activation Q/DQ of each excluded node are gone
        assert kept["DequantizeLinear"] < all_int8["DequantizeLinear"]
        # ... and onnxruntime really runs them in float: it re-quantizes (per tensor) a float
        # Conv / Gemm that sits between a DequantizeLinear and a QuantizeLinear.
        before, after = all_int8_facts["execution"]["integer_ops"], kept_facts["execution"]["integer_ops"]
        assert before["QLinearConv"] - after.get("QLinearConv", 0) >= 2
        assert before.get("QGemm", 0) - after.get("QGemm", 0) == 1
        assert kept_facts["execution"]["float_between_dq_q"].get("Conv", 0) >= 2


def test_accuracy_aware_pass_keeps_layers_until_the_budget_holds(trained, tmp_path, monkeypatch):
    """With a drop the budget refuses, the pass keeps 1, 2, 4 ... layers in float (most
    sensitive first) until it holds, and reports them; an unreachable budget is an error."""
    import json as _json

    from pipeline.formats.base import ExportContext, ExportError
    from pipeline.formats.onnx import OnnxConfig
    from pipeline.search import accuracy_aware as export_stage

    quant = tmp_path / "quantize"
    quant.mkdir()
    np.save(quant / "budget_pixels.npy", trained.check)
    np.save(quant / "budget_labels.npy", trained.labels)
    layers = ["features.0.0", "features.2.channel_mixer.m.0", "classifier", "features.1.token_mixer.0"]
    (quant / "sensitivity.json").write_text(_json.dumps([{"layer": l, "sqnr_db": 20} for l in layers]))

    def facts(max_drop, on_miss="warn"):
        return {"scheme": "int8", "max_drop": max_drop,
                "budget_set": {"images": len(trained.labels), "max_float_layers": 4, "on_miss": on_miss}}

    # Pretend each layer kept in float recovers one point from a 3-point drop.
    seen = []
    real_export = get_exporter("onnx").export

    def counting_export(self, model, ctx, cfg):
        seen.append(ctx.float_layers)
        return real_export(model, ctx, cfg)
    monkeypatch.setattr(type(get_exporter("onnx")), "export", counting_export)
    monkeypatch.setattr(export_stage, "measure_drop", lambda *a: (3.0 - len(seen[-1]), 0.5))
    # ... and brings the outputs closer to float (KL) by far more than the noise.
    rng = np.random.default_rng(0)
    helps = lambda f, p: 1.0 - 0.1 * len(seen[-1]) + rng.normal(0, 0.01, len(f))  # noqa: E731
    monkeypatch.setattr(export_stage, "kl_per_image", helps)
    ctx = ExportContext("int8", trained.meta, "m0.6", tmp_path / "m.onnx", trained.calibration)
    cfg = OnnxConfig(calibration="minmax")   # the pass, not the ranges, is under test: the quickest calibrator
    _, budget = export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, cfg, quant,
                                                  facts(max_drop=1.5))
    assert seen == [(), ("features.0.0",), ("features.0.0", "features.2.channel_mixer.m.0")]
    assert budget["checked"] and budget["met"] and budget["drop_before"] > 1.5 >= budget["drop_after"]
    assert budget["float_layers"] == layers[:2] and budget["standard_error"] == 0.5
    # What the float layers cost in speed, measured against the all-int8 artifact (whose
    # copy is gone: nothing but the shipped artifact is left beside it).
    lat = budget["latency_vs_all_int8"]
    assert lat["method"] == "measured" and lat["shipped_ms"] > 0 and lat["all_int8_ms"] > 0
    assert abs(lat["ratio"] - lat["shipped_ms"] / lat["all_int8_ms"]) < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "quantize"]
    # Unreachable: the best attempt (most layers in float here) is shipped with a warning ...
    seen.clear()
    _, budget = export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, cfg, quant,
                                                  facts(max_drop=-5.0))
    assert not budget["met"] and budget["float_layers"] == layers[:4]
    assert [a["float_layers"] for a in budget["attempts"]] == [0, 1, 2, 4]
    # A float layer whose gain is within the noise ends the pass, even where the (noisy)
    # top-1 drop happens to fall: the all-int8 artifact is shipped again rather than float
    # layers that buy nothing but cost speed.
    seen.clear()
    noise = lambda f, p: 1.0 + rng.normal(0, 0.05, len(f))  # noqa: E731
    monkeypatch.setattr(export_stage, "kl_per_image", noise)
    _, budget = export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, cfg, quant,
                                                  facts(max_drop=1.5))
    assert seen == [(), ("features.0.0",), ()] and budget["float_layers"] == [] and not budget["met"]
    assert "latency_vs_all_int8" not in budget   # the all-int8 artifact is what ships
    assert budget["stopped"].startswith("1 layer(s) in float did not bring the outputs closer to float")
    gain, se = budget["attempts"][1]["kl_gain"], budget["attempts"][1]["kl_gain_se"]
    assert not gain > 2 * se
    monkeypatch.setattr(export_stage, "kl_per_image", helps)
    # ... or refused, when the recipe says so.
    error = facts(max_drop=-5.0, on_miss="error")
    error["budget_set"]["max_float_layers"] = 1
    with pytest.raises(ExportError, match=r"misses max_drop -5.0: best drop 2.00 ± 0.50 top-1 points"):
        export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, cfg, quant, error)


@pytest.mark.slow   # the pass itself is in the default run (the test above)
def test_without_labels_the_budget_is_in_agreement_points(trained, tmp_path):
    """No labels: the drop is the share of held-out images whose class the artifact changes,
    measured in its runtime (onnxruntime here) against the float model."""
    from pipeline.formats.base import ExportContext, ExportError
    from pipeline.formats.onnx import OnnxConfig
    from pipeline.io.data import normalized
    from pipeline.runtimes import open_runtime
    from pipeline.search import accuracy_aware as export_stage

    quant = tmp_path / "quantize"
    quant.mkdir()
    np.save(quant / "budget_pixels.npy", trained.check)
    (quant / "sensitivity.json").write_text('[{"layer": "classifier", "sqnr_db": 20}]')
    ctx = ExportContext("int8", trained.meta, "m0.6", tmp_path / "m.onnx", trained.calibration)
    facts = {"scheme": "int8", "max_drop": 50.0,
             "budget_set": {"images": len(trained.check), "max_float_layers": 1, "on_miss": "error",
                            "source": "128 unlabelled CALIB images held out of calibration"}}
    _, budget = export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, OnnxConfig(),
                                                  quant, facts)
    with torch.no_grad():
        float_pred = trained.fused(torch.from_numpy(normalized(trained.check, trained.meta))).argmax(1).numpy()
    int8_pred = open_runtime("onnx", ctx.out_path, trained.meta).predict(trained.check).argmax(1)
    changed = 100 * (int8_pred != float_pred).mean()
    assert budget["unit"] == "agreement points" and budget["met"] and budget["float_layers"] == []
    assert budget["drop_before"] == round(changed, 3) < 10, "int8 keeps most predictions"
    # A budget below the measured disagreement is refused, naming the unit and the way out.
    facts["max_drop"] = changed / 2 if changed else -1.0
    with pytest.raises(ExportError, match=r"agreement points .* pass a labelled CALIB"):
        export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, OnnxConfig(), quant, facts)
    # Untrained weights: nothing to check, and the report says why.
    facts["budget_set"] = {"skipped": "untrained weights: ..."}
    _, budget = export_stage.export_within_budget(get_exporter("onnx"), trained.fused, ctx, OnnxConfig(), quant, facts)
    assert budget == {"checked": False, "reason": "untrained weights: ..."}




def _logit_range(path):
    """The (min, max) that the int8 tensor feeding the TFLite softmax can represent."""
    from pipeline.runtimes.litert import interpreter

    it = interpreter(path)
    by_index = {d["index"]: d for d in it.get_tensor_details()}
    (softmax_op,) = [o for o in it._get_ops_details() if o["op_name"] == "SOFTMAX"]
    dequantize = next(o for o in it._get_ops_details() if softmax_op["inputs"][0] in o["outputs"])
    q = by_index[dequantize["inputs"][0]]["quantization_parameters"]
    scale, zero = float(q["scales"][0]), int(q["zero_points"][0])
    return (-128 - zero) * scale, (127 - zero) * scale


@pytest.mark.slow   # about 20 s; an option (export.tflite.calibration: minmax), the default percentile is tested below
def test_tflite_min_max_ranges_cover_every_calibration_image(trained, tmp_path):
    """ai-edge-quantizer's own statistics (a moving average of each image's min/max) clip
    the logits of the less typical calibration images; min_max covers all of them."""
    from pipeline.formats.tflite import TFLiteConfig

    logits = reference_logits(trained, trained.calibration)
    lo, hi = float(logits.min()), float(logits.max())
    r = export("tflite", "int8", trained, tmp_path / "mm", TFLiteConfig(calibration="min_max"))
    mm_lo, mm_hi = _logit_range(r.path)
    step = (mm_hi - mm_lo) / 255
    assert mm_lo <= lo + step and mm_hi >= hi - step, ((mm_lo, mm_hi), (lo, hi))
    r = export("tflite", "int8", trained, tmp_path / "ma", TFLiteConfig(calibration="moving_average"))
    ma_lo, ma_hi = _logit_range(r.path)
    assert ma_hi - ma_lo < 0.9 * (mm_hi - mm_lo), "the moving average clips (why min_max is the default)"


def test_onnx_percentile_calibration_is_onnxruntimes_own(trained, tmp_path):
    """The ONNX int8 export's calibration (formats/onnx_calibration.py: a stride per run,
    histograms counted by torch) gives the tensors and ranges onnxruntime's own percentile
    calibrator gives, stride by stride, for the same images."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.core.quiet import quiet
    from pipeline.formats.onnx_calibration import percentile_calibration_cache

    r = export("onnx", "fp32", trained, tmp_path)
    pre = tmp_path / "pre.onnx"
    x = normalized(trained.calibration[:48], trained.meta)
    with quiet():
        quant_pre_process(str(r.path), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def set_range(self, start_index, end_index):
            self.items = iter(x[i:i + 1] for i in range(start_index, end_index))

        def get_next(self):
            v = next(self.items, None)
            return None if v is None else {"input": v}

    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    with quiet():
        own = create_calibrator(pre, ops, augmented_model_path=str(tmp_path / "augmented.onnx"),
                                calibrate_method=CalibrationMethod.Percentile, extra_options={"percentile": 99.9})
        reader = Reader()
        for start in range(0, len(x), 16):
            reader.set_range(start, start + 16)
            own.collect_data(reader)
        want = own.compute_data()
        percentile_calibration_cache(pre, x, 99.9, 16, tmp_path / "cache.json")
    got = load_tensors_data(tmp_path / "cache.json")
    assert set(got.keys()) == set(want.keys()) and len(want.keys()) > 50
    for name in want.keys():
        lo, hi = (float(v) for v in want[name].range_value)
        # The threshold is a histogram bin edge: float outputs that differ in the last bit
        # between the two sessions (seen on an AVX2 CPU) can move a value across an edge, so
        # ranges agree to one bin (2048 bins over the tensor's largest |x|), not to the bit.
        edges = own.collector.histogram_dict[name][1]
        bin_width = float(edges[1] - edges[0])
        assert [float(v) for v in got[name].range_value] == pytest.approx([lo, hi], rel=1e-5, abs=1.01 * bin_width), name


@pytest.mark.filterwarnings("ignore:Warning. Enabling .experimental_preserve_all_tensors")
def test_tflite_one_pass_ranges_are_the_calibrators_own(trained, tmp_path):
    """The int8 export's TFLite ranges come from one pass of the float model (the Calibrator
    on one image names the tensors): the same tensors and the same per-image extremes as
    ai-edge-quantizer's Calibrator run on every image, reduced alike."""
    from ai_edge_quantizer import calibrator, quantizer, recipe

    from pipeline.formats.tflite import FLOAT_ENDS, _calibrated_ranges
    from pipeline.runtimes.litert import interpreter

    r = export("tflite", "fp32", trained, tmp_path)
    (signature, spec), = interpreter(r.path).get_signature_list().items()
    images = [{spec["inputs"][0]: trained.calibration[i:i + 1].astype(np.float32)} for i in range(24)]
    q = quantizer.Quantizer(str(r.path), recipe.static_wi8_ai8() + FLOAT_ENDS)

    def every_image(seen: dict, new: dict) -> dict:
        return {**new, "mins": seen.get("mins", [seen["min"]] if seen else []) + [new["min"]],
                "maxs": seen.get("maxs", [seen["max"]] if seen else []) + [new["max"]]}

    calib = calibrator.Calibrator(r.path.read_bytes(), num_threads=1, qsv_update_func=every_image)
    calib.calibrate({signature: images}, q._recipe_manager)
    reference = calib.get_model_qsvs()
    for how, percentile in (("percentile", 90.0), ("min_max", 100.0)):
        ours = _calibrated_ranges(r.path, signature, images, q._recipe_manager, how, percentile)
        assert set(ours) == set(reference) and len(ours) > 50
        for name, qsv in reference.items():
            mins, maxs = np.stack(qsv["mins"]).reshape(-1), np.stack(qsv["maxs"]).reshape(-1)
            assert len(mins) == len(images)
            want = percentile_range(mins, maxs, percentile)
            assert np.shape(ours[name]["min"]) == np.shape(qsv["min"]), name
            assert float(ours[name]["min"].reshape(-1)[0]) == pytest.approx(float(want[0]), rel=1e-6, abs=1e-7), name
            assert float(ours[name]["max"].reshape(-1)[0]) == pytest.approx(float(want[1]), rel=1e-6, abs=1e-7), name


def test_tflite_percentile_ranges_are_the_percentile_of_each_images_extremes(trained, tmp_path):
    """calibration: percentile sets each tensor's range to the percentile of the images' own
    minima / maxima: checked on the logits, whose per-image extremes PyTorch gives exactly."""
    from pipeline.formats.tflite import TFLiteConfig

    logits = reference_logits(trained, trained.calibration)
    r = export("tflite", "int8", trained, tmp_path, TFLiteConfig(calibration="percentile", percentile=90.0))
    assert "percentile 90 of each image's min / max" in r.facts["weights"]
    lo, hi = _logit_range(r.path)
    want_lo, want_hi = np.percentile(logits.min(1), 10), np.percentile(logits.max(1), 90)
    step = (hi - lo) / 255
    assert abs(lo - want_lo) <= 2 * step and abs(hi - want_hi) <= 2 * step, ((lo, hi), (want_lo, want_hi))
    assert hi < float(logits.max()) - 2 * step, "below the largest image's maximum"


def test_value_tails_clip_that_share_of_all_values_exactly():
    """quant.ranges.ValueTails: the range clips (100 - p) / 200 of all the values at each end,
    exactly numpy's order statistics of the pooled values, whether the images come one at a
    time or in batches of different sizes; at 100 it is the min / max."""
    rng = np.random.default_rng(0)
    images = (rng.standard_t(3, size=(40, 6, 5, 5)) * rng.uniform(0.5, 2.0, (40, 1, 1, 1))).astype(np.float32)
    pooled = np.sort(images.reshape(-1))
    for p in (100.0, 99.9, 99.0, 90.0):
        k = max(1, int(np.ceil((100 - p) / 200 * pooled.size)))
        want = (float(pooled[k - 1]), float(pooled[-k]))
        one, batched = ValueTails(p, len(images)), ValueTails(p, len(images))
        for im in images:
            one.add("t", im[None])
        for i in range(0, len(images), 16):   # 16, 16, 8
            batched.add("t", torch.from_numpy(images[i:i + 16]), images=len(images[i:i + 16]))
        assert one.range("t") == pytest.approx(want, rel=1e-6) == batched.range("t"), p
    assert ValueTails(100.0, 40).tail == 0 and want[1] < pooled[-1]


@pytest.mark.slow   # about 20 s; an option that is off by default (docs/int8-fidelity.md: measured, not kept)
def test_tflite_value_percentile_ranges_clip_that_share_of_all_values(trained, tmp_path):
    """calibration: value_percentile (onnxruntime's percentile statistic, for LiteRT): each
    tensor's range clips that share of all its values over the calibration images; checked
    on the logits, whose values PyTorch gives exactly."""
    from pipeline.formats.tflite import TFLiteConfig

    logits = reference_logits(trained, trained.calibration)
    r = export("tflite", "int8", trained, tmp_path, TFLiteConfig(calibration="value_percentile", value_percentile=95.0))
    assert "percentile 95 of all values" in r.facts["weights"]
    lo, hi = _logit_range(r.path)
    tails = ValueTails(95.0, len(logits))
    tails.add("logits", logits, images=len(logits))
    want_lo, want_hi = tails.range("logits")
    step = (hi - lo) / 255
    assert abs(lo - want_lo) <= 2 * step and abs(hi - want_hi) <= 2 * step, ((lo, hi), (want_lo, want_hi))
    per_image = np.percentile(logits.max(1), 95)
    assert abs(want_hi - per_image) > 4 * step, "not the per-image statistic"


@pytest.mark.slow   # three Core ML int8 conversions for options that are off by default
def test_coreml_activation_percentile_replaces_the_observers_ranges(trained, tmp_path):
    """export.coreml.activation_percentile: at 100 the ranges are the union of the images'
    extremes, exactly what coremltools' min_max observer finds (and not what the default
    moving-average observer, which this run also used, finds)."""
    from pipeline.formats.coreml import CoreMLConfig
    from pipeline.runtimes.mil import load_program

    def scales(cfg, name):
        (tmp_path / name).mkdir()
        r = export("coreml", "int8", trained, tmp_path / name, cfg)
        _, prog = load_program(r.path)
        return np.array([float(np.asarray(op.inputs["scale"].val)) for op in prog.functions["main"].operations
                         if op.op_type == "quantize"]), r

    observer, _ = scales(CoreMLConfig(activation_observer="min_max"), "observer")
    whole, r = scales(CoreMLConfig(activation_observer="moving_average_min_max", activation_percentile=100.0), "p100")
    assert "percentile 100 of each image's min / max" in r.facts["compression"]
    assert len(observer) == len(whole) > 10
    np.testing.assert_allclose(whole, observer, rtol=2e-3)   # fp16 scales in the program
    # activation_value_percentile 100 clips nothing either: the same union of extremes
    values, r = scales(CoreMLConfig(activation_observer="moving_average_min_max",
                                    activation_value_percentile=100.0), "v100")
    assert "percentile 100 of all values" in r.facts["compression"]
    np.testing.assert_allclose(values, observer, rtol=2e-3)


# ------------------------------------------------- QAT's weight grid is the one deployed

def _on_grid(model, quant_min: int, quant_max: int) -> tuple[torch.nn.Module, dict]:
    """``model`` with every conv / linear weight on the per-channel symmetric grid of a QAT
    backend (scale max|w| / ((quant_max - quant_min) / 2), as torch's per-channel symmetric
    observers compute it), and each layer's sorted integers and scales."""
    import copy

    model = copy.deepcopy(model)
    grid = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.data.double()
            scale = w.abs().flatten(1).amax(1) / ((quant_max - quant_min) / 2)
            shape = (-1,) + (1,) * (w.dim() - 1)
            k = torch.clamp(torch.round(w / scale.view(shape)), quant_min, quant_max)
            m.weight.data = (k * scale.view(shape)).float()
            grid[name] = (np.sort(k.numpy().astype(int).ravel()), np.sort(scale.numpy()))
    return model, grid


def _onnx_weights(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0, np.uint8)).dtype == np.int8:
            q, scale = inits[n.input[0]].astype(int), inits[n.input[1]]
            assert not inits[n.input[2]].any(), "symmetric: zero points are 0"
            if q.ndim > 1:   # weights (biases are int32)
                yield n.input[0], np.sort(q.ravel()), np.sort(scale.astype(np.float64))


def _tflite_weights(path):
    from pipeline.runtimes.litert import interpreter

    it = interpreter(path)
    for d in it.get_tensor_details():
        qp = d["quantization_parameters"]
        if d["dtype"] == np.int8 and len(qp["scales"]) > 1:   # per-channel: the weights
            assert not qp["zero_points"].any(), "symmetric: zero points are 0"
            yield d["name"], np.sort(it.get_tensor(d["index"]).astype(int).ravel()), np.sort(qp["scales"])


# TFLite's conversion takes about 10 s: in the slow run.
@pytest.mark.parametrize("fmt", ["onnx", pytest.param("tflite", marks=pytest.mark.slow)])
def test_weights_on_the_torchao_qat_grid_are_deployed_exactly(fmt, trained, tmp_path):
    """Rounding decided in PyTorch survives each converter: weights on the grid torchao's
    QAT trains (per-channel symmetric, [-127, 127], scale max|w| / 127) come out of the ONNX
    and TFLite exports as the same integers and scales, read back from the files. (TFLite's
    stem differs by design: 1/std of the input normalization is folded into it.) ONNX keeps
    the 8-bit grid with ``export.onnx.reduce_range: false``; its 7-bit default re-rounds."""
    from dataclasses import replace

    from pipeline.formats.onnx import OnnxConfig
    from pipeline.quant.fakequant import _w8a8_specs

    spec = _w8a8_specs()[1]
    assert (spec.quant_min, spec.quant_max, spec.qscheme) == (-127, 127, torch.per_channel_symmetric)
    model, grid = _on_grid(trained.fused, spec.quant_min, spec.quant_max)
    read = {"onnx": _onnx_weights, "tflite": _tflite_weights}[fmt]
    cfg = OnnxConfig(reduce_range=False) if fmt == "onnx" else None
    deployed = list(read(export(fmt, "int8", replace(trained, fused=model), tmp_path, cfg).path))
    assert len(deployed) == len(grid)
    left, unmatched = dict(grid), []
    for name, ints, scales in deployed:
        hit = next((k for k, (i, s) in left.items() if np.array_equal(i, ints)
                    and np.allclose(s, scales, rtol=1e-6, atol=0)), None)
        if hit is None:
            unmatched.append(name)
        else:
            del left[hit]
    if fmt == "onnx":
        assert not unmatched, unmatched
    else:
        assert len(unmatched) == 1 and list(left) == ["features.0.0"], (unmatched, list(left))


class SigmoidGelu(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def test_sigmoid_gelu_rewrite_is_that_function_and_runs_in_integers(trained, tmp_path):
    """``export.onnx.gelu: sigmoid``: the rewritten float graph computes x * sigmoid(1.702 x)
    (PyTorch with that module in place of each GELU, to float rounding), and onnxruntime
    runs the int8 graph with no op left in float: QLinearSigmoid / QLinearMul instead."""
    import copy

    import onnx

    from pipeline.formats.onnx import OnnxConfig, OnnxExporter, sigmoid_gelus

    graph, _ = OnnxExporter._float_graph(trained.fused, 32, OnnxConfig())
    proto = onnx.load_from_string(graph)
    gelus = sum(isinstance(m, torch.nn.GELU) for m in trained.fused.modules())
    assert sigmoid_gelus(proto) == gelus and not any(n.op_type == "Gelu" for n in proto.graph.node)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp_path / "rewritten.onnx"))
    approx = copy.deepcopy(trained.fused)
    for name, m in list(approx.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, torch.nn.GELU):
                setattr(m, child_name, SigmoidGelu())
    x = normalized(trained.check, trained.meta)
    with torch.no_grad():
        want = approx(torch.from_numpy(x)).numpy()
    got = run_onnx(tmp_path / "rewritten.onnx", x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(reference_logits(trained) - want).max() > 1e-3   # a different function from GELU

    r = export("onnx", "int8", trained, tmp_path, OnnxConfig(gelu="sigmoid"))
    e = r.facts["execution"]
    assert e["float_between_dq_q"] == {}, e
    assert e["integer_ops"]["QLinearSigmoid"] >= gelus and e["integer_ops"]["QLinearMul"] >= 2 * gelus
    fid = fidelity(reference_logits(trained), run_onnx(r.path, x))
    # 19.6 dB here against exact GELU's ~33 dB (FLOOR_DB): the approximation and its extra
    # quantized tensors cost fidelity, which is why it is not the default.
    assert fid["top1_agreement"] >= 0.95 and fid["sqnr_db"] >= 17, fid
