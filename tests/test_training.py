"""Quantization-aware training: fake quantization is really on in both backends, QAT's
model stays faithful in a real runtime (toy) and beats post-training int8 on the trained
reference (slow), an interrupted run resumes to the same weights, and DDP keeps two
processes' weights in step."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import fidelity
from pipeline.formats import get_exporter
from pipeline.formats.base import ExportContext
from pipeline.formats.onnx import OnnxConfig
from pipeline.io.checkpoints import save_pipeline_checkpoint
from pipeline.io.data import normalized
from pipeline.quant.training import CHECKPOINT, RESULT, Job, Schedule, batch_indices, train
from pipeline.runtimes.ort import run_onnx

ROOT = Path(__file__).resolve().parents[1]

SCHEDULE = Schedule(steps=40, batch_size=32, lr=1e-4, weight_decay=0.0, warmup_steps=4,
                    freeze_observers_step=30, temperature=1.0, ce_weight=0.5, calibration_batches=2,
                    checkpoint_every=8, seed=0, device="cpu")


def make_job(folder: Path, trained, backend="torchao", **schedule) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_pipeline_checkpoint(folder / "teacher.pt", trained.fused, trained.meta)
    np.save(folder / "pixels.npy", trained.calibration)
    np.save(folder / "labels.npy", trained.train_labels)
    np.save(folder / "holdout.npy", trained.check)
    Job(teacher=str(folder / "teacher.pt"), backend=backend, pixels=str(folder / "pixels.npy"),
        labels=str(folder / "labels.npy"), holdout_pixels=str(folder / "holdout.npy"),
        mean=trained.meta["mean"], std=trained.meta["std"],
        schedule=replace(SCHEDULE, **schedule)).save(folder)
    return folder


def trained_model(trained, folder: Path) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(trained.fused)
    model.load_state_dict(torch.load(folder / RESULT, weights_only=True)["weights"])
    return model.eval()


def onnx_int8(model, trained, path: Path, ranges: dict | None = None) -> np.ndarray:
    ctx = ExportContext("qat-int8" if ranges else "int8", trained.meta, "m0.6", path, trained.calibration, None,
                        activation_ranges=ranges or {})
    get_exporter("onnx").export(model, ctx, OnnxConfig(qat_ranges=True))
    return run_onnx(path, normalized(trained.check, trained.meta))


def test_batches_cover_the_set_and_depend_only_on_seed_and_step():
    epoch = np.concatenate([batch_indices(100, s, 10, seed=3) for s in range(10)])
    assert sorted(epoch) == list(range(100))
    assert np.array_equal(batch_indices(100, 13, 10, 3), batch_indices(100, 13, 10, 3))
    assert not np.array_equal(batch_indices(100, 3, 10, 3), batch_indices(100, 13, 10, 3))


@pytest.mark.parametrize("backend", ["torchao", "coremltools"])
def test_fake_quantization_is_on_from_the_first_step(backend, trained):
    """Both backends round from the start (coremltools' prepare leaves it off), and a
    measurement does not move the ranges."""
    from pipeline.quant.fakequant import get_backend
    from pipeline.quant.training import Job, agreement

    b = get_backend(backend)
    x = torch.from_numpy(normalized(trained.calibration[:32], trained.meta))
    student = b.prepare(trained.fused, x[:2])
    with torch.no_grad():
        student(x)   # observers see a batch
        b.set_mode(student, False)
        diff = (student(x) - trained.fused(x)).abs().max() / trained.fused(x).abs().max()
    assert 1e-4 < diff < 0.2, f"fake-quantized output differs from float by {diff:.2g} of max |logit|"
    ranges = {k: v.clone() for k, v in student.state_dict().items() if "scale" in k or "min_val" in k}
    job = Job("", backend, "", None, "", trained.meta["mean"], trained.meta["std"], SCHEDULE)
    agree, kl = agreement(student, trained.fused, b, trained.check, job, "cpu")
    assert 0.9 <= agree <= 1.0 and kl > 0
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in ranges.items()), "measuring moved the ranges"


@pytest.mark.parametrize("backend", ["torchao", "coremltools"])
def test_weight_grids_are_the_current_weights_own_even_after_freezing(backend, trained):
    """Every export quantizes the final weights per channel with scale max|w| / 127
    (coremltools: / 127.5) of those weights, so the student must train on exactly that grid:
    after the weights move (and the observers are frozen, which freezes activation ranges
    only), each weight scale is the current weights' own. (Before: a moving average that
    lagged the weights, and a floor of 2^-12 that torchao's channels of small weights hit.)"""
    from pipeline.quant.fakequant import (activation_fake_quants, freeze_observers, get_backend,
                                          weight_fake_quants)

    b = get_backend(backend)
    x = torch.from_numpy(normalized(trained.calibration[:4], trained.meta))
    student = b.prepare(trained.fused, x[:2])
    fqs = weight_fake_quants(student)
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in trained.fused.modules())
    assert len(fqs) == n_layers
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].detach().clone())) for m in fqs]
    with torch.no_grad():
        student(x)
        freeze_observers(student)
        assert not any(m.observer_enabled for m in activation_fake_quants(student))
        for p in student.parameters():
            if p.dim() > 1:
                p.mul_(1.25)   # as training moves them
        student(x)
    for h in hooks:
        h.remove()
    checked = total = 0
    for m in fqs:
        obs = m.activation_post_process
        want = seen[m].abs().flatten(1).amax(1) / ((obs.quant_max - obs.quant_min) / 2)
        normal = want > 2 ** -20   # below, both backends floor the scale at float32's eps
        torch.testing.assert_close(m.scale.flatten()[normal], want[normal], rtol=1e-6, atol=0)
        checked, total = checked + int(normal.sum()), total + len(want)
    assert checked > 0.9 * total


