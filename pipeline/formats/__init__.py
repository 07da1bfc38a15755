"""The formats, registered in one place.

Every exporter follows ``formats/base.py``: ``export(model, ctx, cfg) -> ExportResult``, the
fused (float) model and what the format needs to know -> an artifact on disk and facts for
the report. A format that cannot express a scheme says why (``unsupported``, from the one
table in ``pipeline/schemes.py``) and is skipped: nothing is ever silently substituted.
Exporters are imported when asked for: each pulls in its converter (coremltools, onnx,
litert-torch, openvino and nncf, executorch).
"""
from __future__ import annotations

from pipeline.formats.base import Exporter, ExportError
from pipeline.schemes import ALL_FORMATS


def get_exporter(name: str) -> Exporter:
    if name == "onnx":
        from pipeline.formats.onnx import OnnxExporter
        return OnnxExporter()
    if name == "coreml":
        from pipeline.formats.coreml import CoreMLExporter
        return CoreMLExporter()
    if name == "tflite":
        from pipeline.formats.tflite import TFLiteExporter
        return TFLiteExporter()
    if name == "openvino":
        from pipeline.formats.openvino import OpenVINOExporter
        return OpenVINOExporter()
    if name == "executorch":
        from pipeline.formats.executorch import ExecuTorchExporter
        return ExecuTorchExporter()
    if name == "executorch_coreml":
        from pipeline.formats.executorch import ExecuTorchCoreMLExporter
        return ExecuTorchCoreMLExporter()
    raise ExportError(f"unknown format {name!r}; formats: {', '.join(ALL_FORMATS)}")
