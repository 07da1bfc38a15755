"""Quantization-aware fine-tuning: distil the float model into its fake-quantized twin.

One job is a folder holding ``job.json`` (what to train, on what, how) and, as training
goes, ``checkpoint.pt`` (resumed from after an interruption) and finally ``result.pt``.
The loop runs in-process, or under ``torchrun`` for several processes, GPUs or machines
(PyTorch DDP; gloo on CPU, nccl on GPU)::

    torchrun --nproc_per_node=8 -m pipeline.quant.training <job folder>

Every step's batch and augmentation are functions of (seed, step), and the checkpoint
holds the student (with its observers), the optimizer and the step, so a resumed run
computes what the uninterrupted one would have.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.allocator import keep_freed_memory
from pipeline.core.progress import Progress
from pipeline.io.checkpoints import load_model
from pipeline.quant.fakequant import (activation_fake_quants, float_state, freeze_observers, get_backend,
                                      set_percentile_ranges)

CHECKPOINT, RESULT, JOB = "checkpoint.pt", "result.pt", "job.json"


@dataclass
class Schedule:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    freeze_observers_step: int
    temperature: float
    ce_weight: float
    calibration_batches: int
    checkpoint_every: int
    seed: int
    device: str            # auto | cpu | cuda
    ranges: str = "moving_average"   # | percentile | value_percentile (frozen; set from calibration_pixels)
    range_percentile: float = 99.0   # of the images' extremes, or of the values (value_percentile)
    holdout_every: int = 0           # > 0: held-out agreement / KL in the history too

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class Job:
    teacher: str                   # fused float model (pipeline checkpoint)
    backend: str                   # fakequant backend: torchao | coremltools
    pixels: str                    # uint8 NHWC .npy: the training images
    labels: Optional[str]          # int .npy, or None (distillation alone)
    holdout_pixels: str            # uint8 NHWC .npy: images to report agreement on
    mean: list
    std: list
    schedule: Schedule
    # coremltools backend: the activation scheme and observer of Core ML's int8 export
    coreml_scheme: str = "symmetric"
    coreml_observer: str = "moving_average_min_max"
    calibration_pixels: Optional[str] = None   # uint8 NHWC .npy: the export's calibration images

    def save(self, folder: Path) -> None:
        (folder / JOB).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Job":
        d = json.loads((folder / JOB).read_text())
        return cls(**{**d, "schedule": Schedule(**d["schedule"])})


def _normalize(pixels: np.ndarray, mean, std, device) -> torch.Tensor:
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, device=device).reshape(1, 3, 1, 1)
    s = torch.tensor(std, device=device).reshape(1, 3, 1, 1)
    return (x - m) / s


def batch_indices(n: int, step: int, batch: int, seed: int) -> np.ndarray:
    """The global batch of ``step``: epochs are seeded permutations, so any step's batch
    is known without replaying the ones before it."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * batch:(k + 1) * batch]


def flips(step: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 << 20, step]).random(batch) < 0.5


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      labels: Optional[torch.Tensor], ce_weight: float) -> torch.Tensor:
    t = temperature
    loss = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t
    if labels is not None and ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(student, labels)
    return loss


class observers_paused:
    """Measure without moving the activation ranges: fake-quant modules update their
    observers in every forward pass, whatever the module's train/eval mode. (The weights'
    observers keep running: they measure the current weights, as every export does.)"""

    def __init__(self, student):
        self.modules = activation_fake_quants(student)

    def __enter__(self):
        self.saved = [m.observer_enabled.clone() for m in self.modules]
        for m in self.modules:
            m.observer_enabled.fill_(0)

    def __exit__(self, *exc):
        for m, s in zip(self.modules, self.saved):
            m.observer_enabled.copy_(s)


