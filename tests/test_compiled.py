"""Inductor-compiled scoring (pipeline/core/compiled.py): the compiled graph computes what eager
does, pads the last batch, and falls back to eager when compiling fails or changes results."""
import pytest
import torch

from pipeline.core.compiled import AUTO_MIN_IMAGES, FixedBatch, wanted


def fp16_net():
    """A conv, GELU and a residual add whose outputs are rounded to fp16 in between (what
    the Core ML simulation does after every op), with non-trivial weights."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).eval()

    def f(x):
        y = conv(x)
        y = y.to(torch.float16).to(torch.float32)
        y = torch.nn.functional.gelu(y).to(torch.float16).to(torch.float32)
        return (y + y.mean((2, 3), keepdim=True)).to(torch.float16).to(torch.float32).flatten(1)
    return f


def test_compiled_matches_eager_and_pads_the_last_batch():
    f = fp16_net()
    x = torch.randn(11, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    fb = FixedBatch(f, batch=4, tolerance=1e-3, emulate_precision_casts=True)
    got = fb(x)   # 4 + 4 + 3 (padded) rows
    assert fb.facts["compiled"], fb.facts
    with torch.no_grad():
        want = f(x)
    # The fp16 roundings survive compiling: every output is an fp16 value, and all but a
    # few (an ulp apart: fp32 accumulation order) are exactly eager's.
    assert torch.equal(got, got.half().float())
    assert (got == want).float().mean() > 0.99
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert fb(x[:1]).shape == (1, 8 * 12 * 12)


def test_a_module_compiled_with_frozen_weights_matches_eager():
    """The float reference's way: an nn.Module, inductor's freezing (weights pre-packed)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    x = torch.randn(5, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    fb = FixedBatch(model, batch=4, tolerance=1e-4, freezing=True)
    got = fb(x)
    with torch.no_grad():
        want = model(x)
    assert fb.facts["compiled"] and fb.facts["max_rel_diff_vs_eager"] <= 1e-4, fb.facts
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_compiled_graph_that_computes_something_else_is_not_used():
    # Random draws differ between the eager check and the compiled run: the check must see it.
    fb = FixedBatch(lambda x: x + torch.rand_like(x), batch=2, tolerance=1e-6)
    x = torch.zeros(2, 3)
    fb(x)
    assert not fb.facts["compiled"] and fb.facts["max_rel_diff_vs_eager"] > 1e-6, fb.facts
    assert fb.fn is fb.eager


def test_inductor_failure_falls_back_to_eager(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    f = fp16_net()
    fb = FixedBatch(f, batch=2, tolerance=0.0)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fb(x), f(x))
    assert not fb.facts["compiled"] and "no C++ compiler" in fb.facts["reason"]


@pytest.mark.parametrize("setting,images,expected", [("auto", AUTO_MIN_IMAGES - 1, False),
                                                     ("auto", AUTO_MIN_IMAGES, True),
                                                     ("always", 1, True), ("never", 10 ** 6, False)])
def test_auto_compiles_only_large_sets(setting, images, expected):
    assert wanted(setting, images) is expected
