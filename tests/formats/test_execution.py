"""How each int8 artifact executes, read from its runtime: the facts the report shows so
that an artifact falling off its runtime's fast path is seen at a glance."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.app.report import execution_line
from pipeline.formats.onnx import global_average_pools
from pipeline.formats.tflite import TFLiteConfig
from pipeline.io.data import normalized
from pipeline.runtimes.ort import run_onnx

from .test_exporters import export, reference_logits

ROOT = Path(__file__).resolve().parents[2]


def gelus(model) -> int:
    import torch

    return sum(isinstance(m, torch.nn.GELU) for m in model.modules())


def test_int8_tflite_runs_in_one_xnnpack_partition(trained, tmp_path):
    """Float GELU (the default) keeps the whole int8 graph inside XNNPACK."""
    r = export("tflite", "int8", trained, tmp_path)
    e = r.facts["execution"]
    assert e["xnnpack_partitions"] == 1 and e["ops_outside_xnnpack"] == {} and e["fast_path"]
    assert execution_line(e) == (f"{e['runtime']}: 1 XNNPACK partition, every op delegated.", True)
    ops = r.facts["ops"]   # a float GELU between each pair; + the uint8 input's pair; + the float softmax
    assert ops["GELU"] == gelus(trained.fused)
    assert (ops["DEQUANTIZE"], ops["QUANTIZE"]) == (ops["GELU"] + 2, ops["GELU"] + 1)


@pytest.mark.slow   # two int8 conversions (20 s); the option, not the default
def test_an_int8_gelu_splits_the_xnnpack_graph_and_the_report_says_so(trained, tmp_path):
    """An int8 GELU, which XNNPACK cannot run, splits the graph, and the facts and the report
    say so; the quantized outputs are the same as with the float GELU."""
    r = export("tflite", "int8", trained, tmp_path)
    (tmp_path / "int8-gelu").mkdir()
    slow = export("tflite", "int8", trained, tmp_path / "int8-gelu", TFLiteConfig(gelu="int8"))
    e = slow.facts["execution"]
    assert e["xnnpack_partitions"] > 1 and e["ops_outside_xnnpack"] == {"GELU": gelus(trained.fused)}
    line, fast = execution_line(e)
    assert not fast and f"**{e['xnnpack_partitions']} XNNPACK partitions**" in line and "GELU" in line
    # Same quantized GELU outputs either way: float GELU costs no fidelity.
    from pipeline.runtimes.litert import run_tflite
    a, b = run_tflite(r.path, trained.check), run_tflite(slow.path, trained.check)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.97


def test_global_average_pool_rewrite_is_exact(trained, tmp_path):
    """The float graph with ReduceMean and with GlobalAveragePool give the same logits."""
    import torch

    path = tmp_path / "m.onnx"
    torch.onnx.export(trained.fused.eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True,
                      opset_version=20, external_data=False, input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = normalized(trained.check, trained.meta)
    before = run_onnx(path, x)
    proto = onnx.load(str(path))
    assert global_average_pools(proto) == sum(n.op_type == "ReduceMean" for n in onnx.load(str(path)).graph.node)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    after = run_onnx(path, x)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    assert np.abs(after - reference_logits(trained)).max() <= 1e-4 * np.abs(before).max()


@pytest.mark.slow   # 26 s at 224 px; test_int8_tflite_runs_in_one_xnnpack_partition checks the same on the test model
def test_default_deploy_int8_tflite_is_one_partition(tmp_path):
    """The default job (m0.9, 224 px, int8) on its untrained fallback weights: the shipped
    .tflite runs in one XNNPACK partition and the report says so."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipeline", "deploy", "--quant", "int8", "--variant", "m0.9", "--ckpt", "random",
           "--artifacts", str(tmp_path), "--json",
           *sum((["--set", s] for s in ("export.formats=[tflite]", "data.calib_images=32",
                                        "quantize.min_calibration_images=32", "validate.latency_runs=3",
                                        "validate.latency_warmup=1", "validate.fidelity_images=4",
                                        "export.check_images=2")), [])]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout)
    (tfl,) = rep["artifacts"]
    eq = rep["equalization"]   # int8 equalizes the residual stream first, and says so
    assert eq["range_spread_after"] < eq["range_spread_before"], eq
    e = tfl["export"]["execution"]
    assert (e["xnnpack_partitions"], e["ops_outside_xnnpack"]) == (1, {}), e
    md = (tmp_path / "m0.9-int8" / "report.md").read_text()
    assert "## How each artifact executes" in md and "1 XNNPACK partition, every op delegated" in md
    assert "Off the fast path" not in md
    assert "residual-stream range equalization (alpha 0.5" in md
