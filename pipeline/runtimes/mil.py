"""Executes a saved Core ML ML program on any OS, by reading its MIL program back.

Core ML cannot run on Linux. This interpreter covers the MIL ops that RepViT programs
contain, in PyTorch: every op computes in float32 and its result is rounded to the
dtype the program declares for it (fp16 programs store every intermediate as fp16),
which is how fp16 programs are simulated. Compressed weights (palettized, int8) are
expanded with coremltools' own ``materialized_val_inference``. Results from here are
``simulated``: the real Core ML runtime (macOS) may differ in accumulation order.

W8A8 convolutions (int8 weights, input from quantize -> dequantize) compute in integers
where oneDNN can (``integer_convs``): the int8 activations times the int8 weights summed
exactly in int32, then scaled, in float32, and rounded to fp16 like any conv. The float
path instead multiplies fp16-rounded dequantized values, so the two differ by rounding
at the fp16 level (tests/test_mil.py bounds it); the integer one ran the Core ML simulation
of m0.9 about twice as fast here (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class MilError(RuntimeError):
    pass


def load_program(path: Path):
    """(spec, MIL program) of a saved ``.mlpackage``, without Core ML."""
    from pipeline.core.quiet import quiet

    with quiet():
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto import load as milproto

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto.load(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=model.weights_dir)
    return spec, prog


def _is_fp16(var) -> bool:
    from coremltools.converters.mil.mil import types

    return var.dtype == types.fp16


def _const_value(op) -> np.ndarray | Any:
    if op.op_type == "const":
        return op.outputs[0].val
    return op.materialized_val_inference()  # constexpr_*: palettized / quantized weights


class IntegerConv(NamedTuple):
    """A W8A8 conv run as oneDNN's u8 x s8 convolution with a float32 result."""
    source: str                 # the quantize op's output: integers, held as float
    shift: int                  # added to make them uint8 (128 for int8, 0 for uint8)
    x_scale: float
    x_zero_point: int           # in the shifted (uint8) domain
    weight: torch.Tensor        # int8 [cout, cin/groups, kh, kw]
    w_scale: torch.Tensor       # float32 [cout]
    w_zero_point: torch.Tensor  # int64 zeros [cout]
    strides: list[int]
    padding: list[int]          # [top, left]: oneDNN pads symmetrically
    dilations: list[int]
    groups: int


@functools.cache
def integer_convs_exact() -> bool:
    """Whether oneDNN's u8 x s8 convolution here sums exactly (no int16 saturation, as
    AVX2 without VNNI can have) and agrees with float32 on extreme values."""
    try:
        g = torch.Generator().manual_seed(0)
        qx = torch.randint(0, 256, (2, 16, 5, 5), generator=g, dtype=torch.uint8)
        qx[0] = 255   # u8 255 x s8 127, pairwise: past int16 (sums stay below 2^24, exact in fp32)
        qw = torch.randint(-127, 128, (8, 16, 3, 3), generator=g, dtype=torch.int8)
        qw[0] = 127
        scale = torch.ones(8)
        packed = torch.ops.onednn.qconv_prepack(qw, scale, 1.0, 3, [1, 1], [1, 1], [1, 1], 1, None)
        got = torch.ops.onednn.qconv_pointwise(
            qx.contiguous(memory_format=torch.channels_last), 1.0, 3, packed, scale,
            torch.zeros(8, dtype=torch.int64), None, [1, 1], [1, 1], [1, 1], 1, 1.0, 0,
            torch.float32, "none", [], "")
        want = torch.nn.functional.conv2d(qx.double() - 3, qw.double(), padding=1)
        return bool(torch.equal(got.double(), want))
    except (RuntimeError, AttributeError, NotImplementedError):   # no oneDNN (e.g. Arm builds)
        return False


