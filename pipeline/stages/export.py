"""Stage 4: the model of ``quantize`` -> one artifact per requested format, each checked
against its PyTorch twin on natural images."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..checkpoints import load_model
from ..data import sample_images
from ..formats import ExportContext, get_exporter
from ..formats.coreml import CoreMLConfig
from ..formats.onnx import OnnxConfig
from ..formats.tflite import TFLiteConfig
from .reparam import preprocess_of

Format = Literal["coreml", "onnx", "tflite"]


@dataclass
class ExportConfig:
    formats: list[Format] = field(default_factory=lambda: ["coreml", "onnx", "tflite"])
    check_images: int = 8   # natural images for the parity check of each artifact
    coreml: CoreMLConfig = field(default_factory=CoreMLConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    tflite: TFLiteConfig = field(default_factory=TFLiteConfig)

    def validate(self):
        if not self.formats:
            raise ValueError("formats is empty: name at least one of coreml, onnx, tflite")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats lists a format twice: {self.formats}")


def artifact_stem(variant: str, scheme: str) -> str:
    return f"RepViT-{variant.upper()}-{scheme}"


def run(cfg: ExportConfig, inputs: dict, out_dir: Path) -> dict:
    quant = inputs["quantize"]
    model, ckpt = load_model(quant / "model.pt")
    scheme = _scheme(quant)
    calib_file = quant / "calibration_pixels.npy"
    calibration = np.load(calib_file) if calib_file.exists() else None
    pre = preprocess_of(ckpt.meta)
    check = np.stack([pre.pixels(im) for im in sample_images(cfg.check_images, seed=1)])
    stem = artifact_stem(model.variant.name, scheme)
    artifacts = []
    for name in cfg.formats:
        exporter = get_exporter(name)
        reason = exporter.unsupported(scheme)
        if reason:
            artifacts.append({"format": name, "path": None, "skipped": reason})
            print(f"    {name}: skipped: {reason}", file=sys.stderr)
            continue
        ctx = ExportContext(scheme, ckpt.meta, model.variant.name, out_dir / (stem + exporter.suffix),
                            calibration, check)
        result = exporter.export(model, ctx, getattr(cfg, name))
        artifacts.append({"format": name, "path": result.path.name, **result.facts})
        print(f"    {name}: {result.path.name}", file=sys.stderr)
    (out_dir / "labels.txt").write_text("\n".join(ckpt.meta["classes"]) + "\n")
    return {"scheme": scheme, "variant": model.variant.name, "artifacts": artifacts}


def _scheme(quant_dir: Path) -> str:
    import json

    return json.loads((quant_dir / "manifest.json").read_text())["facts"]["scheme"] \
        if (quant_dir / "manifest.json").exists() else "fp32"