@pytest.mark.parametrize("backend", ["torchao", "coremltools"])
def test_percentile_ranges_are_the_images_extremes_and_stay_frozen(backend, trained):
    """qat.ranges: percentile sets each activation range from per-image extremes on the
    float flow (the network input's range is checked against numpy), fake quantization
    stays on, and a training-mode forward pass moves no activation range."""
    from pipeline.quant.fakequant import activation_fake_quants, get_backend, set_percentile_ranges

    b = get_backend(backend)
    x = torch.from_numpy(normalized(trained.calibration[:64], trained.meta))
    student = b.prepare(trained.fused, x[:2])
    fqs = activation_fake_quants(student)
    assert set_percentile_ranges(student, [x[:32], x[32:]], 99.0) == len(fqs) > 10
    per_image = x.flatten(1).numpy()
    lo, hi = np.percentile(per_image.min(1), 1), np.percentile(per_image.max(1), 99)
    ranges = [(float(m.activation_post_process.min_val), float(m.activation_post_process.max_val)) for m in fqs]
    assert any(r == pytest.approx((lo, hi), rel=1e-6) for r in ranges), (lo, hi, ranges[:3])
    assert all(r[0] <= 0 <= r[1] and r[1] > r[0] for r in ranges)
    scales = [m.scale.clone() for m in fqs]
    with torch.no_grad():
        b.set_mode(student, True)
        student(x * 3)   # far wider inputs: a moving observer would widen
        assert all(torch.equal(s, m.scale) for s, m in zip(scales, fqs)), "a frozen range moved"
        b.set_mode(student, False)
        diff = (student(x) - trained.fused(x)).abs().max() / trained.fused(x).abs().max()
    assert 1e-4 < diff < 0.2, f"fake-quantized output differs from float by {diff:.2g} of max |logit|"


