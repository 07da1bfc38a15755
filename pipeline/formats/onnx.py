"""ONNX: dynamo exporter at opset 20 (native Gelu, which onnxruntime fuses; at 18 the
exporter writes an Erf decomposition that ran 12-15% slower here), one file, dynamic
batch; onnxsim kept only where it verifiably shrinks the graph."""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from pipeline.core.hashing import sha256_state
from pipeline.core.quiet import quiet
from pipeline.formats.base import (ExportContext, ExportError, ExportResult, SchemeSupport, check_parity,
                                   model_metadata, torch_logits)
from pipeline.formats.onnx_calibration import percentile_calibration_cache
from pipeline.io.data import normalized
from pipeline.runtimes.ort import INPUT, run_onnx

OUTPUT = "logits"


@dataclass
class OnnxConfig:
    opset: int = 20
    simplify: Literal["auto", "never"] = "auto"
    # fp32 parity gate: max |onnxruntime - PyTorch| relative to max |logit|.
    tolerance: float = 1e-4
    # int8: the activations' integer type (onnxruntime fuses Conv into its integer kernel
    # only with uint8: docs/recipe-keys.md).
    activations: Literal["uint8", "int8"] = "uint8"
    # int8 activation ranges: onnxruntime's calibrator, and the share of values
    # ``percentile`` keeps (docs/recipe-keys.md: what each measured).
    calibration: Literal["minmax", "percentile", "entropy"] = "percentile"
    percentile: float = 99.999
    # Calibration images whose intermediate outputs onnxruntime holds at once before turning
    # them into histograms (0: all); peak memory grows with it.
    calibration_stride: int = 16
    # qat-int8: QAT's activation ranges replace onnxruntime's calibrated ones for every
    # conv / linear input and output (TensorQuantOverrides); other tensors calibrate.
    qat_ranges: bool = False
    # int8: GELU as written (exact: onnxruntime runs it in float between DequantizeLinear and
    # QuantizeLinear) or as x * sigmoid(1.702 x) (sigmoid: QLinearSigmoid and QLinearMul,
    # integer kernels; an approximation of GELU). docs/int8-speed.md: what each measured.
    gelu: Literal["exact", "sigmoid"] = "exact"
    # int8: weights in 7 bits (onnxruntime's reduce_range) so that CPUs without VNNI (AVX2,
    # AVX-512 before VNNI), whose u8 x s8 multiply-add (VPMADDUBSW) saturates at 16 bits,
    # compute what the model says. The .onnx runs on CPUs the pipeline never sees
    # (docs/int8-fidelity.md: what each measured, on which CPU).
    reduce_range: bool = True

    def validate(self):
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} is outside 90-100 (99.999 keeps all but "
                             "the most extreme 0.001% of each activation's values)")
        if self.calibration_stride < 0:
            raise ValueError("calibration_stride must be >= 0 (0: every calibration image at once)")
        if self.opset < 18:
            raise ValueError("opset must be >= 18: the dynamo exporter cannot write older "
                             "opsets (it silently writes 18), and Gelu is native from 20")


