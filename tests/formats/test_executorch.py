"""The ExecuTorch programs against their PyTorch twin, on the small trained RepViT: the
XNNPACK .pte in ExecuTorch's runtime (parity, one partition, labels inside, int8 ranges as
the pipeline computes them) and the Core ML-delegated .pte read back and simulated."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import fidelity
from pipeline.formats import get_exporter
from pipeline.formats.base import ExportContext
from pipeline.formats.executorch import (ExecuTorchConfig, ExecuTorchCoreMLConfig, PooledClassifier, quantized,
                                         xnnpack_quantizer)
from pipeline.io.data import normalized
from pipeline.quant.ranges import percentile_range

from .test_exporters import reference_logits
from .test_quantization import size

pytest.importorskip("executorch")

# Logit SQNR of a correct XNNPACK int8 program of the test model: about 34 dB.
FLOOR_DB = 28.0


def export(fmt, scheme, trained, tmp_path, cfg=None, **ctx):
    exporter = get_exporter(fmt)
    context = ExportContext(scheme, trained.meta, "m0.6", tmp_path / f"m-{scheme}{exporter.suffix}",
                            trained.calibration, trained.check[:8])
    default = ExecuTorchConfig() if fmt == "executorch" else ExecuTorchCoreMLConfig()
    return exporter.export(trained.fused, replace(context, **ctx), cfg or default)


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory):
    return export("executorch", "fp32", trained, tmp_path_factory.mktemp("et-fp32"))


@pytest.fixture(scope="module")
def int8(trained, tmp_path_factory):
    return export("executorch", "int8", trained, tmp_path_factory.mktemp("et-int8"))


def test_fp32_program_matches_pytorch_in_one_xnnpack_partition(fp32, trained):
    from pipeline.runtimes.executorch import ExecuTorchRuntime, metadata

    assert fp32.path.suffix == ".pte"
    rt = ExecuTorchRuntime(fp32.path, trained.meta)
    got, want = rt.predict(trained.check), reference_logits(trained)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert fp32.facts["parity"]["relative"] <= 1e-5 and rt.name.startswith("ExecuTorch ")
    e = fp32.facts["execution"]
    assert e["backend"] == "XnnpackBackend" and e["delegate_partitions"] == 1 and e["ops_outside_delegate"] == {}
    facts = metadata(fp32.path)   # constant methods, read by ExecuTorch's runtime
    assert facts["labels"] == '["astronaut", "chelsea", "coffee", "rocket"]' and facts["variant"] == "m0.6"
    assert facts["input_layout"].startswith("NCHW float32") and facts["scheme"] == "fp32"


def test_pooled_classifier_is_the_same_function(trained):
    x = torch.from_numpy(normalized(trained.check[:16], trained.meta))
    with torch.no_grad():
        assert torch.allclose(PooledClassifier(trained.fused)(x), trained.fused(x), atol=1e-6)


def test_int8_fidelity_size_and_one_partition(int8, fp32, trained):
    from pipeline.runtimes.executorch import ExecuTorchRuntime

    fid = fidelity(reference_logits(trained), ExecuTorchRuntime(int8.path, trained.meta).predict(trained.check))
    assert fid["top1_agreement"] >= 0.97 and fid["sqnr_db"] >= FLOOR_DB, fid
    assert 0.2 < size(int8.path) / size(fp32.path) < 0.35
    assert "XNNPACKQuantizer" in int8.facts["precision"] and "percentile 99" in int8.facts["precision"]
    assert "classifier in fp32" in int8.facts["precision"]   # float_classifier: on by default
    e = int8.facts["execution"]
    assert e["delegate_partitions"] == 1 and e["ops_outside_delegate"] == {} and e["fast_path"]


def _quantize_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
            and "dequantize" not in str(n.target)]


def test_int8_ranges_are_the_pipelines_statistic(trained):
    """The input's quantizer takes the percentile of the calibration images' own extremes
    (not the observer's min / max), and min_max gives the union of the extremes."""
    x = normalized(trained.calibration, trained.meta)
    size_ = trained.meta["input_size"]
    pooled = PooledClassifier(trained.fused).eval()
    for percentile in (99.0, None):
        gm = quantized(pooled, xnnpack_quantizer(), x, size_, percentile)
        first = next(n for n in _quantize_nodes(gm) if n.args[0].op == "placeholder")
        scale, zero = float(first.args[1]), int(first.args[2])
        mins, maxs = x.reshape(len(x), -1).min(1), x.reshape(len(x), -1).max(1)
        lo, hi = (percentile_range(mins, maxs, percentile) if percentile else (mins.min(), maxs.max()))
        # int8 affine: scale = (hi - lo) / 255 with the range stretched to hold 0.
        want = (max(float(hi), 0) - min(float(lo), 0)) / 255
        assert scale == pytest.approx(want, rel=1e-4), (percentile, scale, want)
        assert -128 <= zero <= 127


def test_float_layers_keep_float_weights(trained):
    x = normalized(trained.calibration[:32], trained.meta)
    pooled = PooledClassifier(trained.fused).eval()
    gm = quantized(pooled, xnnpack_quantizer(("classifier",)), x, trained.meta["input_size"], 99.0)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert len(linears) == 1 and "dequantize" not in str(linears[0].args[1].target)   # float weight
    assert all("dequantize" in str(c.args[1].target) for c in convs)


def test_coreml_delegated_program_reads_back_and_simulates(trained, tmp_path):
    from pipeline.runtimes.executorch import ExecuTorchCoreMLRuntime, coreml_packages
    from pipeline.runtimes.mil import MilInterpreter

    r = export("executorch_coreml", "fp32", trained, tmp_path)
    assert r.path.name.endswith(".coreml.pte")
    e = r.facts["execution"]
    assert e["backend"] == "CoreMLBackend" and e["delegate_partitions"] == 1 and e["ops_outside_delegate"] == {}
    (package,) = coreml_packages(r.path, tmp_path / "read-back")
    ops = MilInterpreter(package).op_counts()
    assert ops["conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in trained.fused.modules())
    rt = ExecuTorchCoreMLRuntime(r.path, trained.meta)
    assert rt.method == "simulated" and "simulated ExecuTorch Core ML delegate" in rt.name
    got, want = rt.predict(trained.check), reference_logits(trained)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert r.facts["parity"]["relative"] <= 1e-4 and r.facts["compute_precision"] == "fp32"


@pytest.mark.slow
def test_coreml_delegated_int8_is_w8a8(trained, tmp_path):
    from pipeline.runtimes.executorch import ExecuTorchCoreMLRuntime, coreml_packages
    from pipeline.runtimes.mil import MilInterpreter

    r = export("executorch_coreml", "int8", trained, tmp_path)
    (package,) = coreml_packages(r.path, tmp_path / "read-back")
    interp = MilInterpreter(package)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in trained.fused.modules())
    assert interp.integer_convs == convs and "CoreMLQuantizer" in r.facts["compression"]
    fid = fidelity(reference_logits(trained), ExecuTorchCoreMLRuntime(r.path, trained.meta).predict(trained.check))
    assert fid["top1_agreement"] >= 0.97 and fid["sqnr_db"] >= 24, fid


def test_means_become_pools_with_the_same_values(trained):
    from pipeline.formats.executorch import means_as_pools

    pooled = PooledClassifier(trained.fused).eval()
    x = torch.from_numpy(normalized(trained.check[:8], trained.meta))
    gm = torch.export.export(pooled, (x,)).module()
    means = sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.mean.dim)
    se = sum(type(m).__name__ == "SqueezeExcite" for m in trained.fused.modules())
    assert means == se + 1
    means_as_pools(gm)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.mean.dim not in ops and ops.count(torch.ops.aten.adaptive_avg_pool2d.default) == se + 1
    with torch.no_grad():
        assert torch.allclose(gm(x), pooled(x), atol=1e-6)
