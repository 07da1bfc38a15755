"""TFLite (LiteRT): an image classifier an Android app (MediaPipe Tasks, Android Studio's
model binding) uses unchanged. litert-torch converts a model that takes raw RGB pixels,
channels last (NHWC), and ends in a softmax: the 1/255, the mean and the 1/std are inside
it, exactly as in the Core ML export (the mean is removed before the stem's zero padding,
1/std is folded into the stem convolution). Full-integer int8 takes **uint8** pixels, so
an app feeds bitmap bytes with no float conversion; fp32 / fp16 take float pixel values
0..255. TFLite Model Metadata (``tflite_metadata.py``) names the input an RGB image with its
normalization and carries the labels. fp16 weights through ai-edge-quantizer's
float-casting recipe."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.core.quiet import quiet
from pipeline.eval.metrics import softmax
from pipeline.formats.base import (ExportContext, ExportError, ExportResult, SchemeSupport, check_parity,
                                   model_metadata, torch_logits, weights_license)
from pipeline.formats.tflite_metadata import ClassifierMetadata, embed
from pipeline.io.data import normalized
from pipeline.quant.ranges import ValueTails, percentile_range
from pipeline.runtimes.litert import interpreter, run_tflite

LABELS_FILE = "labels.txt"


class TFLiteClassifier(nn.Module):
    """The fused model behind its input normalization and a softmax. Input: raw RGB pixel
    values 0..255 (NCHW here; NHWC after ``to_channel_last_io``); with ``scaled_input``,
    pixel / 255 (the int8 model: the 1/255 becomes the scale of its uint8 input, one op less)."""

    def __init__(self, fused: nn.Module, mean: list[float], std: list[float], scaled_input: bool = False):
        super().__init__()
        from pipeline.models.wrap import StdFoldedClassifier

        self.model = StdFoldedClassifier(fused, std).model   # 1/std folded into the stem
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.scaled_input = scaled_input

    def forward(self, x):
        if not self.scaled_input:
            x = x * (1.0 / 255.0)
        return torch.softmax(self.model(x - self.mean), dim=1)


def classifier_probabilities(fused: nn.Module, pixels: np.ndarray, meta: dict) -> np.ndarray:
    """What the .tflite computes, in PyTorch float32, for uint8 NHWC ``pixels``."""
    return softmax(torch_logits(fused, normalized(pixels, meta)))


@dataclass
class TFLiteConfig:
    tolerance: float = 1e-4     # fp32 parity gate, relative to max |probability|
    # int8: "float" keeps GELU in float32 inside the int8 graph (DEQUANTIZE -> GELU ->
    # QUANTIZE, which XNNPACK runs: one delegate partition); "int8" quantizes it (XNNPACK
    # has no int8 GELU kernel: TFLite's built-in kernel between two partitions). The GELU
    # output is quantized with the same calibrated range either way.
    gelu: Literal["float", "int8"] = "float"
    # int8 activation ranges: "percentile", the ``percentile`` of the calibration images'
    # own minima and maxima per tensor (the range that covers that share of the images);
    # "min_max", every tensor's min/max over all the images; "moving_average",
    # ai-edge-quantizer's own statistics (each image's min/max folded in with factor 0.95);
    # "value_percentile", the range that clips ``value_percentile``'s share of all the values
    # each tensor takes (two-tailed, exact: quant.ranges.ValueTails).
    calibration: Literal["percentile", "min_max", "moving_average", "value_percentile"] = "percentile"
    percentile: float = 99.0
    value_percentile: float = 99.999

    def validate(self):
        if not 50.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} is outside 50-100 (99 covers the "
                             "extremes of 99% of the calibration images; 100 is min_max)")
        if not 90.0 <= self.value_percentile <= 100.0:
            raise ValueError(f"value_percentile {self.value_percentile} is outside 90-100 (99.999 "
                             "keeps all but the most extreme 0.001% of each activation's values)")


def execution(path: Path) -> dict:
    """How LiteRT runs the model, read from the interpreter after it applied its default
    XNNPACK delegate: the number of delegate partitions and the ops left to TFLite's
    built-in kernels. An op ran outside when its outputs are allocated by the interpreter
    but are not a partition's outputs (tensors inside a partition get no buffer)."""
    import importlib.metadata

    it = interpreter(path)
    ops = it._get_ops_details()
    partitions = [o for o in ops if o["op_name"] == "DELEGATE"]
    partition_outputs = {int(t) for o in partitions for t in o["outputs"]}

    def allocated(t: int) -> bool:
        try:
            it.get_tensor(t)
            return True
        except ValueError:  # "Tensor data is null": a partition's internal tensor
            return False

    outside: dict[str, int] = {}
    for o in ops:
        outs = [int(t) for t in o["outputs"] if t >= 0]
        if (o["op_name"] != "DELEGATE" and outs and all(allocated(t) for t in outs)
                and not set(outs) <= partition_outputs):
            outside[o["op_name"]] = outside.get(o["op_name"], 0) + 1
    return {"runtime": f"LiteRT {importlib.metadata.version('ai-edge-litert')} (XNNPACK delegate)",
            "xnnpack_partitions": len(partitions), "ops_outside_xnnpack": outside,
            "fast_path": len(partitions) == 1 and not outside,
            "how": "read from the LiteRT interpreter after delegation"}


