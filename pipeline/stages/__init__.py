"""The pipeline's stages, in order, and the recipe sections that configure them."""
from __future__ import annotations

from ..data import DataConfig
from ..runner import Stage
from . import export, load, qat, quantize, reparam, validate

MODEL_CODE = ("pipeline.models.repvit", "pipeline.models.fusion", "pipeline.models.reparam",
              "pipeline.checkpoints", "pipeline.variants")
DATA_CODE = ("pipeline.data",)
FORMAT_CODE = ("pipeline.formats", "pipeline.formats.coreml", "pipeline.formats.onnx",
               "pipeline.formats.tflite", "pipeline.runtimes.mil")
CONVERTERS = ("torch", "coremltools", "onnx", "onnxscript", "onnxsim", "onnxruntime",
              "litert-torch", "ai-edge-litert", "ai-edge-quantizer")

SECTIONS = {"load": load.LoadConfig, "reparam": reparam.ReparamConfig,
            "qat": qat.QatConfig, "quantize": quantize.QuantizeConfig, "export": export.ExportConfig,
            "validate": validate.ValidateConfig, "data": DataConfig}

STAGES = {s.name: s for s in [
    Stage("load", load.run, fingerprint=load.fingerprint,
          code=("pipeline.stages.load", "pipeline.download", *MODEL_CODE, *DATA_CODE),
          libraries=("torch",)),
    Stage("reparam", reparam.run, needs=("load",),
          code=("pipeline.stages.reparam", "pipeline.models.profile", *MODEL_CODE, *DATA_CODE),
          libraries=("torch", "scikit-image", "pillow")),
    # Core ML's QAT trains under the activation scheme its int8 export calibrates with.
    Stage("qat", qat.run, needs=("reparam",), sections=("data", "export.coreml"), fingerprint=qat.fingerprint,
          resumable=True,
          code=("pipeline.stages.qat", "pipeline.training", "pipeline.fakequant", *MODEL_CODE, *DATA_CODE),
          libraries=("torch", "torchao", "coremltools", "pillow")),
    Stage("quantize", quantize.run, needs=("reparam",), uses=("qat",), sections=("data",),
          fingerprint=quantize.fingerprint,
          code=("pipeline.stages.quantize", "pipeline.sensitivity", *MODEL_CODE, *DATA_CODE),
          libraries=("torch", "pillow")),
    Stage("export", export.run, needs=("quantize",),
          code=("pipeline.stages.export", "pipeline.stages.qat", "pipeline.runtimes", *MODEL_CODE, *DATA_CODE, *FORMAT_CODE),
          libraries=CONVERTERS),
    Stage("validate", validate.run, needs=("reparam", "export"), sections=("data",),
          fingerprint=validate.fingerprint,
          code=("pipeline.stages.validate", "pipeline.runtimes", "pipeline.latency", *MODEL_CODE, *DATA_CODE, *FORMAT_CODE),
          libraries=CONVERTERS + ("pillow",)),
]}