def test_value_percentile_ranges_clip_that_share_of_the_float_values(trained):
    """qat.ranges: value_percentile fixes each activation range to the one that clips that
    share of all values on the float flow: checked on the network input against numpy's
    order statistics of the pooled pixels."""
    from pipeline.quant.fakequant import activation_fake_quants, get_backend, set_percentile_ranges

    b = get_backend("torchao")
    x = torch.from_numpy(normalized(trained.calibration[:64], trained.meta))
    student = b.prepare(trained.fused, x[:2])
    fqs = activation_fake_quants(student)
    assert set_percentile_ranges(student, [x[:32], x[32:]], 99.9, of_values=True) == len(fqs)
    pooled = np.sort(x.numpy().reshape(-1))
    k = int(np.ceil(0.0005 * pooled.size))
    want = (float(pooled[k - 1]), float(pooled[-k]))
    ranges = [(float(m.activation_post_process.min_val), float(m.activation_post_process.max_val)) for m in fqs]
    assert any(r == pytest.approx(want, rel=1e-6) for r in ranges), (want, ranges[:3])
    assert want[1] < pooled[-1], "clips the brightest pixels (the darkest are many, all at pixel value 0)"


def test_percentile_qat_trains_under_the_ranges_it_hands_over(trained, tmp_path):
    """A whole percentile-range run: the ranges handed to the export are those set from the
    calibration images before the first step, never moved by training."""
    from pipeline.quant.fakequant import get_backend, set_percentile_ranges

    folder = make_job(tmp_path / "job", trained, lr=1e-5, ranges="percentile", range_percentile=99.0, steps=10,
                      warmup_steps=2, freeze_observers_step=8)
    np.save(folder / "calibration.npy", trained.calibration[:64])
    replace(Job.load(folder), calibration_pixels=str(folder / "calibration.npy")).save(folder)
    facts = train(folder)
    assert facts["holdout_agreement_after"] >= 0.97
    b = get_backend("torchao")
    x = torch.from_numpy(normalized(trained.calibration[:64], trained.meta))
    student = b.prepare(trained.fused, x[:2])
    set_percentile_ranges(student, [x], 99.0)
    want = b.activation_ranges(student)
    got = torch.load(folder / RESULT, weights_only=True)["activation_ranges"]
    assert set(got) == set(want)
    for layer, sides in want.items():
        for side, r in sides.items():
            assert got[layer][side] == pytest.approx(r, rel=1e-5, abs=1e-7), (layer, side)