def op_counts(model) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def global_average_pools(proto) -> int:
    """Rewrite each ReduceMean over H and W as GlobalAveragePool (plus Flatten where the
    reduced axes are dropped), in place; returns how many. The same values, but onnxruntime
    runs a quantized GlobalAveragePool as its int8 QLinearGlobalAveragePool, while a
    quantized ReduceMean runs in float between DequantizeLinear and QuantizeLinear (a
    full-size dequantize of every SE block's input). bench/bench_latency.py, m0.9 224 px,
    1 thread: int8/fp32 0.52 -> 0.49."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    nodes, rewritten = [], 0
    for n in graph.node:
        axes = constants.get(n.input[1]) if n.op_type == "ReduceMean" and len(n.input) == 2 else None
        if axes is None or sorted(int(a) % 4 for a in axes.ravel()) != [2, 3]:
            nodes.append(n)
            continue
        keepdims = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
        pooled = n.output[0] if keepdims else n.output[0] + "/pooled"
        nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], [pooled], name=n.name + "/pool"))
        if not keepdims:
            nodes.append(helper.make_node("Flatten", [pooled], [n.output[0]], name=n.name + "/flatten", axis=1))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for i in unused:
        graph.initializer.remove(i)
    return rewritten


SIGMOID_GELU = 1.702   # GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks & Gimpel, 2016)


def sigmoid_gelus(proto) -> int:
    """Rewrite each Gelu node as ``x * sigmoid(1.702 x)`` (Mul, Sigmoid, Mul), in place;
    returns how many. onnxruntime has integer kernels for all three ops (QLinearMul,
    QLinearSigmoid) and none for Gelu."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if not any(n.op_type == "Gelu" for n in graph.node):
        return 0
    name = "gelu_sigmoid_scale"
    graph.initializer.append(numpy_helper.from_array(np.asarray(SIGMOID_GELU, np.float32), name))
    nodes, rewritten = [], 0
    for n in graph.node:
        if n.op_type != "Gelu":
            nodes.append(n)
            continue
        if any(a.name == "approximate" and a.s not in (b"", b"none") for a in n.attribute):
            raise ExportError(f"{n.name}: Gelu(approximate=tanh) cannot be rewritten as the sigmoid form")
        x, y = n.input[0], n.output[0]
        nodes += [helper.make_node("Mul", [x, name], [y + "/scaled"], name=n.name + "/scale"),
                  helper.make_node("Sigmoid", [y + "/scaled"], [y + "/gate"], name=n.name + "/sigmoid"),
                  helper.make_node("Mul", [x, y + "/gate"], [y], name=n.name + "/gate")]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def execution(path: Path) -> dict:
    """How onnxruntime runs an int8 QDQ model, read from the graph it optimizes the model
    into (``SessionOptions.optimized_model_filepath``): the ops fused into integer kernels,
    and the ops that still run in float between a DequantizeLinear and a QuantizeLinear."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    integer = Counter(n.op_type for n in graph.node
                      if n.op_type.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger")))
    # Float regions: every op reachable from a DequantizeLinear before a QuantizeLinear.
    in_float, seen = Counter(), set()
    frontier = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    while frontier:
        node = frontier.pop()
        for out in node.output:
            for c in consumers.get(out, []):
                if c.op_type in ("QuantizeLinear", "DequantizeLinear") or id(c) in seen:
                    continue
                seen.add(id(c))
                in_float[c.op_type] += 1
                frontier.append(c)
    return {"runtime": f"onnxruntime {ort.__version__} CPU, graph optimization level all",
            "integer_ops": dict(integer), "float_between_dq_q": dict(in_float),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in graph.node),
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "how": "read from the graph onnxruntime optimizes the model into"}


# torch.onnx writes each node's Python stack trace into its metadata: the build machine's
# file paths, in every shipped model. The module scope (namespace, class hierarchy) stays.
BUILD_PATH_KEYS = ("pkg.torch.onnx.stack_trace",)


def strip_build_paths(proto) -> None:
    """Remove the exporter's stack traces from every node's metadata, in place."""
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key not in BUILD_PATH_KEYS]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def calibration_stride(n: int, most: int = 16) -> int:
    """The largest divisor of ``n`` up to ``most`` (onnxruntime needs equal strides)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


RANGES_OF = {"minmax": "min/max", "percentile": "percentile {:g}", "entropy": "entropy"}   # what the facts say


SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")


