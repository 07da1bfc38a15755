import pytest
import torch

from pipeline.models import create_model, randomize_bn, reparameterize
from pipeline.models.equalize import (EqualizeError, channel_absmax, equalize_residual_stream, median_spread,
                                      watched_tensors)
from pipeline.quant.sensitivity import _fake_quant_input

from .test_repvit import natural_like_inputs


def outlier_model(name="m0.6", seed=0):
    """A fused RepViT whose residual stream has a few channels 20x wider than the rest,
    as trained RepViTs have (randomized BN statistics alone give fairly even channels)."""
    fused = reparameterize(randomize_bn(create_model(name, num_classes=10, seed=seed), seed=seed + 1))
    blocks = fused.features
    # Two channels of a stride-1 block's stream 20x wider, compensated in its consumers
    # (the same float function: what equalization must find and undo).
    i = next(i for i in range(1, len(blocks) - 1)
             if len(blocks[i].token_mixer) == 2 and len(blocks[i + 1].token_mixer) == 2)
    b, nxt = blocks[i], blocks[i + 1]
    with torch.no_grad():
        for layer in (b.token_mixer[0], b.channel_mixer.m[2]):
            layer.weight[:2].mul_(20)
            layer.bias[:2].mul_(20)
        b.channel_mixer.m[0].weight[:, :2].div_(20)
        if hasattr(b.token_mixer[1], "fc1"):
            b.token_mixer[1].fc1.weight[:, :2].div_(20)
        nxt.token_mixer[0].weight[:2].div_(20)
    return fused, i


def stream_modules(model):
    out = [model.features[0][-1]]
    for b in model.features[1:]:
        out += [b.token_mixer[0], b.channel_mixer]
    return out


def int8_stream_error(model, calib, x):
    """Relative logit error when every residual-stream tensor is quantized per tensor
    (uint8, min/max over ``calib``): what per-tensor int8 activations cost the stream."""
    mods = stream_modules(model)
    lo, hi = {}, {}

    def observe(m):
        def h(_, __, y):
            lo[m] = min(lo.get(m, 0.0), y.min().item())
            hi[m] = max(hi.get(m, 0.0), y.max().item())
        return h

    handles = [m.register_forward_hook(observe(m)) for m in mods]
    with torch.no_grad():
        ref = model(calib)
    for h in handles:
        h.remove()
    handles = [m.register_forward_hook(lambda mod, _, y: _fake_quant_input(y, lo[mod], hi[mod])) for m in mods]
    with torch.no_grad():
        quant = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        ref = model(x)
    return ((quant - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["m0.6", "m1"])   # m1: legacy RepVGGDW
def test_equalization_keeps_the_float_function(name):
    fused, _ = outlier_model(name)
    calib, x = natural_like_inputs(16, seed=1), natural_like_inputs(8, seed=2)
    equalized, facts = equalize_residual_stream(fused, calib)
    with torch.no_grad():
        ref, out = fused(x), equalized(x)
    assert (ref - out).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # the input model is left as it was, and the copy really changed
    assert not torch.equal(fused.features[1].token_mixer[0].weight, equalized.features[1].token_mixer[0].weight)
    assert facts["range_spread_after"] < facts["range_spread_before"]


@pytest.mark.parametrize("name", ["m0.6", "m1"])
def test_range_spread_after_is_what_a_second_pass_measures(name):
    """The 'after' ranges come from the scales (no second pass over the images): each
    stream tensor's measured per-channel range after equalization gives the same figure."""
    fused, _ = outlier_model(name)
    calib = natural_like_inputs(16, seed=1)
    equalized, facts = equalize_residual_stream(fused, calib)
    measured = channel_absmax(equalized, calib, watched_tensors(equalized))
    assert facts["range_spread_after"] == pytest.approx(median_spread(measured), abs=0.011)
    assert facts["range_spread_after"] != pytest.approx(facts["range_spread_before"], abs=0.011)


def test_equalization_evens_channel_ranges_and_cuts_int8_error():
    fused, i = outlier_model()
    calib, x = natural_like_inputs(16, seed=1), natural_like_inputs(8, seed=2)
    equalized, _ = equalize_residual_stream(fused, calib, alpha=1.0)
    dw_before = channel_absmax(fused, calib, [fused.features[i].token_mixer[0]])
    dw_after = channel_absmax(equalized, calib, [equalized.features[i].token_mixer[0]])
    (before,), (after,) = dw_before.values(), dw_after.values()
    spread_before, spread_after = before.max() / before.median(), after.max() / after.median()
    assert spread_before > 10                           # the outliers are there
    assert spread_after < spread_before / 4, (spread_before, spread_after)
    assert after.max() == pytest.approx(before.max().item(), rel=0.05)   # the tensor range is kept
    err_before, err_after = int8_stream_error(fused, calib, x), int8_stream_error(equalized, calib, x)
    assert err_after < 0.5 * err_before, (err_before, err_after)


def test_equalization_needs_the_fused_model():
    model = randomize_bn(create_model("m0.6", num_classes=10, seed=0))
    with pytest.raises(EqualizeError, match="fused RepViT"):
        equalize_residual_stream(model, natural_like_inputs(2))
