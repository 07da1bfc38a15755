"""ExecuTorch programs (``.pte``), PyTorch's own on-device runtime: ``torch.export`` of the
fused model, lowered by ``to_edge_transform_and_lower`` to one delegate.

- ``executorch``: the XNNPACK delegate (Android and iOS CPUs). int8 is PT2E post-training
  quantization with ExecuTorch's ``XNNPACKQuantizer`` (int8 weights symmetric per channel,
  int8 activations per tensor) on the deploy's calibration images after the pipeline's
  equalization, activation ranges chosen as for the TFLite export (``calibration``).
- ``executorch_coreml``: the Core ML delegate (``CoreMLPartitioner``) for apps that run
  ExecuTorch on iOS; int8 is ExecuTorch's ``CoreMLQuantizer`` (coremltools' W8A8 scheme,
  as the ``.mlpackage``). Core ML cannot run on Linux: the delegate's ML program is read back
  from the program and simulated (runtimes/executorch.py).

Input: float32 NCHW, RGB, ``(pixel / 255 - mean) / std`` (as the ONNX model; what
ExecuTorch's Android and iOS image helpers produce), batch 1; output: logits. Labels and
preprocessing travel inside the program as constant methods (``labels``, ``mean``, ...,
each returning a string: ``program.load_method("labels").execute([])``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from pipeline.core.quiet import quiet
from pipeline.formats.base import (ExportContext, ExportError, ExportResult, SchemeSupport, check_parity,
                                   model_metadata, torch_logits)
from pipeline.io.data import normalized
from pipeline.quant.ranges import input_ranges, ranged_per_tensor

INPUT_LAYOUT = "NCHW float32, RGB, (pixel/255 - mean) / std"
CALIBRATION_BATCH = 32


@dataclass
class ExecuTorchConfig:
    # fp32 parity gate: max |ExecuTorch - PyTorch| relative to max |logit|.
    tolerance: float = 1e-4
    # int8 activation ranges: "percentile", the ``percentile`` of the calibration images'
    # own minima and maxima per tensor (as the TFLite export, the other XNNPACK format);
    # "min_max", every tensor's min / max over all the images (docs/executorch.md: what each
    # measured).
    calibration: Literal["percentile", "min_max"] = "percentile"
    percentile: float = 99.0
    # int8: the classifier's Linear in fp32 inside the XNNPACK partition, so that the logits
    # are not rounded to an 8-bit grid (docs/executorch.md: what it measured).
    float_classifier: bool = True

    def validate(self):
        if not 50.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} is outside 50-100 (99 covers the extremes of "
                             "99% of the calibration images; 100 is min_max)")


@dataclass
class ExecuTorchCoreMLConfig:
    # The Core ML delegate's minimum deployment target (int8 activations need iOS17).
    deployment_target: Literal["iOS17", "iOS18"] = "iOS17"
    # None: fp16 (what the Neural Engine runs), fp32 for scheme fp32.
    precision: Optional[Literal["fp16", "fp32"]] = None
    # int8: a number replaces each activation range by that percentile of the calibration
    # images' own minima / maxima; null keeps CoreMLQuantizer's observers' (moving averages of
    # batch extremes, as the .mlpackage's default).
    activation_percentile: Optional[float] = None
    # Simulated fp32 parity gate (the delegate's ML program interpreted vs PyTorch logits).
    tolerance: float = 1e-4
    # How the delegate's W8A8 program is simulated on Linux (as export.coreml.simulation).
    simulation: Literal["int8", "fp16"] = "int8"

    def validate(self):
        if self.activation_percentile is not None and not 50.0 <= self.activation_percentile <= 100.0:
            raise ValueError(f"activation_percentile {self.activation_percentile} is outside 50-100")


class PooledClassifier(nn.Module):
    """The fused RepViT with its global average pool as ``mean(keepdim) + flatten``: the same
    values, but an op XNNPACK delegates in an int8 graph (``mean`` without keepdim is left to
    the portable kernels between two partitions: measured, docs/executorch.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        for f in self.model.features:
            x = f(x)
        return self.model.classifier(x.mean((2, 3), keepdim=True).flatten(1))


def _exported(model: nn.Module, size: int, batch: int = 1):
    example = torch.zeros(batch, 3, size, size)
    dynamic = ({0: torch.export.Dim("batch", max=1024)},) if batch > 1 else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)