def agreement(student, teacher, backend, holdout: np.ndarray, job: Job, device) -> tuple[float, float]:
    """Top-1 agreement of the fake-quantized student with the float teacher, and the mean
    KL divergence of its probabilities from the teacher's (the soft agreement that
    distillation optimizes; top-1 alone saturates on confident models)."""
    backend.set_mode(student, False)
    same, kl = 0, 0.0
    with torch.no_grad(), observers_paused(student):
        for i in range(0, len(holdout), 64):
            x = _normalize(holdout[i:i + 64], job.mean, job.std, device)
            s, t = student(x), teacher(x)
            same += int((s.argmax(1) == t.argmax(1)).sum())
            kl += float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum", log_target=True))
    backend.set_mode(student, True)
    n = max(1, len(holdout))
    return same / n, kl / n


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(folder: Path, on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Run (or resume, or merely read) the job in ``folder``; returns its facts. Under
    torchrun, every process calls this; rank 0 writes the checkpoints and the result."""
    folder = Path(folder)
    if (folder / RESULT).exists():
        return torch.load(folder / RESULT, weights_only=True)["facts"]
    job = Job.load(folder)
    sch = job.schedule
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(sch.device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if sch.batch_size % world:
        raise ValueError(f"qat.batch_size {sch.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(sch.seed)

    teacher, _ = load_model(job.teacher)
    pixels = np.load(job.pixels)
    labels = np.load(job.labels) if job.labels else None
    holdout = np.load(job.holdout_pixels)
    backend = get_backend(job.backend, coreml_scheme=job.coreml_scheme, coreml_observer=job.coreml_observer)
    # Prepared on the CPU (graph capture), then both models move to the device.
    student = backend.prepare(teacher.eval(), _normalize(pixels[:2], job.mean, job.std, "cpu")).to(device)
    teacher.to(device)

    start, history = 0, []
    ckpt_path = folder / CHECKPOINT
    state = torch.load(ckpt_path, weights_only=True, map_location=device) if ckpt_path.exists() else None
    if state:
        student.load_state_dict(state["student"])
        start, history = state["step"], state["history"]
        before = tuple(state["agreement_before"])
    else:
        # Ranges first: post-training ones, so that the agreement before the first step is
        # the PTQ baseline. Either the observers see calibration batches (no gradient), or
        # the ranges are set from the export's calibration images and frozen.
        if sch.ranges in ("percentile", "value_percentile"):
            calib = np.load(job.calibration_pixels)
            set_percentile_ranges(student, (_normalize(calib[i:i + 64], job.mean, job.std, device)
                                            for i in range(0, len(calib), 64)), sch.range_percentile,
                                  of_values=sch.ranges == "value_percentile")
        else:
            with torch.no_grad():
                for b in range(sch.calibration_batches):
                    idx = batch_indices(len(pixels), b, sch.batch_size, sch.seed + 7)
                    student(_normalize(pixels[idx], job.mean, job.std, device))
        before = agreement(student, teacher, backend, holdout, job, device)
    if start >= sch.freeze_observers_step:
        freeze_observers(student)
    model = (torch.nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if device.type == "cuda" else None)
             if world > 1 else student)
    opt = torch.optim.AdamW(student.parameters(), lr=sch.lr, weight_decay=sch.weight_decay)
    if state:
        opt.load_state_dict(state["optimizer"])

    began = time.perf_counter()
    bar = Progress(sch.steps, "QAT steps") if rank == 0 else None
    if bar:
        bar.update(start)
    window = [tuple(w) for w in state["window"]] if state else []
    for step in range(start, sch.steps):
        if step == sch.freeze_observers_step:
            freeze_observers(student)
        for g in opt.param_groups:
            g["lr"] = sch.lr_at(step)
        idx = batch_indices(len(pixels), step, sch.batch_size, sch.seed)
        flip = flips(step, len(idx), sch.seed)
        shard = slice(rank * len(idx) // world, (rank + 1) * len(idx) // world)
        batch = pixels[idx][shard]
        batch = np.where(flip[shard, None, None, None], batch[:, :, ::-1], batch)
        x = _normalize(np.ascontiguousarray(batch), job.mean, job.std, device)
        y = torch.from_numpy(labels[idx][shard]).long().to(device) if labels is not None else None
        with torch.no_grad():
            t = teacher(x)
        s = model(x)
        loss = distillation_loss(s, t, sch.temperature, y, sch.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append((float(loss.detach()), float((s.argmax(1) == t.argmax(1)).float().mean())))
        if bar:
            bar.update(1)
            bar.bar.set_postfix(loss=f"{np.mean([w[0] for w in window[-20:]]):.4f}",
                                agree=f"{np.mean([w[1] for w in window[-20:]]):.3f}")
        if (step + 1) % 50 == 0 or step + 1 == sch.steps:
            history.append({"step": step + 1, "loss": round(float(np.mean([w[0] for w in window])), 5),
                            "batch_agreement": round(float(np.mean([w[1] for w in window])), 4)})
            window = []
            if rank == 0 and not sys.stderr.isatty():   # logs get a line where a terminal gets a bar
                print(f"    QAT {job.backend} step {step + 1}/{sch.steps}: loss {history[-1]['loss']:.4f}, "
                      f"batch agreement {history[-1]['batch_agreement']:.3f}", file=sys.stderr)
        if sch.holdout_every and (step + 1) % sch.holdout_every == 0 and step + 1 < sch.steps:
            agree, kl = agreement(student, teacher, backend, holdout, job, device)
            if not history or history[-1]["step"] != step + 1:
                history.append({"step": step + 1})
            history[-1].update(holdout_agreement=round(agree, 4), holdout_kl=round(kl, 6))
            if rank == 0 and not sys.stderr.isatty():
                print(f"    QAT {job.backend} step {step + 1}: held-out agreement {agree:.4f}, "
                      f"KL {kl:.6f}", file=sys.stderr)
        if (step + 1) % sch.checkpoint_every == 0 and step + 1 < sch.steps and rank == 0:
            _save_atomic({"student": student.state_dict(), "optimizer": opt.state_dict(),
                          "step": step + 1, "history": history, "window": window,
                          "agreement_before": before},
                         ckpt_path)
        if on_step:
            on_step(step + 1)
    if bar:
        bar.bar.close()
    after = agreement(student, teacher, backend, holdout, job, device)
    facts = {"backend": job.backend, "steps": sch.steps, "resumed_from_step": start,
             "world_size": world, "device": device.type,
             "holdout_agreement_before": round(before[0], 4), "holdout_agreement_after": round(after[0], 4),
             "holdout_kl_before": round(before[1], 6), "holdout_kl_after": round(after[1], 6),
             "holdout_images": int(len(holdout)), "history": history,
             "seconds_this_run": round(time.perf_counter() - began, 1)}
    if world > 1:
        # Every rank must end with the same weights (DDP averages the gradients of each
        # rank's share of the batch): a desynchronised run is an error, not a result.
        digest = torch.tensor([sum(float(p.double().sum()) for p in student.parameters())],
                              dtype=torch.float64, device=device)
        low, high = digest.clone(), digest.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if low.item() != high.item():
            raise RuntimeError(f"DDP ranks ended with different weights (sums {low.item()!r} .. "
                               f"{high.item()!r}): the run is not valid")
        facts["weights_sum"] = digest.item()   # the same on every rank
    if rank == 0:
        weights = float_state(student, teacher)
        _save_atomic({"weights": weights, "facts": facts,
                      "activation_ranges": backend.activation_ranges(student)}, folder / RESULT)
        ckpt_path.unlink(missing_ok=True)
    if world > 1:
        torch.distributed.barrier()
    return facts


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: torchrun [...] -m pipeline.quant.training <job folder>", file=sys.stderr)
        return 2
    keep_freed_memory()
    train(Path(argv[0]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