def op_counts(path: Path) -> dict[str, int]:
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    names = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    counts: dict[str, int] = {}
    for sg in m.subgraphs:
        for op in sg.operators:
            code = m.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))
            counts[name] = counts.get(name, 0) + 1
    return counts


def layer_scope(model: torch.nn.Module, layer: str) -> list[str]:
    """The module path of ``layer`` as litert-torch writes it into tensor names: one
    ``<module.Class>_<attribute>`` per level (it leaves the ``features`` ModuleList out;
    the caller tries the variants)."""
    out, module = [], model
    for attr in layer.split("."):
        module = getattr(module, attr)
        out.append(f"{type(module).__module__}.{type(module).__name__}_{attr}")
    return out


def _ops(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(op name, input tensor names, output tensor names) of the main subgraph."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    names = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    sg = m.subgraphs[0]
    tname = lambda i: sg.tensors[i].name.decode() if i >= 0 else ""
    out = []
    for op in sg.operators:
        code = m.operatorCodes[op.opcodeIndex]
        out.append((names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?"),
                    [tname(i) for i in op.inputs], [tname(i) for i in op.outputs]))
    return out


def float_layer_patterns(model: torch.nn.Module, layers: tuple[str, ...], float_path: Path) -> list[str]:
    """One ai-edge-quantizer scope regex per layer kept in float. The conv / fully-connected
    op is found by the module path in its tensors' names (its weights keep it even where
    its output is renamed, as the model's output is); the regex is that op's exact scope."""
    ops = [o for o in _ops(float_path) if o[0] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    patterns = []
    for layer in layers:
        parts = layer_scope(model, layer)
        matches = []
        # litert-torch leaves a ModuleList level (RepViT's ``features``) out of the path.
        no_list = [p for p in parts if ".ModuleList_" not in p]
        for candidate in ("/".join(parts), "/".join(parts[1:]), "/".join(no_list)):
            named = lambda names: any(re.search(re.escape("/" + candidate) + "(;|$)", n) for n in names)
            # By its output; else by its weights (inputs after the activation).
            matches = ([o for o in ops if candidate and named(o[2])] or
                       [o for o in ops if candidate and named(o[1][1:])])
            if matches:
                break
        if len(matches) != 1:
            raise ExportError(f"found {len(matches)} TFLite ops for layer {layer!r} (litert-torch "
                              "changed its tensor naming?): cannot keep it in float")
        # ai-edge-quantizer's scope: the output names joined by ";", plus a trailing ";".
        patterns.append("^" + re.escape(";".join(matches[0][2]) + ";") + "$")
    return patterns


class TFLiteExporter(SchemeSupport):
    name, suffix = "tflite", ".tflite"

    def export(self, model: torch.nn.Module, ctx: ExportContext, cfg: TFLiteConfig) -> ExportResult:
        with quiet():
            import litert_torch

        size = ctx.meta["input_size"]
        path = ctx.out_path
        wrapped = TFLiteClassifier(model, ctx.meta["mean"], ctx.meta["std"], scaled_input=ctx.int8).eval()
        nhwc = litert_torch.to_channel_last_io(wrapped, args=[0]).eval()
        try:
            with quiet():
                edge = litert_torch.convert(nhwc, (torch.zeros(1, size, size, 3),))
                float_path = path.with_name(path.stem + ".float.tflite")
                edge.export(str(float_path))
        except Exception as e:
            raise ExportError(f"TFLite conversion failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        if ctx.scheme == "fp16":
            self._fp16(float_path, path)
        elif ctx.int8:
            keep = float_layer_patterns(wrapped, tuple(f"model.{l}" for l in ctx.float_layers), float_path)
            self._int8(float_path, path, ctx.calibration.astype(np.float32) / 255.0, keep,
                       float_gelu=cfg.gelu == "float", calibration=cfg.calibration,
                       percentile=cfg.value_percentile if cfg.calibration == "value_percentile" else cfg.percentile)
        elif ctx.scheme == "w8":
            self._dynamic_range(float_path, path)
        else:
            os.replace(float_path, path)
        float_path.unlink(missing_ok=True)
        layout = "NHWC float32 RGB pixel values 0..255 (normalization inside the model)"
        weights = {"fp16": "float16", "int8": "int8 per channel",
                   "qat-int8": "int8 per channel, fine-tuned by quantization-aware training",
                   "w8": "int8 per channel, dynamic-range (activations quantized at run time)"
                   }.get(ctx.scheme, "float32")
        if ctx.int8:
            layout = "NHWC uint8 RGB pixels, the bitmap's bytes (normalization inside the model)"
        m = ctx.meta
        embed(path, ClassifierMetadata(
            name=f"RepViT-{ctx.variant.upper()} {ctx.scheme}",
            description=(f"RepViT-{ctx.variant.upper()} image classifier ({len(m['classes'])} classes), "
                         f"{ctx.scheme}. Input: RGB {m['input_size']}x{m['input_size']}, resized "
                         f"(shorter side {int(m['input_size'] / m['crop_pct'])}, {m['interpolation']}) "
                         "and centre-cropped. Output: class probabilities."),
            version="1.0", author="repvit-pipeline",
            license=weights_license(ctx),
            labels_file=LABELS_FILE, input_size=m["input_size"],
            # Float input: MediaPipe requires NormalizationOptions; the model normalizes
            # itself, so the options pass pixel values through unchanged.
            input_mean=None if ctx.int8 else [0.0], input_std=None if ctx.int8 else [1.0],
            input_range=(0.0, 255.0), input_description=layout,
            output_description="Probability of each class (softmax)"), list(m["classes"]), uint8=ctx.int8)
        if ctx.int8:
            ranges = {"percentile": f"percentile {cfg.percentile:g} of each image's min / max",
                      "value_percentile": f"percentile {cfg.value_percentile:g} of all values",
                      "min_max": "min / max over all images",
                      "moving_average": "moving average of each image's min / max"}[cfg.calibration]
            weights += (f"; activation ranges: {ranges}, {len(ctx.calibration)} calibration images "
                        "(ai-edge-quantizer)")
        if ctx.int8 and cfg.gelu == "float":
            weights += "; GELU computed in float32 inside the int8 graph (XNNPACK has no int8 GELU)"
        facts = {"input_layout": layout, "weights": weights, "ops": op_counts(path), "execution": execution(path),
                 "outputs": "probabilities",
                 "metadata": {**model_metadata(ctx, layout),
                              "labels": f"{LABELS_FILE} inside the model (TFLite Model Metadata associated file) "
                                        "and beside it",
                              "tflite_metadata": "image classifier: RGB image input, labelled probabilities"}}
        if ctx.check_inputs is not None:
            facts["parity"] = check_parity(
                "TFLite", classifier_probabilities(model, ctx.check_inputs, ctx.meta),
                run_tflite(path, ctx.check_inputs), "LiteRT interpreter CPU (measured), vs PyTorch float32 "
                "probabilities", cfg.tolerance if ctx.scheme == "fp32" else None)
        return ExportResult(path, facts)

    @staticmethod
    def _int8(src: Path, dst: Path, calibration_nhwc: np.ndarray, keep_float: list[str],
              float_gelu: bool = True, calibration: str = "percentile", percentile: float = 99.0) -> None:
        """Static full-integer int8 (ai-edge-quantizer): int8 weights per channel, int8
        activations calibrated as ``TFLiteConfig.calibration`` says; ops whose scope matches
        a ``keep_float`` pattern stay float (the accuracy-aware pass); with ``float_gelu``,
        every GELU too (see ``TFLiteConfig.gelu``)."""
        try:
            with quiet():
                _int8_calibrate_and_quantize(src, dst, np.ascontiguousarray(calibration_nhwc, np.float32),
                                             keep_float, float_gelu, calibration, percentile)
        except Exception as e:
            raise ExportError(f"TFLite int8 quantization failed: {type(e).__name__}: {e}") from e
        if keep_float:
            details = interpreter(dst).get_tensor_details()
            for pattern in keep_float:
                # The op's own output stays float (a quantize op after it may reuse the name).
                kept = [d for d in details if re.search(pattern, d["name"] + ";")]   # one output: scope
                if not any(d["dtype"] == np.float32 for d in kept):
                    raise ExportError(f"TFLite: the layer matching {pattern!r} was not kept in float")

    @staticmethod
    def _dynamic_range(src: Path, dst: Path) -> None:
        """TFLite's dynamic-range scheme: int8 weights, float activations quantized on the fly."""
        from ai_edge_quantizer import quantizer, recipe

        with quiet():
            quantizer.Quantizer(str(src), recipe.dynamic_wi8_afp32()).quantize().export_model(str(dst))

    @staticmethod
    def _fp16(src: Path, dst: Path) -> None:
        from ai_edge_quantizer import quantizer

        with quiet():
            q = quantizer.Quantizer(str(src), _float16_recipe())
            result = q.quantize()
            result.export_model(str(dst))


# ai-edge-quantizer recipe entries for the ends of an integer model. The softmax stays float:
# the output is float32 probabilities, as apps read them. So does the input normalization
# (the wrapper's own ops: x/255, - mean), which then needs one quantization, of the
# normalized image, as before the input took raw pixels; in int8 it would be two
# requantizations and two more int8 passes over the image.
FLOAT_ENDS = [{"regex": ".*", "operation": "SOFTMAX", "algorithm_key": "no_quantize"},
              {"regex": r"TFLiteClassifier_wrapped;\d+;$", "operation": "*", "algorithm_key": "no_quantize"}]


def _int8_calibrate_and_quantize(src: Path, dst: Path, calibration_nhwc: np.ndarray,
                                 keep_float: list[str] = (), float_gelu: bool = True,
                                 calibration: str = "percentile", percentile: float = 99.0) -> None:
    from ai_edge_quantizer import quantizer, recipe

    it = interpreter(src)
    (signature, spec), = it.get_signature_list().items()
    name = spec["inputs"][0]
    # Later entries win where scopes overlap.
    steps = (recipe.static_wi8_ai8() + FLOAT_ENDS
             + [{"regex": ".*", "operation": "GELU", "algorithm_key": "no_quantize"}] * float_gelu
             + [{"regex": p, "operation": "*", "algorithm_key": "no_quantize"} for p in keep_float])
    q = quantizer.Quantizer(str(src), steps)
    images = [{name: calibration_nhwc[i:i + 1]} for i in range(len(calibration_nhwc))]
    if calibration == "moving_average":
        ranges = q.calibrate({signature: images}, num_threads=os.cpu_count() or 1)
    else:
        ranges = _calibrated_ranges(src, signature, images, q._recipe_manager, calibration, percentile)
    result = q.quantize(ranges)
    result.export_model(str(dst), overwrite=True)


def _calibrated_ranges(src: Path, signature: str, images: list[dict], recipe_manager, calibration: str,
                       percentile: float) -> dict:
    """Every calibrated tensor's range over ``images``: the union of the images' extremes
    (min_max), their percentile (percentile), or the range that clips a share of all values
    (value_percentile). ai-edge-quantizer's Calibrator, run on the first image, names the
    tensors its recipe calibrates and the shape of their statistics; one pass of the float
    model over every image (the Calibrator's own interpreter utilities, all tensors kept)
    then gives each tensor's min and max per image, which is what the Calibrator computes
    for an activation (``get_activation_min_max``), without its per-op bookkeeping on every
    image (most of the int8 export's time: 17 of 38 s for m0.9 at 224 px, 256 images,
    profiled). Its recipe manager is private API; ai-edge-quantizer is pinned in setup.cfg
    and tests/formats/test_quantization.py checks these ranges against the Calibrator's own."""
    from ai_edge_quantizer import calibrator
    from ai_edge_quantizer.utils import tfl_interpreter_utils as tiu

    threads = os.cpu_count() or 1
    first = calibrator.Calibrator(src.read_bytes(), num_threads=threads)
    first.calibrate({signature: images[:1]}, recipe_manager)
    structure = first.get_model_qsvs()
    it = tiu.create_tfl_interpreter(str(src), num_threads=threads)
    subgraph = tiu.get_signature_main_subgraph_index(it, signature)
    mins, maxs = {k: [] for k in structure}, {k: [] for k in structure}
    tails = ValueTails(percentile, len(images)) if calibration == "value_percentile" else None
    for image in images:
        tiu.invoke_interpreter_signature(it, image, signature)
        content = tiu.get_tensor_name_to_content_map(it, subgraph)
        for name in structure:
            value = np.asarray(content[name])
            mins[name].append(value.min())
            maxs[name].append(value.max())
            if tails is not None:
                tails.add(name, value)
    ranges = {}
    for name, qsv in structure.items():
        shape, dtype = np.shape(qsv["min"]), np.asarray(qsv["min"]).dtype
        if calibration == "min_max":
            lo, hi = min(mins[name]), max(maxs[name])
        elif calibration == "percentile":
            lo, hi = percentile_range(np.asarray(mins[name]), np.asarray(maxs[name]), percentile)
        else:
            lo, hi = tails.range(name)
        ranges[name] = {**qsv, "min": np.full(shape, lo, dtype), "max": np.full(shape, hi, dtype)}
    return ranges


def _float16_recipe() -> list:
    """ai-edge-quantizer's float-casting recipe: weights stored as float16, compute float32."""
    return [{
        "regex": ".*",
        "operation": "*",
        "algorithm_key": "float_casting",
        "op_config": {
            "weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
            "compute_precision": "FLOAT",
            "explicit_dequantize": True,
        },
    }]
