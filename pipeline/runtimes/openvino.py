"""OpenVINO: the IR artifact as an app on an Intel (or any x86 / ARM) CPU runs it.

The IR takes uint8 RGB pixels, NHWC, and normalizes inside (PrePostProcessor). The CPU
plugin chooses its own inference precision unless told: on a CPU with AVX512-BF16 or AMX
it runs an "fp32" IR in bf16. The runtime compiles with the precision the artifact names
(``rt_info`` ``repvit/inference_precision``, written from ``export.openvino.inference_precision``)
and its name says the precision the compiled model reports, so no figure hides which ran.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

RT_INFO = "repvit"   # the rt_info section the pipeline's facts live in


def model_xml(path: Path) -> Path:
    """The .xml of an artifact folder (``<stem>_openvino_model/<stem>.xml``) or the .xml itself."""
    path = Path(path)
    if path.suffix == ".xml":
        return path
    found = sorted(path.glob("*.xml"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path} holds {len(found)} .xml files; an OpenVINO artifact folder holds one")
    return found[0]


def rt_facts(model) -> dict[str, str]:
    """The pipeline's facts in a model's rt_info (labels, preprocessing, precision)."""
    if not model.has_rt_info([RT_INFO]):
        return {}
    return {k: v.astype(str) for k, v in model.get_rt_info([RT_INFO]).astype(dict).items()}


def compile_config(precision: str, threads: int) -> dict:
    """CPU plugin properties: latency mode, ``threads`` inference threads and, unless
    ``precision`` is ``default``, that inference precision."""
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1}
    if precision != "default":
        cfg["INFERENCE_PRECISION_HINT"] = precision
    return cfg


def ran_precision(compiled) -> str:
    """The inference precision the compiled model reports (f32, bf16, f16)."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def runtime_name(compiled) -> str:
    """What ran: OpenVINO's version, its CPU plugin and the precision the compiled model reports."""
    import openvino as ov

    return f"OpenVINO {ov.get_version().split('-')[0]} CPU ({ran_precision(compiled)} inference precision)"


class OpenVINORuntime:
    """uint8 NHWC pixels in, logits out, on OpenVINO's CPU plugin."""
    method, outputs = "measured", "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1, precision: str | None = None,
                 properties: dict | None = None):
        """``properties``: further CPU plugin properties (``PERF_COUNT`` for a per-layer profile)."""
        import openvino as ov

        self.core = ov.Core()
        model = self.core.read_model(model_xml(path))
        self.facts = rt_facts(model)
        self.requested = precision or self.facts.get("inference_precision", "f32")
        self.program = self.core.compile_model(model, "CPU",
                                               compile_config(self.requested, threads) | (properties or {}))
        self.request = self.program.create_infer_request()
        self.precision = ran_precision(self.program)
        self.meta = meta
        self.name = runtime_name(self.program)

    def predict(self, pixels):
        x = np.ascontiguousarray(pixels, np.uint8)
        return np.asarray(self.request.infer([x])[0]).copy()

    def invoker(self, pixels):
        x = np.ascontiguousarray(pixels[:1], np.uint8)
        return lambda: self.request.infer([x])


def execution(compiled) -> dict:
    """How the CPU plugin runs a compiled model, read from its runtime graph (every
    executed layer's ``runtimePrecision``): the layers in integer precision, and those in
    float, by layer type. Constants, reshapes (no work) and the graph's input / output are
    not layers that compute."""
    integer, floating = Counter(), Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if kind in ("Const", "Reshape", "Input", "Output", "Reorder"):
            continue
        (integer if precision in ("i8", "u8") else floating)[kind] += 1
    return {"runtime": runtime_name(compiled), "integer_layers": dict(integer), "float_layers": dict(floating),
            "how": "read from the compiled model's runtime graph (each layer's runtimePrecision)"}
