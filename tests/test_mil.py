"""The MIL interpreter's integer convolutions (pipeline/runtimes/mil.py): W8A8 convs summed
in int32 by oneDNN agree with the float32 path to fp16 rounding, conv by conv and end to
end, and a machine whose integer sums are not exact falls back to the float path."""
import numpy as np
import pytest
import torch

from pipeline.eval import scoring
from pipeline.runtimes import mil, open_runtime
from pipeline.runtimes.coreml import MilRuntime
from pipeline.runtimes.mil import MilInterpreter, integer_convs_exact

needs_onednn = pytest.mark.skipif(not integer_convs_exact(), reason="no exact oneDNN int8 convolution here")


@pytest.fixture
def int8_program(coreml_int8):
    return coreml_int8.path


@needs_onednn
def test_each_integer_conv_is_the_float_conv_to_fp16_rounding(trained, int8_program):
    """Every conv's integer result against the float path's on the same inputs: the float
    path multiplies fp16-rounded dequantized values (2^-11 each) and rounds its result, so
    they differ at the fp16 level, never by a quantization step."""
    interp = MilInterpreter(int8_program, integer_convs=True)
    convs = [op for op in interp.ops if op.op_type == "conv"]
    assert interp.integer_convs == len(convs) > 10   # every conv of this W8A8 program
    interp.prepare()
    x = interp.input_tensor(trained.check[:8].transpose(0, 3, 1, 2))
    env = {**interp.consts, interp.input_name: x}
    worst = 0.0
    for op in interp.ops:
        if op.op_type in ("const", "classify") or op.op_type.startswith("constexpr_"):
            continue
        plan = interp._integer.pop(id(op), None)   # the float path for this op
        out = interp._eval(op, env)
        env[op.outputs[0].name] = interp._rounded(out, op.outputs[0], not interp._aliases_input(op, env, out))
        if plan is not None:
            interp._integer[id(op)] = plan
            got, want = interp._integer_conv(op, plan, env), env[op.outputs[0].name]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert 0 < worst <= 2.0 ** -9, worst


@needs_onednn
def test_integer_simulation_end_to_end(trained, int8_program):
    integer = MilRuntime(int8_program, trained.meta)
    assert "int8 x int8 convs" in integer.name
    fp = MilInterpreter(int8_program, integer_convs=False)
    want = fp.forward(fp.input_tensor(trained.check.transpose(0, 3, 1, 2))).numpy()
    got = integer.predict(trained.check)
    assert np.array_equal(got, got.astype(np.float16).astype(np.float32))   # still an fp16 program
    assert np.abs(got - want).max() <= 0.05 and (got.argmax(1) == want.argmax(1)).mean() >= 0.98


def test_fp16_simulation_is_the_programs_literal_arithmetic(trained, int8_program, tmp_path):
    """export.coreml.simulation: fp16 reaches the runtime, in this process and in the
    scoring jobs: dequantize to fp16, then convolve, as the float interpreter does."""
    fp = MilInterpreter(int8_program, integer_convs=False)
    want = fp.forward(fp.input_tensor(trained.check.transpose(0, 3, 1, 2))).numpy()
    rt = open_runtime("coreml", int8_program, trained.meta, simulation="fp16")
    assert "int8 x int8" not in rt.name and np.array_equal(rt.predict(trained.check), want)
    np.save(tmp_path / "pixels.npy", trained.check)
    got = scoring.score("coreml", int8_program, trained.meta, tmp_path / "pixels.npy", 32, 1, tmp_path / "job",
                        simulation="fp16")
    assert np.array_equal(got, want)


def test_inexact_integer_sums_fall_back_to_float(trained, int8_program, monkeypatch):
    """AVX2 without VNNI can saturate u8 x s8 pair sums at int16: such a machine must not use
    integer convs (the self-check sees it) and still simulates, in float."""
    real = torch.ops.onednn.qconv_pointwise

    def saturating(*args):
        return real(*args).clamp(-32768, 32767)

    monkeypatch.setattr(torch.ops.onednn, "qconv_pointwise", saturating)
    integer_convs_exact.cache_clear()
    try:
        assert not integer_convs_exact()
        interp = MilInterpreter(int8_program)
        assert interp.integer_convs == 0 and not interp._skip
        out = MilRuntime(int8_program, trained.meta)
        assert "int8 x int8" not in out.name and out.predict(trained.check[:4]).shape == (4, len(trained.meta["classes"]))
    finally:
        monkeypatch.undo()
        mil.integer_convs_exact.cache_clear()