def quantized(model: nn.Module, quantizer, calibration: np.ndarray, size: int,
              percentile: Optional[float]) -> nn.Module:
    """PT2E post-training quantization of ``model`` under ``quantizer``, calibrated on
    ``calibration`` (float NCHW, normalized) with fake quantization off (the float flow, as
    every export calibrates). ``percentile``: each activation range becomes that percentile
    of the images' own minima / maxima (quant.ranges.percentile_range), replacing what the
    observers saw."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = means_as_pools(_exported(model.eval(), size, batch=2).module())
    prepared = prepare_pt2e(graph, quantizer)
    fakes = [m for m in prepared.modules() if hasattr(m, "disable_fake_quant")]
    for m in fakes:
        m.disable_fake_quant()
    observers = _observer_inputs(prepared)
    x = torch.from_numpy(np.ascontiguousarray(calibration, np.float32))
    with torch.no_grad(), input_ranges(observers if percentile is not None else [], percentile or 100.0,
                                       False, len(x)) as ranges:
        for i in range(0, len(x), CALIBRATION_BATCH):
            prepared(x[i:i + CALIBRATION_BATCH])
    for called, (lo, hi) in ranges.items():
        obs = getattr(called, "activation_post_process", called)
        obs.min_val.fill_(lo)
        obs.max_val.fill_(hi)
    for m in fakes:
        m.enable_fake_quant()
    return convert_pt2e(prepared)


def means_as_pools(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each spatial mean (``mean((2, 3), keepdim=True)``: the squeeze-excite pools and the
    classifier's) as ``adaptive_avg_pool2d(1)``, in place: the same values, but an op
    XNNPACKQuantizer annotates (int8 in, int8 out on the input's grid), where a mean stays
    float between a dequantize and a quantize of the whole feature map."""
    mean, pool = torch.ops.aten.mean.dim, torch.ops.aten.adaptive_avg_pool2d.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != mean:
            continue
        x, dims, keepdim = (list(node.args) + [False])[:3]
        rank = len(x.meta["val"].shape) if "val" in x.meta else 4
        if rank == 4 and sorted(d % 4 for d in dims) == [2, 3] and (keepdim or node.kwargs.get("keepdim")):
            with gm.graph.inserting_before(node):
                pooled = gm.graph.call_function(pool, (x, [1, 1]))
            pooled.meta = dict(node.meta)
            node.replace_all_uses_with(pooled)
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _observer_inputs(prepared: nn.Module) -> list[nn.Module]:
    """The modules a PT2E-prepared graph calls on each activation whose observer is
    per-tensor and ranged by the data: observer modules (XNNPACKQuantizer) or FakeQuantize
    modules (CoreMLQuantizer; their inner observer is not called by the graph)."""
    inner = {id(f.activation_post_process) for f in prepared.modules() if hasattr(f, "disable_fake_quant")}
    return [m for m in prepared.modules()
            if id(m) not in inner and ranged_per_tensor(getattr(m, "activation_post_process", m))]


def lowered(exported, partitioner, metadata: dict[str, str]) -> bytes:
    """The ExecuTorch program (bytes of a .pte): ``exported`` lowered to ``partitioner``'s
    backend, with ``metadata`` as constant methods."""
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(exported, partitioner=[partitioner], constant_methods=metadata)
    return edge.to_executorch().buffer


