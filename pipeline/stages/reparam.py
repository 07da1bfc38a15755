"""Stage 2: structural reparameterization and BN folding, proven on natural images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.io.checkpoints import load_model, save_pipeline_checkpoint
from pipeline.io.data import batch, preprocess_of, sample_images
from pipeline.models.profile import profile
from pipeline.models.reparam import ReparamError, reparameterize


@dataclass
class ReparamConfig:
    verify: bool = True
    verify_images: int = 16
    # max |fused - unfused| allowed, relative to max |logit|: float32 folding is exact to
    # ~1e-6; a one-term mistake (a missing identity or bias) is orders of magnitude above.
    tolerance: float = 1e-4


@dataclass
class ReparamResult:
    checkpoint: Path
    max_abs_diff: float | None
    max_abs_logit: float | None
    top1_agreement: float | None
    params_before: int
    params_after: int
    gmacs: float
    batchnorms_before: int


@torch.no_grad()
def verify(model: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor, tolerance: float
           ) -> tuple[float, float, float]:
    """(max abs diff, max |logit|, top-1 agreement) of fused vs unfused on ``x``; raises
    ``ReparamError`` beyond ``tolerance``."""
    ref, out = model.eval()(x), fused.eval()(x)
    diff, scale = (ref - out).abs().max().item(), ref.abs().max().item()
    agree = (ref.argmax(1) == out.argmax(1)).float().mean().item()
    if diff > tolerance * scale:
        raise ReparamError(f"fused model differs from the original: max |diff| {diff:.3g} > "
                           f"{tolerance:g} x max |logit| {scale:.3g}; the fusion is wrong")
    return diff, scale, agree


def reparam(cfg: ReparamConfig, model_checkpoint: Path, out_dir: Path) -> ReparamResult:
    model, ckpt = load_model(model_checkpoint)
    fused = reparameterize(model)
    size = ckpt.meta.get("input_size", model.variant.input_size)
    diff = scale = agree = None
    if cfg.verify:
        images = sample_images(cfg.verify_images)
        x = torch.from_numpy(batch(images, preprocess_of(ckpt.meta)))
        diff, scale, agree = verify(model, fused, x, cfg.tolerance)
    before, after = profile(model, size), profile(fused, size)
    path = out_dir / "fused.pt"
    save_pipeline_checkpoint(path, fused, ckpt.meta)
    return ReparamResult(path, diff, scale, agree, before.params, after.params,
                         after.macs / 1e9, before.batchnorms)


def run(cfg: ReparamConfig, inputs: dict, out_dir: Path) -> dict:
    """Stage entry point: ``load``'s ``model.pt`` -> ``fused.pt``."""
    r = reparam(cfg, inputs["load"] / "model.pt", out_dir)
    return {k: v for k, v in r.__dict__.items() if k != "checkpoint"}
