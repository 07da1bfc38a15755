"""Which compression scheme each format can express: one table, read by the exporters,
the quantize stage, the recipes' typed configs and ``python -m pipeline schemes``.

A format that cannot express a scheme says why and is skipped: nothing is ever silently
substituted. No torch here (the up-to-date check and the CLI's help read it)."""
from __future__ import annotations

from typing import Literal, Optional

Format = Literal["coreml", "onnx", "tflite", "openvino", "executorch", "executorch_coreml"]
FORMATS: tuple[str, ...] = ("coreml", "onnx", "tflite")     # the default job's app formats
ALL_FORMATS: tuple[str, ...] = FORMATS + ("openvino", "executorch", "executorch_coreml")   # opt-in ones: export.formats names them

Scheme = Literal["fp32", "fp16", "int8", "w8", "pal4", "pal6", "pal8", "qat-int8"]
SCHEMES: tuple[str, ...] = ("fp32", "fp16", "int8", "w8", "pal4", "pal6", "pal8", "qat-int8")
CALIBRATED = frozenset({"int8", "qat-int8"})   # need calibration images (int8 activations)

_NO_PALETTE = "{} has no palettized (look-up-table) weight type"

# format -> scheme -> None (produced) or why it is not.
SUPPORT: dict[str, dict[str, Optional[str]]] = {
    "coreml": {s: None for s in SCHEMES},
    "onnx": {"fp32": None, "fp16": None, "int8": None, "qat-int8": None,
             "w8": "onnxruntime has no weight-only int8 Conv kernel (its dynamic quantization also "
                   "quantizes activations: a different scheme)",
             **{p: _NO_PALETTE.format("ONNX") for p in ("pal4", "pal6", "pal8")}},
    "tflite": {"fp32": None, "fp16": None, "int8": None, "qat-int8": None, "w8": None,
               **{p: _NO_PALETTE.format("TFLite") for p in ("pal4", "pal6", "pal8")}},
    "openvino": {"fp32": None, "fp16": None, "int8": None, "w8": None,
                 "qat-int8": "QAT trains under coremltools' or torchao's fake quantization, not nncf's: "
                             "the OpenVINO int8 is nncf's post-training quantization (QUANT=int8)",
                 **{p: "not wired: nncf's codebook (look-up-table) weight modes exist but are not measured "
                       "here on convolutions; Core ML is the palettized format" for p in ("pal4", "pal6", "pal8")}},
    "executorch": {"fp32": None, "int8": None,
                   "fp16": "measured, not shipped: ExecuTorch's XNNPACK partitioner leaves an fp16 graph's GELU and mean "
                           "to the portable kernels (20 partitions for m0.6) and it ran slower than fp32 on an x86 CPU "
                           "(docs/executorch.md); ship fp32 or int8",
                   "w8": "XNNPACK's int8-weight kernels quantize activations on the fly (dynamic quantization): a "
                         "different scheme, not wired",
                   "qat-int8": "QAT trains for the Core ML, ONNX and TFLite quantizers, not ExecuTorch's XNNPACKQuantizer: "
                               "QUANT=int8 is this format's int8",
                   **{p: _NO_PALETTE.format("XNNPACK") for p in ("pal4", "pal6", "pal8")}},
    "executorch_coreml": {"fp32": None, "fp16": None, "int8": None,
                          **{s: "not wired: ExecuTorch compresses Core ML-delegated weights with torchao before "
                                "export, not measured here; the .mlpackage is the weight-compressed Core ML format"
                             for s in ("w8", "pal4", "pal6", "pal8")},
                          "qat-int8": "QAT's Core ML model is exported as the .mlpackage; QUANT=int8 is this "
                                      "format's int8 (ExecuTorch's CoreMLQuantizer)"},
}

# What each cell means, for the table ``python -m pipeline schemes`` prints.
WHAT = {
    ("coreml", "fp32"): "fp32 compute", ("coreml", "fp16"): "fp16 compute",
    ("coreml", "int8"): "W8A8, iOS17+", ("coreml", "w8"): "int8 weights",
    ("onnx", "fp32"): "fp32", ("onnx", "fp16"): "stays fp32 (no fp16 CPU kernels)",
    ("onnx", "int8"): "QDQ, uint8 activations",
    ("tflite", "fp32"): "fp32", ("tflite", "fp16"): "fp16 weights", ("tflite", "int8"): "full integer, uint8 input",
    ("tflite", "w8"): "int8 weights (dynamic range)",
    ("openvino", "fp32"): "f32 IR, uint8 pixels in", ("openvino", "fp16"): "fp16-compressed weights",
    ("openvino", "int8"): "nncf int8, uint8 pixels in", ("openvino", "w8"): "nncf int8 weights",
    ("executorch", "fp32"): ".pte, XNNPACK fp32", ("executorch", "int8"): ".pte, XNNPACK int8",
    ("executorch_coreml", "fp32"): ".pte, Core ML fp32", ("executorch_coreml", "fp16"): ".pte, Core ML fp16",
    ("executorch_coreml", "int8"): ".pte, Core ML W8A8",
}


def unsupported(fmt: str, scheme: str) -> Optional[str]:
    """Why ``fmt`` cannot express ``scheme``, or None."""
    if fmt not in SUPPORT:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(SUPPORT)}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; schemes: {', '.join(SCHEMES)}")
    return SUPPORT[fmt][scheme]
