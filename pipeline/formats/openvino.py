"""OpenVINO IR (``.xml`` + ``.bin`` in ``<stem>_openvino_model/``, the layout Ultralytics
and OpenVINO's notebooks use): converted from the fused model by ``openvino.convert_model``,
uint8 RGB NHWC pixels in with the normalization inside (``PrePostProcessor``), logits out;
labels and preprocessing in the IR's ``rt_info``. int8 is **nncf**'s post-training
quantization (its OpenVINO backend: symmetric int8 weights per channel, activations per
tensor, bias correction) on the deploy's own calibration images, after the pipeline's
equalization; w8 is nncf's weight compression (int8 weights, float activations)."""
from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.core.hashing import sha256_state
from pipeline.core.quiet import quiet
from pipeline.formats.base import (ExportContext, ExportError, ExportResult, SchemeSupport, check_parity,
                                   model_metadata, torch_logits)
from pipeline.io.data import normalized
from pipeline.runtimes.openvino import RT_INFO, OpenVINORuntime, execution

INPUT, OUTPUT = "pixels", "logits"


@dataclass
class OpenVINOConfig:
    # The inference precision the IR asks the CPU plugin for (in its rt_info; validation
    # compiles with it): f32 computes as exported; bf16 / f16 are the plugin's reduced
    # precisions; default leaves it to the plugin (bf16 on CPUs with AVX512-BF16 or AMX).
    inference_precision: Literal["f32", "bf16", "f16", "default"] = "f32"
    # fp32 parity gate: max |OpenVINO (f32) - PyTorch| relative to max |logit|.
    tolerance: float = 1e-4
    # int8: nncf's bias correction after quantization: none, fast (one pass, nncf's
    # default) or full (layer by layer, slower) (docs/openvino.md: what each measured).
    bias_correction: Literal["none", "fast", "full"] = "none"
    # int8: nncf's preset: performance (symmetric activations) or mixed (asymmetric
    # activations, symmetric weights).
    preset: Literal["performance", "mixed"] = "performance"
    # int8 activation ranges: histogram (the range whose int8 grid has the least squared
    # error over a histogram of every calibration value: torchao's HistogramObserver, in
    # nncf), minmax (the extremes over every calibration image) or mean_minmax (the mean of
    # each image's extremes, nncf's default; it clips).
    activation_ranges: Literal["histogram", "minmax", "mean_minmax"] = "histogram"
    # int8 weights in 7 bits so that CPUs without VNNI (AVX2, AVX-512 before VNNI), whose
    # u8 x s8 multiply-add saturates at 16 bits, compute what the IR says: in every layer
    # (enable), the first only (first_layer, nncf's default) or none (disable). The IR
    # runs on CPUs the pipeline never sees (docs/openvino.md: what each measured).
    overflow_fix: Literal["enable", "first_layer", "disable"] = "enable"


def layer_pattern(layer: str) -> str:
    """The IR nodes of a fused-model layer (``openvino.convert_model`` names them
    ``__module.<layer>/aten::<op>/<Op>``)."""
    return rf"__module\.{re.escape(layer)}/aten::.*"


