"""Stage 3: fix the compression scheme and prepare what it needs.

Each format is quantized by its own tool on its own graph (onnxruntime on the ONNX
graph, ai-edge-quantizer on the TFLite flatbuffer, coremltools on the ML program), so
the per-format quantizers run inside ``export``. This stage chooses the calibration
images (deterministically, with the deployment preprocessing, never the scored ones)
and hands the fused model on, with the fine-tuned model of each format after QAT
(``qat-int8``: the ``qat`` stage ran before this one).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from pipeline.core.progress import Progress
from pipeline.core.runner import facts_of
from pipeline.io.checkpoints import load_model, parse, read_file, save_pipeline_checkpoint
from pipeline.io.data import (DataConfig, DataError, budget_set, calibration_pixels, fingerprint_data,
                              normalized, preprocess_of, resolve_sets)
from pipeline.models.equalize import check_alpha, equalize_residual_stream
from pipeline.quant.fakequant import PTQ_TWIN
from pipeline.quant.sensitivity import layer_sensitivity
from pipeline.schemes import CALIBRATED, SCHEMES, Scheme


@dataclass
class QuantizeConfig:
    scheme: Scheme = "fp32"
    # Allowed loss: top-1 points with labels, agreement points without.
    max_drop: Optional[float] = None
    # Fewer calibration images than this give activation ranges that do not generalize.
    min_calibration_images: int = 32
    # Accuracy-aware pass (int8 with max_drop): images for the per-layer sensitivity
    # ranking, and the most layers it may keep in float.
    sensitivity_images: int = 32
    max_float_layers: int = 16
    # A budget still missed after the pass: warn and ship the best attempt, or fail.
    on_budget_miss: Literal["warn", "error"] = "warn"
    # int8: equalize the residual stream's channel ranges on the calibration images before
    # any format calibrates (pipeline/models/equalize.py; docs/int8-fidelity.md: measured per format).
    equalize: bool = True
    equalize_alpha: float = 0.5

    def validate(self):
        check_alpha(self.equalize_alpha)


def fingerprint(cfg: QuantizeConfig, data: DataConfig) -> dict:
    if cfg.scheme not in CALIBRATED:
        return {}
    return fingerprint_data(data)


def _prepare_budget(cfg: QuantizeConfig, ckpt, sets, data: DataConfig, pixels: np.ndarray,
                    out_dir: Path) -> dict:
    """Held-out images and the layer ranking for the accuracy-aware pass."""
    if not ckpt.meta.get("weights", {}).get("trained", True):
        return {"skipped": "untrained weights: what int8 costs them says nothing about what it "
                           "costs a trained model"}
    with Progress(data.budget_images, "budget images") as bar:
        budget = budget_set(sets, data, preprocess_of(ckpt.meta), bar.update)
    np.save(out_dir / "budget_pixels.npy", budget.pixels)
    if budget.labels is not None:
        np.save(out_dir / "budget_labels.npy", budget.labels)
    model, _ = load_model(out_dir / "model.pt")
    x = torch.from_numpy(normalized(pixels[:cfg.sensitivity_images], ckpt.meta))
    ranking = layer_sensitivity(model, x)
    (out_dir / "sensitivity.json").write_text(json.dumps(ranking, indent=1))
    return {"images": int(len(budget.pixels)), "source": budget.description,
            "max_float_layers": cfg.max_float_layers, "on_miss": cfg.on_budget_miss}


def run(cfg: QuantizeConfig, inputs: dict, out_dir: Path, data: DataConfig) -> dict:
    if cfg.scheme not in SCHEMES:
        raise NotImplementedError(
            f"scheme {cfg.scheme!r} is not available in this version of the pipeline "
            f"(available: {', '.join(SCHEMES)})")
    shutil.copyfile(inputs["reparam"] / "fused.pt", out_dir / "model.pt")
    facts = {"scheme": cfg.scheme, "max_drop": cfg.max_drop, "calibration": None}
    if cfg.scheme == "qat-int8":
        if "qat" not in inputs:
            raise ValueError("scheme qat-int8 needs the qat stage: list it before quantize in the "
                             "recipe's stages (recipes/qat-int8.yaml does)")
        for trained in sorted(inputs["qat"].glob("model.*.pt")):
            shutil.copyfile(trained, out_dir / trained.name)
        facts["qat"] = facts_of(inputs["qat"])
    if cfg.scheme in CALIBRATED:
        ckpt = parse(read_file(out_dir / "model.pt"))
        sets = resolve_sets(data, ckpt.meta["classes"])
        n = len(sets.calib) if sets.calib is not None else data.calib_images
        with Progress(min(n, data.calib_images), "calibration images") as bar:
            pixels = calibration_pixels(sets, data, preprocess_of(ckpt.meta), bar.update)
        if len(pixels) < cfg.min_calibration_images:
            raise DataError(
                f"only {len(pixels)} calibration images ({sets.calib_description}); {cfg.scheme} needs "
                f"at least {cfg.min_calibration_images}: pass CALIB=<folder of training images> or "
                "a larger DATA")
        np.save(out_dir / "calibration_pixels.npy", pixels)
        facts["calibration"] = {"images": int(len(pixels)), "source": sets.calib_description}
        # qat-int8: QAT's models are equalized already; the post-training twin that each
        # fine-tuned artifact must beat (pipeline/search/qat_gate.py) is made here as int8's.
        ptq_file = out_dir / ("model.pt" if cfg.scheme == "int8" else PTQ_TWIN)
        if cfg.equalize and cfg.scheme in ("int8", "qat-int8"):
            model, _ = load_model(out_dir / "model.pt")
            equalized, facts["equalization"] = equalize_residual_stream(
                model, torch.from_numpy(normalized(pixels, ckpt.meta)), cfg.equalize_alpha)
            save_pipeline_checkpoint(ptq_file, equalized, ckpt.meta)
        elif cfg.scheme == "qat-int8":
            shutil.copyfile(out_dir / "model.pt", ptq_file)
        if cfg.max_drop is not None or cfg.scheme == "qat-int8":   # qat-int8: the held-out images decide
            facts["budget_set"] = _prepare_budget(cfg, ckpt, sets, data, pixels, out_dir)
    return facts