class ExecuTorchExporter(SchemeSupport):
    """XNNPACK-delegated program."""
    name, suffix = "executorch", ".pte"

    def export(self, model: nn.Module, ctx: ExportContext, cfg: ExecuTorchConfig) -> ExportResult:
        with quiet():   # torchao and ExecuTorch print while they import
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        from pipeline.runtimes.executorch import ExecuTorchRuntime, version

        size = ctx.meta["input_size"]
        pooled = PooledClassifier(model).eval()
        facts = {"delegate": "XNNPACK", "input": INPUT_LAYOUT + ", batch 1", "precision": "float32"}
        try:
            with quiet():
                program = pooled
                if ctx.int8:
                    kept = tuple(dict.fromkeys(ctx.float_layers + (("classifier",) if cfg.float_classifier else ())))
                    program = quantized(pooled, xnnpack_quantizer(kept), _calibration(ctx), size,
                                        cfg.percentile if cfg.calibration == "percentile" else None)
                    ranges = (f"percentile {cfg.percentile:g} of each image's min / max"
                              if cfg.calibration == "percentile" else "min / max over all images")
                    facts["precision"] = (f"int8: weights symmetric per channel, activations per tensor "
                                          f"(ExecuTorch {version()} XNNPACKQuantizer, PT2E), "
                                          f"ranges {ranges} over {len(ctx.calibration)} calibration images; "
                                          f"{ctx.weights_origin}"
                                          + ("; the classifier in fp32 (float logits)" if cfg.float_classifier else "")
                                          + (f"; {len(ctx.float_layers)} layer(s) kept in float"
                                             if ctx.float_layers else ""))
                data = lowered(_exported(program, size), XnnpackPartitioner(),
                               model_metadata(ctx, INPUT_LAYOUT))
        except ExportError:
            raise
        except Exception as e:   # the exporter and the lowering raise many types
            raise ExportError(f"ExecuTorch (XNNPACK) export failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        ctx.out_path.write_bytes(data)
        rt = ExecuTorchRuntime(ctx.out_path, ctx.meta)
        if ctx.check_inputs is not None:
            facts["parity"] = check_parity(
                "ExecuTorch", torch_logits(model, normalized(ctx.check_inputs, ctx.meta)),
                rt.predict(ctx.check_inputs), f"{rt.name} (measured), vs PyTorch float32",
                cfg.tolerance if ctx.scheme == "fp32" else None)
        facts["execution"] = rt.execution
        return ExportResult(ctx.out_path, facts)


class ExecuTorchCoreMLExporter(SchemeSupport):
    """Core ML-delegated program."""
    name, suffix = "executorch_coreml", ".coreml.pte"

    def export(self, model: nn.Module, ctx: ExportContext, cfg: ExecuTorchCoreMLConfig) -> ExportResult:
        with quiet():
            import coremltools as ct
            from executorch.backends.apple.coreml.compiler import CoreMLBackend
            from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        from pipeline.runtimes.executorch import ExecuTorchCoreMLRuntime, execution, version

        size = ctx.meta["input_size"]
        precision = cfg.precision or ("fp32" if ctx.scheme == "fp32" else "fp16")
        facts = {"delegate": "Core ML", "input": INPUT_LAYOUT + ", batch 1", "compute_precision": precision,
                 "deployment_target": cfg.deployment_target}
        try:
            with quiet():
                program = model.eval()
                if ctx.int8:
                    program = quantized(program, coreml_quantizer(ctx.float_layers), _calibration(ctx), size,
                                        cfg.activation_percentile)
                    ranges = (f"percentile {cfg.activation_percentile:g} of each image's min / max"
                              if cfg.activation_percentile is not None
                              else f"moving averages of batch min / max (batches of {CALIBRATION_BATCH})")
                    facts["compression"] = (
                        f"W8A8: weights int8 per channel, activations 8-bit per tensor (symmetric), {ranges} "
                        f"over {len(ctx.calibration)} calibration images (ExecuTorch {version()} "
                        f"CoreMLQuantizer, PT2E; {ctx.weights_origin})")
                specs = CoreMLBackend.generate_compile_specs(
                    minimum_deployment_target=getattr(ct.target, cfg.deployment_target),
                    compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
                data = lowered(_exported(program, size), CoreMLPartitioner(compile_specs=specs),
                               model_metadata(ctx, INPUT_LAYOUT))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"ExecuTorch (Core ML) export failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        ctx.out_path.write_bytes(data)
        rt = ExecuTorchCoreMLRuntime(ctx.out_path, ctx.meta, simulation=cfg.simulation)
        if ctx.check_inputs is not None:
            facts["parity"] = check_parity(
                "ExecuTorch Core ML", torch_logits(model, normalized(ctx.check_inputs, ctx.meta)),
                rt.predict(ctx.check_inputs), f"{rt.name} ({rt.method}), vs PyTorch float32",
                cfg.tolerance if ctx.scheme == "fp32" and precision == "fp32" else None)
        facts["execution"] = execution(ctx.out_path)
        facts["simulation"] = cfg.simulation
        return ExportResult(ctx.out_path, facts)


def _calibration(ctx: ExportContext) -> np.ndarray:
    if ctx.calibration is None or not len(ctx.calibration):
        raise ExportError("ExecuTorch int8 needs calibration images (quantize stage)")
    return normalized(ctx.calibration, ctx.meta)


def xnnpack_quantizer(float_layers: tuple[str, ...] = ()):
    """ExecuTorch's XNNPACKQuantizer, static int8 (symmetric per-channel weights), with
    min / max observers for the activations (the ranges are then the pipeline's statistic;
    its default HistogramObserver took 2.7 s per 224 px image here); ``float_layers`` stay float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e import MinMaxObserver

    base = get_symmetric_quantization_config(is_per_channel=True)
    act = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    quantizer = XNNPACKQuantizer().set_global(dataclasses.replace(base, input_activation=act, output_activation=act))
    return _without(quantizer, [f"model.{layer}" for layer in float_layers]) if float_layers else quantizer


def _without(quantizer, modules: list[str]):
    """``quantizer`` whose annotations of the ops of ``modules`` are removed (XNNPACKQuantizer
    takes no "leave this module float" setting): those ops stay float, XNNPACK runs them in fp32."""
    from torchao.quantization.pt2e.quantizer import Quantizer
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    filters = [get_module_name_filter(m) for m in modules]

    class Skipping(Quantizer):
        def annotate(self, gm):
            quantizer.annotate(gm)
            for node in gm.graph.nodes:
                if any(f(node) for f in filters):
                    node.meta.pop("quantization_annotation", None)
            return gm

        def validate(self, gm):
            quantizer.validate(gm)

        def transform_for_annotation(self, gm):
            return quantizer.transform_for_annotation(gm)

    return Skipping()


def coreml_quantizer(float_layers: tuple[str, ...] = ()):
    """ExecuTorch's CoreMLQuantizer with coremltools' W8A8 configuration (symmetric,
    int8 weights per channel, uint8 activations), ``float_layers`` left float."""
    from coremltools.optimize.torch.quantization.quantization_config import LinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    config = LinearQuantizerConfig.from_dict({
        "global_config": {"quantization_scheme": "symmetric", "activation_dtype": torch.quint8,
                          "weight_dtype": torch.qint8, "weight_per_channel": True},
        "module_name_configs": {layer: None for layer in float_layers}})
    return CoreMLQuantizer(config)
