"""Stage 4: the model of ``quantize`` -> one artifact per requested format, each checked
against its PyTorch twin on natural images."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.core.runner import facts_of
from pipeline.formats import get_exporter
from pipeline.formats.base import ExportContext, ExportError
from pipeline.formats.coreml import CoreMLConfig
from pipeline.formats.onnx import OnnxConfig
from pipeline.formats.executorch import ExecuTorchConfig, ExecuTorchCoreMLConfig
from pipeline.formats.openvino import OpenVINOConfig
from pipeline.formats.tflite import TFLiteConfig
from pipeline.io.checkpoints import load_model
from pipeline.io.data import preprocess_of, sample_images
from pipeline.quant.fakequant import PTQ_TWIN, model_file
from pipeline.schemes import ALL_FORMATS, FORMATS, Format
from pipeline.search.accuracy_aware import export_within_budget
from pipeline.search.qat_gate import qat_or_ptq

log = logging.getLogger(__name__)



@dataclass
class ExportConfig:
    formats: list[Format] = field(default_factory=lambda: list(FORMATS))
    check_images: int = 8   # natural images for the parity check of each artifact
    coreml: CoreMLConfig = field(default_factory=CoreMLConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    tflite: TFLiteConfig = field(default_factory=TFLiteConfig)
    openvino: OpenVINOConfig = field(default_factory=OpenVINOConfig)
    executorch: ExecuTorchConfig = field(default_factory=ExecuTorchConfig)
    executorch_coreml: ExecuTorchCoreMLConfig = field(default_factory=ExecuTorchCoreMLConfig)

    def validate(self):
        if not self.formats:
            raise ValueError(f"formats is empty: name at least one of {', '.join(ALL_FORMATS)}")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats lists a format twice: {self.formats}")


def for_format(fmt: str, cfg: ExportConfig) -> ExportConfig:
    """``cfg`` as one format's export unit reads it: that format only, the other formats'
    settings at their defaults (so changing one format's knob re-runs only that format)."""
    defaults = ExportConfig()
    return replace(cfg, formats=[fmt], **{f: getattr(cfg if f == fmt else defaults, f)
                                          for f in ALL_FORMATS})


def artifact_stem(variant: str, scheme: str) -> str:
    return f"RepViT-{variant.upper()}-{scheme}"


def run(cfg: ExportConfig, inputs: dict, out_dir: Path) -> dict:
    quant = inputs["quantize"]
    fused, ckpt = load_model(quant / "model.pt")
    quant_facts = facts_of(quant)
    scheme = quant_facts["scheme"]
    calib_file = quant / "calibration_pixels.npy"
    calibration = np.load(calib_file) if calib_file.exists() else None
    pre = preprocess_of(ckpt.meta)
    check = np.stack([pre.pixels(im) for im in sample_images(cfg.check_images, seed=1)])
    stem = artifact_stem(fused.variant.name, scheme)
    artifacts = []
    for name in cfg.formats:
        exporter = get_exporter(name)
        reason = exporter.unsupported(scheme)
        if reason:
            artifacts.append({"format": name, "path": None, "skipped": reason})
            log.info(f"    {name}: skipped: {reason}")
            continue
        model, ranges = model_for(name, quant, scheme, fused)
        ctx = ExportContext(scheme, ckpt.meta, fused.variant.name, out_dir / (stem + exporter.suffix),
                            calibration, check, activation_ranges=ranges)
        fmt_cfg = getattr(cfg, name)
        result, budget = export_within_budget(exporter, model, ctx, fmt_cfg, quant, quant_facts, reference=fused)
        versus = None
        if scheme == "qat-int8" and "images" in (quant_facts.get("budget_set") or {}):
            result, budget, versus = _against_post_training(exporter, (result, budget, ctx), fmt_cfg, quant,
                                                            quant_facts, fused, out_dir)
        artifacts.append({"format": name, "path": result.path.name, **result.facts,
                          **({"accuracy_aware": budget} if budget else {}),
                          **({"qat_vs_ptq": versus} if versus else {})})
        log.info(f"    {name}: {result.path.name}")
    (out_dir / "labels.txt").write_text("\n".join(ckpt.meta["classes"]) + "\n")
    return {"scheme": scheme, "variant": fused.variant.name, "artifacts": artifacts}


def _against_post_training(exporter, qat: tuple, cfg, quant: Path, quant_facts: dict, fused, out_dir: Path):
    """qat-int8: the format's post-training int8 twin (the equalized fused model, int8's
    export with this recipe's settings and budget), and whichever of the two is closer to
    float on the held-out images ships (pipeline/search/qat_gate.py)."""
    qat_result, qat_budget, qat_ctx = qat
    twin, _ = load_model(quant / PTQ_TWIN)
    ptq_ctx = replace(qat_ctx, scheme="int8", activation_ranges={},
                      out_path=out_dir / ".post-training" / qat_ctx.out_path.name)
    ptq_ctx.out_path.parent.mkdir(exist_ok=True)
    log.info(f"    {exporter.name}: post-training int8 twin, to compare with QAT's")
    ptq_result, ptq_budget = export_within_budget(exporter, twin, ptq_ctx, cfg, quant, quant_facts, reference=fused)
    trained = (quant_facts.get("qat") or {}).get("trained", {}).values()
    seconds = next((t.get("seconds_this_run") for t in trained if exporter.name in t.get("formats", [])), None)
    result, versus = qat_or_ptq(exporter.name, (qat_result, qat_ctx), (ptq_result, ptq_ctx), fused, quant,
                                quant_facts.get("budget_set"), seconds,
                                getattr(cfg, "simulation", "int8"))
    shutil.rmtree(ptq_ctx.out_path.parent)   # the twin's folder: empty but for what an exporter left
    return result, (qat_budget if versus["shipped"] == "qat" else ptq_budget), versus


def model_for(fmt: str, quant: Path, scheme: str, fused) -> tuple[torch.nn.Module, dict]:
    """The model to export as ``fmt`` and the activation ranges QAT trained it with: QAT's
    fine-tuned one for that format, else the fused one (no ranges)."""
    trained = quant / model_file(fmt)
    if trained.exists():
        model, ckpt = load_model(trained)
        return model, (ckpt.meta.get("qat") or {}).get("activation_ranges") or {}
    if scheme == "qat-int8":
        raise ExportError(f"no QAT model for {fmt}: add {fmt} to qat.formats (it lists the formats "
                          "QAT trains for)")
    return fused, {}