def consumers_of(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def _range(lo: float, hi: float) -> list[dict]:
    """A per-tensor TensorQuantOverrides entry."""
    return [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]


def range_overrides(proto, ranges: dict) -> dict:
    """onnxruntime ``TensorQuantOverrides`` for the graph's Conv / Gemm inputs and outputs
    from ``ranges`` (layer -> {"input", "output": [lo, hi]}), found by weight name (the
    dynamo exporter names each weight ``<layer>.weight``). Every layer must be found."""
    by_weight = {n.input[1]: n for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1}
    missing = [layer for layer in ranges if f"{layer}.weight" not in by_weight]
    if missing:
        raise ExportError(f"QAT ranges name {len(missing)} layer(s) the ONNX graph does not have, "
                          f"e.g. {missing[:3]}")
    consumers = consumers_of(proto.graph)
    overrides = {}
    for layer, r in ranges.items():
        if "output" in r:
            node, (lo, hi) = by_weight[f"{layer}.weight"], r["output"]
            out, after = node.output[0], consumers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Relu":
                # onnxruntime drops a Relu after a quantized Conv and lets the Relu's range clip
                # (its zero point at 0): the range goes there, its negative part cut.
                out, lo = after[0].output[0], max(lo, 0.0)
            overrides[out] = _range(lo, hi)
    producer = {o: n for n in proto.graph.node for o in n.output}
    for layer, r in ranges.items():
        # A layer's input range is its input tensor's own (after any Relu): it wins over
        # the producing layer's output range where both name one tensor. onnxruntime gives
        # a shape-only op's output its input's parameters, so the range goes up through them.
        if "input" in r:
            tensor = by_weight[f"{layer}.weight"].input[0]
            while True:
                overrides[tensor] = _range(*r["input"])
                up = producer.get(tensor)
                if up is None or up.op_type not in SHAPE_ONLY:
                    break
                tensor = up.input[0]
    return overrides


def quantize_int8(path: Path, calibration: np.ndarray, cfg: OnnxConfig,
                  float_layers: tuple[str, ...] = (), ranges: Optional[dict] = None) -> int:
    """Static QDQ quantization in place: per-channel symmetric int8 weights, per-tensor
    activations calibrated on ``calibration`` (float NCHW, normalized), except those
    ``ranges`` gives (QAT's); returns how many tensors took their range from there."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """One image at a time, in strides: onnxruntime turns each stride's intermediate
        outputs into histograms before the next (``CalibStridedMinMax``), instead of keeping
        every output of every image (13 GB for 256 images of m0.9 at 224 px)."""

        def __init__(self):
            self.set_range(0, len(calibration))

        def __len__(self):
            return len(calibration)

        def set_range(self, start_index: int, end_index: int):
            self.items = iter(calibration[i:i + 1] for i in range(start_index, end_index))

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {INPUT: x}

    pre = path.with_name(path.stem + ".pre.onnx")
    cache_file = path.with_name(path.stem + ".calibration.json")
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
            overrides = range_overrides(onnx.load(str(pre)), ranges) if ranges else {}
            stride = calibration_stride(len(calibration), cfg.calibration_stride) if cfg.calibration_stride else None
            cache = None
            if cfg.calibration == "percentile":   # the same statistic, computed faster (onnx_calibration.py)
                cache = cache_file
                percentile_calibration_cache(pre, calibration, cfg.percentile, stride or len(calibration), cache,
                                             input_name=INPUT)
            quantize_static(
                str(pre), str(path), None if cache else Reader(), calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=cfg.reduce_range,
                activation_type=QuantType.QUInt8 if cfg.activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                  "entropy": CalibrationMethod.Entropy}[cfg.calibration],
                nodes_to_exclude=exclude,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": cfg.activations == "int8",
                               "CalibPercentile": cfg.percentile, "TensorQuantOverrides": overrides,
                               **({"CalibStridedMinMax": stride} if stride and not cache else {})})
            if exclude:
                proto = onnx.load(str(path))
                unquantize_outputs(proto, exclude)
                onnx.save(proto, str(path))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX int8 quantization failed: {type(e).__name__}: {e}") from e
    finally:
        pre.unlink(missing_ok=True)
        cache_file.unlink(missing_ok=True)
    return len(overrides)


def unquantize_outputs(proto, names: list[str]) -> None:
    """Remove the QuantizeLinear -> DequantizeLinear pair on each named node's output, in
    place. onnxruntime's WeightBiasQuantization transformer re-quantizes the float weights
    of a Conv / Gemm whose input comes from a DequantizeLinear and whose output goes only to
    a QuantizeLinear, to per-tensor int8 (coarser than the per-channel weights it replaced):
    a layer excluded from quantization would run in int8 anyway, less accurately. Without
    the pair after it (or after the Relu / Clip it feeds), the layer really computes in
    float; its consumers read float too."""
    graph = proto.graph
    consumers = consumers_of(graph)
    outputs = {o.name for o in graph.output}
    by_name = {n.name: n for n in graph.node}
    dropped = []
    for name in names:
        out = by_name[name].output[0]
        (q, *more) = consumers.get(out, [None])
        while q is not None and not more and q.op_type in ("Relu", "Clip"):   # as onnxruntime follows
            out = q.output[0]
            (q, *more) = consumers.get(out, [None])
        if more or q is None or q.op_type != "QuantizeLinear" or q.output[0] in outputs:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs):
            continue
        for d in dqs:
            for c in consumers.get(d.output[0], []):
                c.input[:] = [out if i == d.output[0] else i for i in c.input]
        dropped += [q, *dqs]
    for n in dropped:
        graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


class OnnxExporter(SchemeSupport):
    name, suffix = "onnx", ".onnx"

    def export(self, model: torch.nn.Module, ctx: ExportContext, cfg: OnnxConfig) -> ExportResult:
        import onnx

        path = ctx.out_path
        graph, facts = self._float_graph(model.eval(), ctx.meta["input_size"], cfg)
        path.write_bytes(graph)
        facts = dict(facts)
        if ctx.scheme == "fp16":
            facts["precision"] = ("float32: onnxruntime's CPU provider has no float16 kernels that "
                                  "would make an fp16 graph faster, so the ONNX model stays fp32")
        if ctx.int8 and cfg.gelu == "sigmoid":
            proto = onnx.load_from_string(graph)
            facts["gelu"] = f"{sigmoid_gelus(proto)} GELUs written as x * sigmoid({SIGMOID_GELU} x)"
            onnx.save(proto, str(path))
        if ctx.int8:
            ranges = ctx.activation_ranges if cfg.qat_ranges else {}
            carried = quantize_int8(path, normalized(ctx.calibration, ctx.meta), cfg, ctx.float_layers, ranges)
            facts["precision"] = (f"int8 QDQ: weights int8 per channel (symmetric), activations "
                                  f"{cfg.activations} per tensor, "
                                  + (f"{carried} tensors' ranges learned by QAT (TensorQuantOverrides), the rest "
                                     if carried else "")
                                  + f"{RANGES_OF[cfg.calibration].format(cfg.percentile)} calibration on "
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
        if ctx.int8:
            facts["execution"] = execution(path)
        return ExportResult(path, facts)

    # The last float graph exported, by model digest: the accuracy-aware pass exports one
    # model once per attempt, and only the layers left in float differ (dynamo's export is
    # most of an attempt's time).
    _last_float_graph: tuple[tuple, bytes, dict] | None = None

    @classmethod
    def _float_graph(cls, model: torch.nn.Module, size: int, cfg: OnnxConfig) -> tuple[bytes, dict]:
        """The checked (and, with ``simplify: auto``, simplified) float32 ONNX graph of
        ``model`` at ``size`` px, and its facts."""
        import onnx

        key = (sha256_state(model), size, cfg.opset, cfg.simplify)
        if cls._last_float_graph is not None and cls._last_float_graph[0] == key:
            return cls._last_float_graph[1], cls._last_float_graph[2]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "float.onnx"
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
            pools = global_average_pools(proto)
            strip_build_paths(proto)
            onnx.save(proto, str(path))
            onnx.checker.check_model(proto, full_check=True)
            facts = {"opset": cfg.opset, "simplified": False, "precision": "float32",
                     "global_average_pools": pools}
            if cfg.simplify == "auto":  # on the float graph: onnxsim would fold QDQ pairs
                facts.update(cls._simplify(proto, path))
            graph = path.read_bytes()
        cls._last_float_graph = (key, graph, facts)
        return graph, facts

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
