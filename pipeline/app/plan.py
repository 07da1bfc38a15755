"""The pipeline's stages, in order, and the recipe sections that configure them.

A recipe names stages (``export``, ``validate``); :func:`plan` expands them into the units
the runner caches: one ``export.<format>`` and one ``validate.<format>`` per format, so a
failing converter or runtime costs only its format, plus ``images`` (the scored images,
decoded once) and ``reference`` (the float model's logits on them), shared by every
format and every scheme.

A unit's key covers the source of every project module its functions reach, found from
the imports (core/codegraph.py); ``libraries`` lists the distributions whose versions
count too.
"""
from __future__ import annotations

from functools import partial

from pipeline.core.runner import Stage
from pipeline.io.data import DataConfig
from pipeline.stages import export, images, load, qat, quantize, reference, reparam, validate

CONVERTERS = ("torch", "coremltools", "onnx", "onnxscript", "onnxsim", "onnxruntime",
              "litert-torch", "ai-edge-litert", "ai-edge-quantizer",
              "openvino", "nncf", "executorch")

SECTIONS = {"load": load.LoadConfig, "reparam": reparam.ReparamConfig,
            "qat": qat.QatConfig, "quantize": quantize.QuantizeConfig, "export": export.ExportConfig,
            "validate": validate.ValidateConfig, "data": DataConfig}

STAGES = {s.name: s for s in [
    Stage("load", load.run, fingerprint=load.fingerprint, libraries=("torch",)),
    Stage("reparam", reparam.run, needs=("load",), libraries=("torch", "scikit-image", "pillow")),
    # Core ML's QAT trains under the activation scheme its int8 export calibrates with.
    Stage("qat", qat.run, needs=("reparam",), sections=("data", "export.coreml"), fingerprint=qat.fingerprint,
          resumable=True, libraries=("torch", "torchao", "coremltools", "pillow")),
    Stage("quantize", quantize.run, needs=("reparam",), uses=("qat",), sections=("data",),
          fingerprint=quantize.fingerprint, libraries=("torch", "pillow")),
    # export and validate: one unit per format, made by plan().
]}


def export_unit(fmt: str) -> Stage:
    return Stage(f"export.{fmt}", export.run, needs=("quantize",), section="export",
                 narrow=partial(export.for_format, fmt), isolated=True, libraries=CONVERTERS)


def validate_unit(fmt: str) -> Stage:
    return Stage(f"validate.{fmt}", partial(validate.run, fmt), needs=("reparam", "images", "reference", f"export.{fmt}"),
                 section="validate", narrow=validate.narrow, isolated=True, libraries=CONVERTERS + ("pillow",))


SCORING = [
    Stage("images", images.run, needs=("reparam",), sections=("data",), section="validate", narrow=images.narrow,
          fingerprint=images.fingerprint, libraries=("torch", "pillow")),
    Stage("reference", reference.run, needs=("reparam", "images"), section="validate", narrow=reference.narrow,
          libraries=("torch",)),
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
