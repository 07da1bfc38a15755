"""The pipeline's stages, in order, and the recipe sections that configure them.

A recipe names stages (``export``, ``validate``); :func:`plan` expands them into the units
the runner caches: one ``export.<format>`` and one ``validate.<format>`` per format, so a
failing converter or runtime costs only its format, plus ``images`` (the scored images,
decoded once) and ``reference`` (the float model's logits on them), shared by every
format and every scheme.
"""
from __future__ import annotations

from functools import partial

from ..data import DataConfig
from ..runner import Stage
from . import export, images, load, qat, quantize, reference, reparam, validate

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
          code=("pipeline.stages.qat", "pipeline.training", "pipeline.fakequant", "pipeline.torchrun",
                "pipeline.models.equalize", *MODEL_CODE, *DATA_CODE),
          libraries=("torch", "torchao", "coremltools", "pillow")),
    Stage("quantize", quantize.run, needs=("reparam",), uses=("qat",), sections=("data",),
          fingerprint=quantize.fingerprint,
          code=("pipeline.stages.quantize", "pipeline.sensitivity", "pipeline.models.equalize", *MODEL_CODE, *DATA_CODE),
          libraries=("torch", "pillow")),
    # export and validate: one unit per format, made by plan().
]}

EXPORT_CODE = ("pipeline.stages.export", "pipeline.stages.qat", "pipeline.stages.validate", "pipeline.runtimes", *MODEL_CODE, *DATA_CODE,
               *FORMAT_CODE)
VALIDATE_CODE = ("pipeline.stages.validate", "pipeline.stages.images", "pipeline.scoring", "pipeline.compiled", "pipeline.torchrun", "pipeline.runtimes", "pipeline.latency",
                 *MODEL_CODE, *DATA_CODE, *FORMAT_CODE)


def export_unit(fmt: str) -> Stage:
    return Stage(f"export.{fmt}", export.run, needs=("quantize",), section="export",
                 narrow=partial(export.for_format, fmt), isolated=True, code=EXPORT_CODE, libraries=CONVERTERS)


def validate_unit(fmt: str) -> Stage:
    return Stage(f"validate.{fmt}", partial(validate.run, fmt), needs=("reparam", "images", "reference", f"export.{fmt}"),
                 section="validate", narrow=validate.narrow, isolated=True, code=VALIDATE_CODE,
                 libraries=CONVERTERS + ("pillow",))


SCORING = [
    Stage("images", images.run, needs=("reparam",), sections=("data",), section="validate", narrow=images.narrow,
          fingerprint=images.fingerprint, code=("pipeline.stages.images", *MODEL_CODE, *DATA_CODE),
          libraries=("torch", "pillow")),
    Stage("reference", reference.run, needs=("reparam", "images"), section="validate", narrow=reference.narrow,
          code=("pipeline.stages.reference", "pipeline.stages.images", "pipeline.stages.validate", "pipeline.compiled",
                *MODEL_CODE, *DATA_CODE), libraries=("torch",)),
]


def plan(stage_names: list[str], sections: dict) -> list[Stage]:
    """The runner's stages for a recipe's ``stages`` list (names of SECTIONS)."""
    formats = sections["export"].formats
    out = []
    for name in stage_names:
        if name == "export":
            out += [export_unit(f) for f in formats]
        elif name == "validate":
            out += SCORING + [validate_unit(f) for f in formats]
        else:
            out.append(STAGES[name])
    return out
