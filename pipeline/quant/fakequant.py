"""Fake quantization for quantization-aware training, one backend per int8 target family.

A backend turns the fused float model into a trainable student whose forward pass rounds
weights and activations as the deployed int8 model will, and reads the fine-tuned float
weights back out under the fused model's own names (the export stage quantizes them with
each format's own tool, exactly as it does after post-training calibration).

- ``coremltools``: coremltools' ``LinearQuantizer`` (the Core ML W8A8 scheme).
- ``torchao``: torchao PT2E QAT with :class:`W8A8Quantizer` below, the scheme onnxruntime
  and LiteRT run: int8 weights per output channel (symmetric), 8-bit activations per
  tensor (asymmetric: uint8 for onnxruntime, int8 with a zero point for LiteRT: the same
  grid shifted by 128).
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from pipeline.core.quiet import quiet
from pipeline.quant.ranges import input_ranges, ranged_per_tensor

BACKEND_OF_FORMAT = {"coreml": "coremltools", "onnx": "torchao", "tflite": "torchao"}


class FakeQuantBackend(Protocol):
    name: str

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        """A trainable fake-quantized copy of ``model`` (the fused float model)."""

    def set_mode(self, student: nn.Module, train: bool) -> None:
        ...

    def activation_ranges(self, student: nn.Module) -> dict[str, dict[str, list[float]]]:
        """The activation ranges the student trained with, per fused layer (conv / linear):
        ``{layer: {"input": [lo, hi], "output": [lo, hi]}}``; empty where the backend's
        ranges are not handed to any converter."""


def freeze_observers(student: nn.Module) -> None:
    """Stop updating the activation ranges (both backends' fake-quant modules, torch.ao's
    and torchao's, have ``disable_observer``): the last steps then fine-tune against fixed
    ranges, as the deployed model will have. The weights' grids are never frozen: each
    export computes them from the final weights (``track_current_weights``)."""
    for m in activation_fake_quants(student):
        m.disable_observer()


def weight_fake_quants(student: nn.Module) -> list[nn.Module]:
    """The student's per-channel (weight) fake-quantizers, both backends'."""
    return [m for m in student.modules() if hasattr(m, "observer_enabled") and getattr(
        getattr(m, "activation_post_process", None), "qscheme", None)
            in (torch.per_channel_symmetric, torch.per_channel_affine)]


def track_current_weights(student: nn.Module) -> None:
    """Make each weight grid the current weights' own: every export quantizes the final
    weights per channel with scale max|w| / 127 (coremltools: / 127.5) of *those* weights,
    while both backends' default weight observer is a moving average (constant 0.01) of
    past extremes, which lags the weights as they train, so the student would learn integers
    that no export deploys. With constant 1 the observer holds the last forward pass's
    weights' extremes. (Both backends' prepare calls this: the one place it is set.)"""
    for m in weight_fake_quants(student):
        m.activation_post_process.averaging_constant = 1.0


def activation_fake_quants(student: nn.Module) -> list[nn.Module]:
    """The student's observed activation fake-quantizers (per tensor; the weights' are per
    channel), torch.ao's and torchao's alike; not those with fixed ranges (coremltools gives
    sigmoid outputs a fixed [0, 1])."""
    return [m for m in student.modules() if hasattr(m, "observer_enabled")
            and ranged_per_tensor(getattr(m, "activation_post_process", None))]


@torch.no_grad()
def set_percentile_ranges(student: nn.Module, batches, percentile: float, of_values: bool = False) -> int:
    """Fix every activation range, measured on the float flow (fake quantization off), as
    the exports calibrate: ``[P(100 - p) of the images' minima, P(p) of their maxima]``
    (the TFLite export's ``percentile``), or with ``of_values`` the range that clips
    ``(100 - p) / 200`` of all values at each end (two-tailed, exact:
    quant.ranges.ValueTails). The student then trains against the ranges the deployed model gets,
    not against moving averages of batch extremes, which widen with the batch size. The
    activation observers stay off (the ranges are frozen); the weights' observers run once
    here so that their grids exist. Returns the number of tensors set."""
    fqs = activation_fake_quants(student)
    every = [m for m in student.modules() if hasattr(m, "observer_enabled") and hasattr(m, "fake_quant_enabled")]
    for m in every:
        m.disable_observer()
        m.disable_fake_quant()
    batches = list(batches)
    with input_ranges(fqs, percentile, of_values, sum(len(x) for x in batches)) as ranges:
        for x in batches:
            student(x)
    for m in fqs:
        lo, hi = ranges[m]
        obs = m.activation_post_process
        obs.reset_min_max_vals()
        obs(torch.tensor([min(0.0, float(lo)), max(0.0, float(hi))], device=obs.min_val.device))
        scale, zero_point = obs.calculate_qparams()
        m.scale.resize_(scale.shape).copy_(scale)
        m.zero_point.resize_(zero_point.shape).copy_(zero_point)
    for m in every:
        m.enable_fake_quant()
        if m not in fqs:
            m.enable_observer()
    student(batches[0])   # the weights' observers measure once
    return len(fqs)


def fake_quant_range(fq: nn.Module) -> list[float]:
    """The real range a per-tensor fake-quantizer's (scale, zero point) represent:
    ``[(qmin - zp) * scale, (qmax - zp) * scale]``."""
    scale, zp = float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0])
    return [(fq.quant_min - zp) * scale, (fq.quant_max - zp) * scale]


def float_state(student: nn.Module, fused: nn.Module) -> dict[str, torch.Tensor]:
    """The student's float weights under the fused model's names; every one must be found.
    (coremltools wraps a conv and its activation as ``<name>.conv``.)"""
    theirs = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    out, missing = {}, []
    for key, value in fused.state_dict().items():
        module, _, leaf = key.rpartition(".")
        found = [c for c in (key, f"{module}.conv.{leaf}", f"{module}.linear.{leaf}")
                 if c in theirs and theirs[c].shape == value.shape]
        if found:
            out[key] = theirs[found[0]]
        else:
            missing.append(key)
    if missing:
        raise RuntimeError(f"fake-quantized student lost {len(missing)} fused weights, e.g. "
                           f"{missing[:3]}: the backend renamed them")
    return out


# ------------------------------------------------------------------------------- torchao PT2E

def _w8a8_specs():
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import (MovingAverageMinMaxObserver,
                                                    MovingAveragePerChannelMinMaxObserver)
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    act = QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, eps=2 ** -12))
    # The weights' grid is the one every converter deploys: scale max|w| / 127 of the current
    # weights (``track_current_weights``), with no floor. XNNPACKQuantizer's eps of 2^-12, and
    # the fused observer kernel's own floor at 6.1e-5, made a fifth of the reference's output
    # channels (max|w| < 0.031) train on grids up to thousands of times coarser than deployed.
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=torch.finfo(torch.float32).eps))
    return act, weight


def w8a8_quantizer():
    """The project's PT2E quantizer (torchao keeps XNNPACKQuantizer private, and
    litert-torch's PT2EQuantizer fails to annotate QAT graphs with torchao 0.18): conv and
    linear get quantized inputs, weights and outputs; residual adds quantized inputs and
    output. Other ops (GELU, sigmoid, the SE multiply) sit between quantized tensors."""
    from torch.fx import Node
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    act, weight = _w8a8_specs()
    aten = torch.ops.aten

    class W8A8Quantizer(Quantizer):
        def annotate(self, gm):
            for n in gm.graph.nodes:
                if n.op != "call_function":
                    continue
                if n.target in (aten.conv2d.default, aten.linear.default):
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={n.args[0]: act, n.args[1]: weight}, output_qspec=act,
                        _annotated=True)
                elif n.target == aten.add.Tensor and all(isinstance(a, Node) for a in n.args[:2]):
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={n.args[0]: act, n.args[1]: act}, output_qspec=act,
                        _annotated=True)
            return gm

        def validate(self, gm):
            pass

    return W8A8Quantizer()


class TorchaoPT2E:
    name = "torchao"

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        # Train mode and a dynamic batch: an eval-mode export trains a useless model, and a
        # static batch fixes the graph to the training batch size.
        with quiet():
            gm = torch.export.export(copy.deepcopy(model).train(), (example,),
                                     dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
            student = prepare_qat_pt2e(gm, w8a8_quantizer())
        track_current_weights(student)
        return student

    def set_mode(self, student: nn.Module, train: bool) -> None:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if train else move_exported_model_to_eval)(student)

    def activation_ranges(self, student: nn.Module) -> dict[str, dict[str, list[float]]]:
        """Each conv / linear's input and output fake-quantizer, as the real range its
        (scale, zero point) represent: [(qmin - zp) * scale, (qmax - zp) * scale]. A layer is
        named by its weight's attribute, the fused model's module path (``features.3.mixer.0``),
        which is also the ONNX exporter's name for that weight (``<layer>.weight``)."""
        aten = torch.ops.aten
        modules = dict(student.named_modules())

        def fake_quant(node):
            if node.op == "call_module" and hasattr(modules[node.target], "zero_point"):
                return modules[node.target]
            return None

        ranges = {}
        for n in student.graph.nodes:
            if n.op != "call_function" or n.target not in (aten.conv2d.default, aten.linear.default):
                continue
            weight = n.args[1]
            while weight.op == "call_module":
                weight = weight.args[0]
            if weight.op != "get_attr":
                continue
            sides = {"input": fake_quant(n.args[0]),
                     "output": next((fq for fq in map(fake_quant, n.users) if fq is not None), None)}
            ranges[weight.target.rpartition(".")[0]] = {k: fake_quant_range(fq) for k, fq in sides.items()
                                                         if fq is not None}
        return ranges


# ------------------------------------------------------------------------------- coremltools

class CoreMLLinearQuantizer:
    name = "coremltools"

    def __init__(self, scheme: str = "symmetric", observer: str = "moving_average_min_max"):
        self.scheme, self.observer = scheme, observer

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        from coremltools.optimize.torch.quantization import (LinearQuantizer, LinearQuantizerConfig,
                                                             ModuleLinearQuantizerConfig)

        # The config Core ML's int8 export calibrates with (formats/coreml.py: its scheme and
        # observer), with fake quantization on from the first step; observers are frozen by
        # the training loop.
        config = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(
            quantization_scheme=self.scheme, weight_per_channel=True, activation_observer=self.observer,
            milestones=[0, 0, 1 << 30, 0]))
        with quiet():
            student = LinearQuantizer(copy.deepcopy(model).train(), config).prepare(
                example_inputs=(example,), inplace=False)
        # The milestones act only through LinearQuantizer.step(); switch both on here instead
        # (prepare leaves observers and fake quantization off).
        for m in student.modules():
            if hasattr(m, "fake_quant_enabled") and hasattr(m, "observer_enabled"):
                m.enable_fake_quant()
                m.enable_observer()
        track_current_weights(student)
        return student.train()

    def set_mode(self, student: nn.Module, train: bool) -> None:
        student.train(train)  # no BatchNorm left in the fused model: modes differ only in observers

    def activation_ranges(self, student: nn.Module) -> dict[str, dict[str, list[float]]]:
        return {}   # Core ML's export re-calibrates with the same observer and scheme


def get_backend(name: str, coreml_scheme: str = "symmetric",
                coreml_observer: str = "moving_average_min_max") -> FakeQuantBackend:
    if name == "torchao":
        return TorchaoPT2E()
    if name == "coremltools":
        return CoreMLLinearQuantizer(coreml_scheme, coreml_observer)
    raise ValueError(f"unknown fake-quantization backend {name!r}: torchao, coremltools")


def model_file(fmt: str) -> str:
    """The QAT model for ``fmt`` in the qat (and quantize) output folders."""
    return f"model.{fmt}.pt"


# qat-int8: the post-training int8 twin of the fused model in the quantize output folder
# (equalized as int8's), which each fine-tuned artifact must beat (pipeline/search/qat_gate.py).
PTQ_TWIN = "ptq_twin.pt"