class OpenVINOExporter(SchemeSupport):
    name, suffix = "openvino", "_openvino_model"

    # The last converted float model, by model digest and size: the accuracy-aware pass
    # exports one model once per attempt.
    _last: tuple[tuple, object] | None = None

    def export(self, model: torch.nn.Module, ctx: ExportContext, cfg: OpenVINOConfig) -> ExportResult:
        import openvino as ov

        no_telemetry()
        ov_model = self.float_ir(model, ctx.meta)
        facts = {"precision": "float32", "inference_precision": cfg.inference_precision,
                 "input": "uint8 RGB NHWC pixels (normalization inside the model)"}
        if ctx.scheme == "fp16":
            facts["precision"] = ("fp16 weights (compressed in the IR; the CPU plugin decompresses them "
                                  f"and computes in its inference precision, {cfg.inference_precision})")
        if ctx.scheme == "w8":
            import nncf

            with quiet():
                ov_model = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_SYM)
            facts["precision"] = (f"int8 weights, symmetric per output channel (nncf {nncf.__version__} "
                                  "compress_weights); decompressed to float where they are used, activations float")
        if ctx.int8:
            import nncf

            ov_model = self._quantize(ov_model, ctx, cfg)
            facts["precision"] = (f"int8 (nncf {nncf.__version__} post-training quantization, preset "
                                  f"{cfg.preset}, {cfg.activation_ranges} activation ranges, weights "
                                  f"{'7' if cfg.overflow_fix == 'enable' else '8'}-bit (overflow fix "
                                  f"{cfg.overflow_fix}), bias correction {cfg.bias_correction}, on "
                                  f"{len(ctx.calibration)} images; {ctx.weights_origin})"
                                  + (f"; {len(ctx.float_layers)} layer(s) kept in float" if ctx.float_layers else ""))
        for k, v in {**model_metadata(ctx, "NHWC uint8, RGB (normalized inside the model)"),
                     "inference_precision": cfg.inference_precision}.items():
            ov_model.set_rt_info(v, [RT_INFO, k])
        out = ctx.out_path
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        xml = out / (out.name.removesuffix(self.suffix) + ".xml")
        ov.save_model(ov_model, str(xml), compress_to_fp16=ctx.scheme == "fp16")
        facts["ops"] = op_counts(ov_model)
        rt = OpenVINORuntime(out, ctx.meta, threads=1, precision="f32")
        if ctx.check_inputs is not None:
            facts["parity"] = check_parity(
                "OpenVINO", torch_logits(model, normalized(ctx.check_inputs, ctx.meta)),
                rt.predict(ctx.check_inputs), f"{rt.name} (measured), vs PyTorch float32",
                cfg.tolerance if ctx.scheme == "fp32" else None)
        if ctx.int8:
            facts["execution"] = execution(rt.program)
        return ExportResult(out, facts)

    @classmethod
    def float_ir(cls, model: torch.nn.Module, meta: dict):
        """``model`` as the float IR that every scheme starts from: uint8 NHWC pixels in."""
        return cls._with_pixels_in(cls._converted(model.eval(), meta["input_size"]), meta)

    @classmethod
    def _converted(cls, model: torch.nn.Module, size: int):
        """``model`` as an OpenVINO model (NCHW float input, dynamic batch): a fresh copy."""
        import openvino as ov

        key = (sha256_state(model), size)
        if cls._last is None or cls._last[0] != key:
            try:
                with quiet(), torch.no_grad():
                    converted = ov.convert_model(model, example_input=torch.zeros(1, 3, size, size),
                                                 input=[(-1, 3, size, size)])
            except Exception as e:   # the frontend raises many types; name the step and its message
                raise ExportError(f"OpenVINO conversion failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
            cls._last = (key, converted)
        return cls._last[1].clone()

    @staticmethod
    def _with_pixels_in(ov_model, meta: dict):
        """uint8 RGB NHWC pixels in, converted and normalized inside; outputs named."""
        import openvino as ov
        from openvino.preprocess import ColorFormat, PrePostProcessor

        ppp = PrePostProcessor(ov_model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")) \
            .set_color_format(ColorFormat.RGB)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32) \
            .mean([255.0 * m for m in meta["mean"]]).scale([255.0 * s for s in meta["std"]])
        ov_model = ppp.build()
        ov_model.inputs[0].get_tensor().set_names({INPUT})
        ov_model.outputs[0].get_tensor().set_names({OUTPUT})
        return ov_model

    @staticmethod
    def _quantize(ov_model, ctx: ExportContext, cfg: OpenVINOConfig):
        import nncf

        if ctx.calibration is None or not len(ctx.calibration):
            raise ExportError("OpenVINO int8 needs calibration images (quantize stage)")
        calibration = ctx.calibration
        ignored = (nncf.IgnoredScope(patterns=[layer_pattern(layer) for layer in ctx.float_layers], validate=True)
                   if ctx.float_layers else None)
        try:
            with quiet():
                return nncf.quantize(
                    ov_model, nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
                    subset_size=len(calibration), ignored_scope=ignored, **quantization_parameters(cfg))
        except Exception as e:
            raise ExportError(f"nncf int8 quantization failed: {type(e).__name__}: {e}") from e


def no_telemetry() -> None:
    """Turn off the usage telemetry that OpenVINO's converter and nncf send to Google
    Analytics (unless the user's consent file says no: openvino_telemetry's ``opt_in_out``),
    for this process: its one sending point, ``GA4Backend.send``, becomes a no-op. A deploy
    should not report on its user, and that method forks a process to send from, which after
    ai-edge-quantizer has loaded JAX can deadlock. Idempotent."""
    try:
        from openvino_telemetry.backend.backend_ga4 import GA4Backend
    except ImportError:   # no telemetry package: nothing is sent
        return
    GA4Backend.send = _not_sent


def _not_sent(self, message) -> None:
    return None


def quantization_parameters(cfg: OpenVINOConfig) -> dict:
    """nncf.quantize's keyword arguments for ``cfg`` (preset, bias correction, advanced)."""
    import nncf
    from nncf.quantization.advanced_parameters import OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as Ranges

    advanced = nncf.AdvancedQuantizationParameters(
        disable_bias_correction=cfg.bias_correction == "none",
        overflow_fix={"enable": OverflowFix.ENABLE, "first_layer": OverflowFix.FIRST_LAYER,
                      "disable": OverflowFix.DISABLE}[cfg.overflow_fix],
        activations_range_estimator_params={"histogram": Ranges.HISTOGRAM, "minmax": Ranges.MINMAX,
                                            "mean_minmax": Ranges.MEAN_MINMAX}[cfg.activation_ranges])
    return {"preset": nncf.QuantizationPreset.PERFORMANCE if cfg.preset == "performance"
            else nncf.QuantizationPreset.MIXED,
            "fast_bias_correction": cfg.bias_correction != "full", "advanced_parameters": advanced}


def op_counts(ov_model) -> dict[str, int]:
    """The IR's operations by type (constants, parameters and results aside)."""
    counts = Counter(op.get_type_name() for op in ov_model.get_ops())
    return {k: v for k, v in counts.items() if k not in ("Constant", "Parameter", "Result")}