def test_qat_model_stays_faithful_in_onnxruntime(trained, tmp_path):
    """Non-regression on the toy (its post-training int8 already agrees 100% with float, so
    there is nothing to recover here; the recovery is shown on the reference below and in
    bench/bench_qat.py): QAT's model, quantized by onnxruntime, agrees with float as PTQ does."""
    folder = make_job(tmp_path / "job", trained, lr=1e-5)
    facts = train(folder)
    assert facts["holdout_agreement_after"] >= 0.97
    reference = trained.fused(torch.from_numpy(normalized(trained.check, trained.meta))).detach().numpy()
    ptq = fidelity(reference, onnx_int8(trained.fused, trained, tmp_path / "ptq.onnx"))
    ranges = torch.load(folder / RESULT, weights_only=True)["activation_ranges"]
    qat = fidelity(reference, onnx_int8(trained_model(trained, folder), trained, tmp_path / "qat.onnx", ranges))
    assert qat["top1_agreement"] >= ptq["top1_agreement"] - 1 / len(reference), (ptq, qat)
    assert qat["sqnr_db"] > 20, qat

    # QAT's ranges reached the artifact: every conv / linear has its input and output range,
    # and the DequantizeLinear feeding each layer carries exactly its input range's scale and
    # zero point (onnxruntime calibrated nothing of its own there).
    layers = {n for n, m in trained.fused.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(ranges) == layers and all(set(r) == {"input", "output"} for r in ranges.values())
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(tmp_path / "qat.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    checked = 0
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            layer = producer[n.input[1]].input[0].removesuffix("_quantized").removesuffix(".weight")
            dq = producer[n.input[0]]
            assert dq.op_type == "DequantizeLinear", layer
            lo, hi = ranges[layer]["input"]
            scale, zp = float(init[dq.input[1]]), int(init[dq.input[2]])
            assert scale == pytest.approx((hi - lo) / 255, rel=1e-5) and zp == round(-lo / scale), layer
            checked += 1
    assert checked == len(layers)


@pytest.mark.slow
def test_qat_recovers_post_training_loss_on_the_reference(shared_data, tmp_path):
    """On the trained reference (RepViT-M0.9, CIFAR-10): QAT (distillation + cross-entropy on
    training images) makes onnxruntime int8 score higher than post-training int8, on 1000
    test images."""
    import tarfile

    from pipeline.io.checkpoints import load_model
    from pipeline.io.data import Preprocess, image_folder, load_pixels
    from pipeline.models import reparameterize

    with tarfile.open(shared_data / "cifar10-jpg.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    model, ckpt = load_model(shared_data / "reference" / "repvit_m0_9_cifar10_64px.pth")
    meta = ckpt.meta
    pre = Preprocess(meta["input_size"], meta["crop_pct"], meta["interpolation"])
    root = next(p for p in tmp_path.rglob("train") if p.is_dir())
    train_set = image_folder(root).split(1024, 0)[0]
    test_set = image_folder(root.parent / "test").split(1000, 0)[0]
    ref = type("Ref", (), {})()
    ref.fused, ref.meta = reparameterize(model.eval()), meta
    ref.calibration, ref.train_labels = load_pixels(train_set, pre), np.asarray(train_set.labels)
    ref.check = load_pixels(test_set, pre)
    folder = make_job(tmp_path / "job", ref, steps=150, freeze_observers_step=100, lr=5e-5)
    train(folder)
    ref.calibration = ref.calibration[:256]
    labels = np.asarray(test_set.labels)
    top1 = lambda y: float((y.argmax(1) == labels).mean())
    ptq = top1(onnx_int8(ref.fused, ref, tmp_path / "ptq.onnx"))
    qat = top1(onnx_int8(trained_model(ref, folder), ref, tmp_path / "qat.onnx"))
    assert qat > ptq, (ptq, qat)


# coremltools' resume in the slow run (10 s): the loop that resumes is the same for both backends.
@pytest.mark.parametrize("backend", ["torchao", pytest.param("coremltools", marks=pytest.mark.slow)])
def test_resumed_run_equals_uninterrupted_run(backend, trained, tmp_path):
    steps = {"steps": 20, "freeze_observers_step": 10, "checkpoint_every": 6}
    whole = make_job(tmp_path / "whole", trained, backend, **steps)
    train(whole)

    # The interrupted run also logs the held-out curve: that must not change its training.
    cut = make_job(tmp_path / "cut", trained, backend, holdout_every=5, **steps)

    def interrupt(step):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=interrupt)
    assert (cut / CHECKPOINT).exists() and not (cut / RESULT).exists()
    facts = train(cut)
    assert facts["resumed_from_step"] == 12
    a = torch.load(whole / RESULT, weights_only=True)
    b = torch.load(cut / RESULT, weights_only=True)
    for k, v in a["weights"].items():
        assert torch.equal(v, b["weights"][k]), k
    assert a["facts"]["history"] == [h for h in b["facts"]["history"] if "loss" in h]
    points = [h for h in b["facts"]["history"] if "holdout_kl" in h]
    assert [h["step"] for h in points] == [5, 10, 15]   # 5, 10 from before the cut; 20 is "after"
    assert all(0 <= h["holdout_agreement"] <= 1 and h["holdout_kl"] > 0 for h in points)
    assert a["facts"]["holdout_kl_after"] == b["facts"]["holdout_kl_after"]
    assert not (cut / CHECKPOINT).exists(), "the checkpoint goes once the result is written"


@pytest.mark.slow   # 19 s: torchrun with two gloo processes (DDP is for GPUs; the slow run keeps it honest)
def test_ddp_with_two_cpu_processes_keeps_weights_in_step(trained, tmp_path):
    folder = make_job(tmp_path / "ddp", trained, steps=6, freeze_observers_step=4, checkpoint_every=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "pipeline.quant.training", str(folder)],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = torch.load(folder / RESULT, weights_only=True)["facts"]
    assert facts["world_size"] == 2
    # Each rank trained on its own half of every batch: only gradient averaging keeps the
    # weights identical, and the run checks that they are (it fails otherwise).
    before = sum(float(p.detach().double().sum()) for p in trained.fused.parameters())
    assert facts["weights_sum"] != before, "the weights did not move"
