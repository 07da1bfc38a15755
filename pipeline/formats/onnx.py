"""ONNX: dynamo exporter at opset 20 (native Gelu, which onnxruntime fuses; at 18 the
exporter writes an Erf decomposition that ran 12-15% slower here), one file, dynamic
batch; onnxsim kept only where it verifiably shrinks the graph."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ..quiet import quiet
from . import (ExportContext, ExportError, ExportResult, SchemeSupport, check_parity, model_metadata,
               normalized, torch_logits)

INPUT, OUTPUT = "input", "logits"


@dataclass
class OnnxConfig:
    opset: int = 20
    simplify: Literal["auto", "never"] = "auto"
    # fp32 parity gate: max |onnxruntime - PyTorch| relative to max |logit|.
    tolerance: float = 1e-4
    # int8: onnxruntime fuses Conv into its int8 kernel only with uint8 activations
    # (int8 activations ran 1.3x slower than fp32 here; uint8 at 0.47-0.49x).
    activations: Literal["uint8", "int8"] = "uint8"
    # Activation ranges (bench/bench_calibration.py, trained reference, 10,000 test images):
    # percentile 99.999 lost 0.10 ± 0.14 top-1 points (97.2% agreement with float), min/max
    # 0.51 ± 0.16 (96.2%), percentile 99.99 0.33 ± 0.13 (97.5%).
    calibration: Literal["minmax", "percentile"] = "percentile"
    percentile: float = 99.999

    def validate(self):
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} is outside 90-100 (99.999 keeps all but "
                             "the most extreme 0.001% of each activation's values)")
        if self.opset < 18:
            raise ValueError("opset must be >= 18: the dynamo exporter cannot write older "
                             "opsets (it silently writes 18), and Gelu is native from 20")


def op_counts(model) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads made 2 threads 3-4x slower than 1 on shared 2-core machines.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    return np.concatenate([sess.run(None, {INPUT: x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def quantize_int8(path: Path, calibration: np.ndarray, cfg: OnnxConfig,
                  float_layers: tuple[str, ...] = ()) -> None:
    """Static QDQ quantization in place: per-channel symmetric int8 weights, per-tensor
    activations calibrated on ``calibration`` (float NCHW, normalized)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration[i:i + 1] for i in range(len(calibration)))

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {INPUT: x}

    pre = path.with_name(path.stem + ".pre.onnx")
    try:
        with quiet():
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            import onnx

            # The dynamo exporter names each weight after its module: "<layer>.weight".
            keep = {f"{layer}.weight" for layer in float_layers}
            exclude = [n.name for n in onnx.load(str(pre)).graph.node
                       if n.op_type in ("Conv", "Gemm") and keep & set(n.input)]
            if len(exclude) != len(keep):
                raise ExportError(f"could not find {len(keep) - len(exclude)} of the layers to keep "
                                  "in float in the ONNX graph")
            quantize_static(
                str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8 if cfg.activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=(CalibrationMethod.MinMax if cfg.calibration == "minmax"
                                  else CalibrationMethod.Percentile),
                nodes_to_exclude=exclude,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": cfg.activations == "int8",
                               "CalibPercentile": cfg.percentile})
    except Exception as e:
        raise ExportError(f"ONNX int8 quantization failed: {type(e).__name__}: {e}") from e
    finally:
        pre.unlink(missing_ok=True)


class OnnxExporter(SchemeSupport):
    name, suffix = "onnx", ".onnx"
    schemes = ("fp32", "fp16", "int8", "qat-int8")
    cannot = {"pal": "ONNX has no palettized (look-up-table) weight type",
              "w8": "onnxruntime has no weight-only int8 Conv kernel (its dynamic quantization "
                    "also quantizes activations: a different scheme)"}

    def export(self, model: torch.nn.Module, ctx: ExportContext, cfg: OnnxConfig) -> ExportResult:
        import onnx

        size = ctx.meta["input_size"]
        path = ctx.out_path
        try:
            with quiet():
                torch.onnx.export(
                    model.eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=True,
                    opset_version=cfg.opset, external_data=False, input_names=[INPUT],
                    output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False)
        except Exception as e:  # the exporter raises many types; name the step and its message
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        facts = {"opset": cfg.opset, "simplified": False, "precision": "float32"}
        if cfg.simplify == "auto":  # on the float graph: onnxsim would fold QDQ pairs
            facts.update(self._simplify(proto, path))
        if ctx.scheme == "fp16":
            facts["precision"] = ("float32: onnxruntime's CPU provider has no float16 kernels that "
                                  "would make an fp16 graph faster, so the ONNX model stays fp32")
        if ctx.int8:
            quantize_int8(path, normalized(ctx.calibration, ctx.meta), cfg, ctx.float_layers)
            facts["precision"] = (f"int8 QDQ: weights int8 per channel (symmetric), activations "
                                  f"{cfg.activations} per tensor, "
                                  f"{'percentile ' + format(cfg.percentile, 'g') if cfg.calibration == 'percentile' else 'min/max'}"
                                  " calibration on "
                                  f"{len(ctx.calibration)} images (onnxruntime.quantization; "
                                  f"{ctx.weights_origin})")
        proto = onnx.load(str(path))
        for k, v in model_metadata(ctx, "NCHW float32, RGB, (pixel/255 - mean) / std").items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, str(path))
        if ctx.check_inputs is not None:
            x = normalized(ctx.check_inputs, ctx.meta)
            facts["parity"] = check_parity(
                "ONNX", torch_logits(model, x), run_onnx(path, x),
                "onnxruntime CPU (measured), vs PyTorch float32",
                cfg.tolerance if ctx.scheme == "fp32" else None)
        facts["ops"] = op_counts(proto)
        return ExportResult(path, facts)

    @staticmethod
    def _simplify(proto, path: Path) -> dict:
        """Run onnxsim; keep its graph only if it has fewer nodes and checks clean."""
        import onnx
        import onnxsim

        before = len(proto.graph.node)
        try:
            simplified, ok = onnxsim.simplify(proto)
        except Exception as e:  # onnxsim failing is not fatal: the unsimplified graph is valid
            return {"onnxsim": f"failed ({type(e).__name__}); kept the exporter's graph"}
        after = len(simplified.graph.node)
        if ok and after < before:
            onnx.save(simplified, str(path))
            return {"simplified": True, "onnxsim": f"kept: {before} -> {after} nodes"}
        return {"onnxsim": f"not kept: {before} -> {after} nodes (no gain)"}