class MilInterpreter:
    def __init__(self, path: Path, integer_convs: bool | None = None):
        """``integer_convs``: W8A8 convs in oneDNN integers (None: where that is exact here)."""
        self.spec, self.prog = load_program(path)
        self.main = self.prog.functions["main"]
        self.ops = list(self.main.operations)
        self.input_name = next(iter(self.main.inputs))
        self.consts: dict[str, torch.Tensor | Any] = {}
        # Per-op facts read once (coremltools builds op.inputs anew on every access).
        self._inputs = {id(op): dict(op.inputs) for op in self.ops}
        self._conv_params: dict[int, tuple] = {}
        for op in self.ops:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                v = _const_value(op)
                self.consts[op.outputs[0].name] = (torch.from_numpy(np.asarray(v, dtype=np.float32))
                                                   if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                                                   else v)
        if integer_convs is None:
            integer_convs = integer_convs_exact()
        self._integer: dict[int, IntegerConv] = {}
        if integer_convs:
            for op in self.ops:
                plan = self._integer_plan(op) if op.op_type == "conv" else None
                if plan:
                    self._integer[id(op)] = plan
        self._packed: dict[int, torch.Tensor] = {}
        # Each intermediate is dropped after its last reader: holding every op's output for
        # the whole run made each op write into fresh memory (page faults: 2x slower per
        # conv at batch 16, 224 px) and memory grow with the depth of the program.
        last_read: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for name in self._reads(op):
                if name not in self.consts:
                    last_read[name] = i
        kept = {v.name for v in self.main.outputs}
        # A dequantize that only integer convs read is never computed.
        self._skip = {id(op) for op in self.ops if op.op_type == "dequantize"
                      and op.outputs[0].name not in last_read and op.outputs[0].name not in kept}
        self._free_after: dict[int, list[str]] = {}
        for name, i in last_read.items():
            if name not in kept:
                self._free_after.setdefault(i, []).append(name)

    def _integer_plan(self, op) -> IntegerConv | None:
        """How ``op`` runs in integers, or None: its weight must be int8 with a zero offset
        (constexpr_affine_dequantize, per output channel) and its input a per-tensor
        dequantize of a quantize's output."""
        ins = self._inputs[id(op)]
        wop, dq = ins["weight"].op, ins["x"].op
        if wop is None or wop.op_type != "constexpr_affine_dequantize" or dq is None or dq.op_type != "dequantize":
            return None
        w = dict(wop.inputs)
        data, w_scale = np.asarray(w["quantized_data"].val), np.asarray(w["scale"].val)
        w_zp = np.asarray(w["zero_point"].val) if w.get("zero_point") is not None else 0
        axis = int(w["axis"].val) if w.get("axis") is not None else 0
        if data.dtype != np.int8 or np.any(w_zp) or axis != 0 or w_scale.size not in (1, data.shape[0]):
            return None
        d = dict(dq.inputs)
        q = d["input"].op
        if q is None or q.op_type != "quantize" or d.get("axis") is not None:
            return None
        x_scale = np.asarray(d["scale"].val)
        x_zp = np.asarray(d["zero_point"].val if d.get("zero_point") is not None else 0)
        if x_scale.size != 1 or x_zp.size != 1:
            return None
        shift = 128 if str(dict(q.inputs)["output_dtype"].val) == "int8" else 0
        if self._val(op, "pad_type", self.consts) == "same":   # needs the input's shape
            return None
        strides, dil, groups, (left, right, top, bottom) = self._conv_layout(op, self.consts, None, None)
        if left != right or top != bottom:   # oneDNN pads symmetrically
            return None
        cout = data.shape[0]
        return IntegerConv(q.outputs[0].name, shift, float(x_scale), int(x_zp) + shift,
                           torch.from_numpy(data.copy()),
                           torch.from_numpy(np.broadcast_to(w_scale.astype(np.float32), (cout,)).copy()),
                           torch.zeros(cout, dtype=torch.int64), strides, [top, left], dil, groups)

    def _reads(self, op) -> list[str]:
        """Names of the values ``op`` reads (an integer conv reads its quantize's integers)."""
        plan = self._integer.get(id(op))
        ins = [var for k, var in self._inputs[id(op)].items() if not (plan and k == "x")]
        names = [v.name for var in ins for v in (var if isinstance(var, (list, tuple)) else (var,))]
        return names + [plan.source] if plan else names

    @property
    def integer_convs(self) -> int:
        """How many convs run in integers."""
        return len(self._integer)

    def prepare(self) -> None:
        """Pack the integer convs' weights for oneDNN (once; before tracing the program)."""
        for key, plan in self._integer.items():
            if key not in self._packed:
                self._packed[key] = torch.ops.onednn.qconv_prepack(
                    plan.weight, plan.w_scale, plan.x_scale, plan.x_zero_point, plan.strides, plan.padding,
                    plan.dilations, plan.groups, None)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return counts

    def run(self, image: np.ndarray) -> np.ndarray:
        """``image``: float NCHW 0..255 RGB (what Core ML makes of an image input), any batch
        size: every op is applied to the whole batch at once (the program's batch-1 reshapes
        take the batch). Returns the tensor the program feeds its ``classify`` op
        (probabilities), or its output."""
        return self.forward(self.input_tensor(image)).numpy()

    @staticmethod
    def input_tensor(image: np.ndarray) -> torch.Tensor:
        # Channels-last: oneDNN's convolutions skip their layout reorders (about 10% here);
        # every op keeps the layout it is given.
        return torch.from_numpy(np.asarray(image, np.float32)).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``run`` on a tensor (what ``compiled.FixedBatch`` traces and compiles)."""
        env: dict[str, Any] = dict(self.consts)
        env[self.input_name] = x
        result = None
        for i, op in enumerate(self.ops):
            if op.op_type == "const" or op.op_type.startswith("constexpr_") or id(op) in self._skip:
                pass
            elif op.op_type == "classify":
                result = env[self._inputs[id(op)]["probabilities"].name]
            else:
                out = self._eval(op, env)
                fresh = not self._aliases_input(op, env, out)
                env[op.outputs[0].name] = self._rounded(out, op.outputs[0], fresh)
            for name in self._free_after.get(i, ()):
                env.pop(name, None)
        return env[self.main.outputs[0].name] if result is None else result

    def _aliases_input(self, op, env, out) -> bool:
        """Whether ``out`` shares memory with one of the op's inputs (a cast returns its
        input, a reshape a view of it): it must not be rounded in place."""
        if not isinstance(out, torch.Tensor):
            return False
        ptr = out.untyped_storage().data_ptr()
        for var in self._inputs[id(op)].values():
            for v in (var if isinstance(var, (list, tuple)) else (var,)):
                t = env.get(v.name)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr:
                    return True
        return False

    @staticmethod
    def _rounded(out, var, fresh: bool):
        """``out`` as the dtype ``var`` declares: fp16 values (kept in float32), rounded in
        place when ``out`` is the op's own new tensor (``fresh``)."""
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        if not _is_fp16(var):
            return out.float()
        if fresh:
            return out.copy_(out.to(torch.float16))
        return out.to(torch.float16).to(torch.float32)

    def _eval(self, op, env) -> Any:
        t = op.op_type
        a = lambda name: self._arg(op, name, env)  # noqa: E731
        if t in ("add", "mul", "sub", "real_div"):
            fn = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "real_div": torch.div}[t]
            return fn(a("x"), a("y"))
        if t == "cast":
            return a("x")  # rounding to the declared dtype happens in run()
        if t == "conv":
            return self._conv(op, env)
        if t == "gelu":
            mode = self._val(op, "mode", env) or "EXACT"
            if mode == "EXACT":
                return F.gelu(a("x"))
            if mode == "TANH_APPROXIMATION":
                return F.gelu(a("x"), approximate="tanh")
            x = a("x")
            return x * torch.sigmoid(1.702 * x)
        if t == "relu":
            return F.relu(a("x"))
        if t == "sigmoid":
            return torch.sigmoid(a("x"))
        if t == "reduce_mean":
            axes = [int(v) for v in np.atleast_1d(self._val(op, "axes", env))]
            return a("x").mean(dim=axes, keepdim=bool(self._val(op, "keep_dims", env)))
        if t == "reshape":
            x, shape = a("x"), [int(v) for v in self._val(op, "shape", env)]
            if shape and shape[0] == 1:   # the program is traced at batch 1; run() takes batches
                shape[0] = x.shape[0]
            return x.reshape(shape)
        if t == "linear":
            bias = a("bias") if "bias" in self._inputs[id(op)] else None
            return F.linear(a("x"), a("weight"), bias)
        if t == "softmax":
            return torch.softmax(a("x"), dim=int(self._val(op, "axis", env)))
        if t == "quantize":
            return self._quantize(op, env)
        if t == "dequantize":
            return self._dequantize(op, env)
        raise MilError(f"MIL op {t!r} ({op.name}) is not supported by the interpreter")

    def _arg(self, op, name, env):
        v = env[self._inputs[id(op)][name].name]
        return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float32))

    def _val(self, op, name, env):
        var = self._inputs[id(op)].get(name)
        if var is None:
            return None
        v = env.get(var.name, var.val)
        return v.numpy() if isinstance(v, torch.Tensor) else v

    def _conv(self, op, env):
        if id(op) in self._integer:
            return self._integer_conv(op, self._integer[id(op)], env)
        x, w = self._arg(op, "x", env), self._arg(op, "weight", env)
        bias = self._arg(op, "bias", env) if "bias" in self._inputs[id(op)] else None
        if id(op) not in self._conv_params:
            self._conv_params[id(op)] = self._conv_layout(op, env, x, w)
        strides, dil, groups, pads = self._conv_params[id(op)]
        left, right, top, bottom = pads
        if left == right and top == bottom:   # zero padding inside the conv: no padded copy
            return F.conv2d(x, w, bias, stride=strides, padding=(top, left), dilation=dil, groups=groups)
        return F.conv2d(F.pad(x, [left, right, top, bottom]), w, bias, stride=strides, dilation=dil, groups=groups)

    def _integer_conv(self, op, plan: IntegerConv, env):
        if id(op) not in self._packed:
            self.prepare()
        q = env[plan.source]
        qx = (q + plan.shift if plan.shift else q).to(torch.uint8).contiguous(memory_format=torch.channels_last)
        bias = self._arg(op, "bias", env) if "bias" in self._inputs[id(op)] else None
        return torch.ops.onednn.qconv_pointwise(
            qx, plan.x_scale, plan.x_zero_point, self._packed[id(op)], plan.w_scale, plan.w_zero_point, bias,
            plan.strides, plan.padding, plan.dilations, plan.groups, 1.0, 0, torch.float32, "none", [], "")

    def _conv_layout(self, op, env, x, w) -> tuple:
        """(strides, dilations, groups, (left, right, top, bottom) padding): constant per op."""
        strides = [int(s) for s in self._val(op, "strides", env)]
        dil = [int(d) for d in self._val(op, "dilations", env)]
        groups = int(self._val(op, "groups", env))
        pad_type = self._val(op, "pad_type", env)
        if pad_type == "custom":
            top, bottom, left, right = [int(p) for p in self._val(op, "pad", env)]
        elif pad_type == "valid":
            top = bottom = left = right = 0
        elif pad_type == "same":
            if x is None:
                raise MilError("conv pad_type 'same' needs the input's shape")
            (kh, kw), (h, wd) = w.shape[2:], x.shape[2:]
            ph = max((math.ceil(h / strides[0]) - 1) * strides[0] + (kh - 1) * dil[0] + 1 - h, 0)
            pw = max((math.ceil(wd / strides[1]) - 1) * strides[1] + (kw - 1) * dil[1] + 1 - wd, 0)
            top, bottom, left, right = ph // 2, ph - ph // 2, pw // 2, pw - pw // 2
        else:
            raise MilError(f"conv pad_type {pad_type!r} is not supported")
        return strides, dil, groups, (left, right, top, bottom)

    def _qparams(self, op, env, x):
        scale = torch.as_tensor(np.asarray(self._val(op, "scale", env), np.float32))
        zp = self._val(op, "zero_point", env)
        # A zero zero-point (symmetric int8, the usual) is skipped: a pass less over the tensor.
        zp = None if zp is None or not np.any(zp) else torch.as_tensor(np.asarray(zp, np.float32))
        axis = self._val(op, "axis", env)
        if scale.dim() == 1 and scale.numel() > 1 and axis is not None:
            shape = [1] * x.dim()
            shape[int(axis)] = -1
            scale = scale.reshape(shape)
            zp = None if zp is None else zp.reshape(shape)
        return scale, zp

    def _quantize(self, op, env):
        x = self._arg(op, "input", env)
        scale, zp = self._qparams(op, env, x)
        dtype = self._val(op, "output_dtype", env)
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        q = torch.div(x, scale).round_()
        return (q if zp is None else q.add_(zp)).clamp_(lo, hi)

    def _dequantize(self, op, env):
        x = self._arg(op, "input", env)
        scale, zp = self._qparams(op, env, x)
        return torch.mul(x, scale) if zp is None else torch.sub(x, zp).mul_(scale)
