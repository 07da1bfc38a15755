"""Stage: quantization-aware training (``qat-int8``): the fused float model fine-tuned under
the fake quantization of each target format's int8 scheme, by distillation from itself
(plus cross-entropy where CALIB has labels). Its output is one float model per format,
which ``quantize`` and ``export`` then treat like any other: each format's own int8 tool
quantizes it, calibrated on the same images as post-training int8.

The fused model is what is trained (no BatchNorm is left to freeze): the weights that get
fake-quantized are exactly those deployed. Training runs in-process, or under torchrun
with ``nproc_per_node`` > 1 (DDP), and resumes from its last checkpoint after an
interruption (the runner keeps a scratch folder per cache key until the stage completes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.core.progress import Progress
from pipeline.core.torchrun import torchrun
from pipeline.formats.coreml import CoreMLConfig
from pipeline.io.checkpoints import load_model, save_pipeline_checkpoint
from pipeline.io.data import (DataConfig, calibration_pixels, fingerprint_data, normalized, preprocess_of,
                              resolve_sets, training_pixels)
from pipeline.models.equalize import check_alpha, equalize_residual_stream
from pipeline.quant.fakequant import BACKEND_OF_FORMAT, model_file
from pipeline.quant.training import RESULT, Job, Schedule, train
from pipeline.schemes import FORMATS, Format, unsupported

log = logging.getLogger(__name__)



@dataclass
class QatConfig:
    # Formats to train for: Core ML's fake quantization is coremltools' LinearQuantizer,
    # ONNX and TFLite share torchao PT2E's (one training serves both).
    formats: list[Format] = field(default_factory=lambda: list(FORMATS))
    train_images: int = 2048        # from CALIB (the training split), never the scored DATA
    steps: int = 300
    batch_size: int = 32            # global: split over the processes under torchrun
    # AdamW's peak learning rate: linear warm-up then cosine to zero.
    lr: float = 5.0e-5
    weight_decay: float = 0.0
    warmup_steps: int = 20
    freeze_observers_step: int = 200   # activation ranges fixed for the last steps, as deployed
    temperature: float = 1.0        # distillation from the float model's logits
    # Weight of cross-entropy on CALIB's labels beside distillation (0: distillation only,
    # QAT's job being the float model's behaviour under quantization).
    ce_weight: float = 0.0
    calibration_batches: int = 4    # observer warm-up before the first step (the PTQ start)
    checkpoint_every: int = 50
    # > 0: held-out agreement / KL every this many steps too (the curve, in the facts'
    # history); 0: before and after only
    holdout_every: int = 0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc_per_node: int = 1         # > 1: torchrun, one process per GPU (or CPU, gloo)
    # Start from the residual-stream-equalized model (the transform post-training int8
    # applies, on the same calibration images): QAT then begins where PTQ ends.
    equalize: bool = True
    equalize_alpha: float = 0.5
    # Activation ranges trained against: "moving_average" (the observers follow each batch's
    # extremes until freeze_observers_step), "percentile" (fixed before the first step to
    # the range_percentile of the calibration images' per-image extremes, and never moved)
    # or "value_percentile" (fixed to the range that clips range_value_percentile's share of
    # all values, as every int8 export calibrates by default).
    ranges: Literal["moving_average", "percentile", "value_percentile"] = "percentile"
    range_percentile: float = 99.0
    range_value_percentile: float = 99.999

    def validate(self):
        if not self.formats:
            raise ValueError("formats is empty: name at least one of coreml, onnx, tflite")
        untrainable = [f for f in self.formats if f not in BACKEND_OF_FORMAT]
        if untrainable:
            raise ValueError(f"QAT cannot train for {', '.join(untrainable)}: "
                             f"{unsupported(untrainable[0], 'qat-int8')}; formats: {', '.join(BACKEND_OF_FORMAT)}")
        for name in ("train_images", "steps", "batch_size", "checkpoint_every", "nproc_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.batch_size % self.nproc_per_node:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by nproc_per_node "
                             f"{self.nproc_per_node}")
        if self.holdout_every < 0:
            raise ValueError(f"holdout_every {self.holdout_every} must be 0 (off) or a step count")
        if not 0 <= self.freeze_observers_step <= self.steps:
            raise ValueError(f"freeze_observers_step must be within 0..steps ({self.steps})")
        check_alpha(self.equalize_alpha)
        if not 50 < self.range_percentile <= 100:
            raise ValueError(f"range_percentile {self.range_percentile} must be in (50, 100]")
        if not 90 <= self.range_value_percentile <= 100:
            raise ValueError(f"range_value_percentile {self.range_value_percentile} must be in [90, 100]")

    def schedule(self) -> Schedule:
        return Schedule(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                        weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                        freeze_observers_step=self.freeze_observers_step, temperature=self.temperature,
                        ce_weight=self.ce_weight, calibration_batches=self.calibration_batches,
                        checkpoint_every=self.checkpoint_every,
                        holdout_every=self.holdout_every, seed=self.seed, device=self.device,
                        ranges=self.ranges, range_percentile=(self.range_value_percentile if self.ranges ==
                                                              "value_percentile" else self.range_percentile))


def fingerprint(cfg: QatConfig, data: DataConfig, coreml=None) -> dict:
    return fingerprint_data(data)


def launch(job_dir: Path, nproc: int) -> None:
    """Run the job: in this process, or under torchrun with ``nproc`` processes."""
    if nproc == 1:
        train(job_dir)
        return
    code = torchrun("pipeline.quant.training", [str(job_dir)], nproc)
    if code != 0:
        raise RuntimeError(f"distributed QAT failed (torchrun exit {code}); its checkpoint "
                           f"stays in {job_dir}: run again to resume")


def run(cfg: QatConfig, inputs: dict, out_dir: Path, data: DataConfig, scratch: Path,
        coreml: CoreMLConfig | None = None) -> dict:
    coreml = coreml or CoreMLConfig()
    teacher_path = inputs["reparam"] / "fused.pt"
    fused, ckpt = load_model(teacher_path)
    pre = preprocess_of(ckpt.meta)
    facts = {}
    resuming = (scratch / "pixels.npy").exists()   # the training images were chosen already
    calibrated = cfg.equalize or cfg.ranges != "moving_average"
    sets = resolve_sets(data, ckpt.meta["classes"]) if calibrated or not resuming else None
    if calibrated:   # deterministic: a resumed run computes the same again
        pixels = calibration_pixels(sets, data, pre)
        np.save(scratch / "calibration.npy", pixels)
    if cfg.equalize:
        fused, facts["equalization"] = equalize_residual_stream(
            fused, torch.from_numpy(normalized(pixels, ckpt.meta)), cfg.equalize_alpha)
        teacher_path = scratch / "equalized.pt"
        save_pipeline_checkpoint(teacher_path, fused, ckpt.meta)
    if not resuming:
        with Progress(cfg.train_images, "QAT images") as bar:
            pixels, labels, holdout, description = training_pixels(sets, data, pre, cfg.train_images,
                                                                   bar.update)
        if labels is not None:
            np.save(scratch / "labels.npy", labels)
        np.save(scratch / "holdout.npy", holdout)
        (scratch / "description.txt").write_text(description)
        np.save(scratch / "pixels.npy", pixels)   # last: its presence marks the set complete
    facts.update({"images": (scratch / "description.txt").read_text(), "trained": {}})
    labels_file = scratch / "labels.npy"
    for backend in sorted({BACKEND_OF_FORMAT[f] for f in cfg.formats}):
        job_dir = scratch / backend
        job_dir.mkdir(exist_ok=True)
        Job(teacher=str(teacher_path), backend=backend, pixels=str(scratch / "pixels.npy"),
            labels=str(labels_file) if labels_file.exists() else None,
            holdout_pixels=str(scratch / "holdout.npy"), mean=list(ckpt.meta["mean"]),
            std=list(ckpt.meta["std"]), schedule=cfg.schedule(),
            coreml_scheme=coreml.quantization_scheme, coreml_observer=coreml.activation_observer,
            calibration_pixels=str(scratch / "calibration.npy") if calibrated else None).save(job_dir)
        log.info(f"    QAT with {backend} fake quantization "
                 f"(for {', '.join(f for f in cfg.formats if BACKEND_OF_FORMAT[f] == backend)})")
        launch(job_dir, cfg.nproc_per_node)
        result = torch.load(job_dir / RESULT, weights_only=True)
        fused.load_state_dict(result["weights"])
        for fmt in cfg.formats:
            if BACKEND_OF_FORMAT[fmt] == backend:
                # The ranges travel with the model: a converter that accepts them uses them.
                save_pipeline_checkpoint(out_dir / model_file(fmt), fused, {**ckpt.meta, "qat": {
                    "backend": backend, "activation_ranges": result.get("activation_ranges", {})}})
        facts["trained"][backend] = {**result["facts"],
                                     "formats": [f for f in cfg.formats if BACKEND_OF_FORMAT[f] == backend]}
    return facts
