import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import ReparamError, create_model, profile, randomize_bn, reparameterize
from pipeline.models import repvit as repvit_module
from pipeline.variants import VARIANTS

DATA = Path(__file__).resolve().parents[1] / "data"


def natural_like_inputs(n=4, size=64, seed=0):
    """Smooth, correlated inputs in the normalized range of real photos (not white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, size, size, generator=g)


def assert_fused_matches(model, x, rel=1e-4):
    fused = reparameterize(model)
    with torch.no_grad():
        ref, out = model.eval()(x), fused(x)
    diff, scale = (ref - out).abs().max().item(), ref.abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x {scale:.3g}"
    return diff / scale


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_matches_unfused_every_variant(name):
    model = randomize_bn(create_model(name, num_classes=100, seed=1), seed=2)
    assert_fused_matches(model, natural_like_inputs())


@pytest.mark.parametrize("name,params_m,gmacs", [
    (n, v.published.params_m, v.published.gmacs) for n, v in VARIANTS.items() if v.published.params_m])
def test_published_params_and_macs(name, params_m, gmacs):
    p = profile(reparameterize(create_model(name, seed=0)), 224)
    assert round(p.params / 1e6, 1) == params_m
    assert round(p.macs / 1e9, 1) == gmacs
    assert p.batchnorms == 0


def test_official_key_names():
    keys = set(create_model("m0.9", seed=0).state_dict())
    for k in ["features.0.0.c.weight", "features.0.2.bn.running_var",
              "features.1.token_mixer.0.conv.c.weight", "features.1.token_mixer.0.conv1.bias",
              "features.1.token_mixer.0.bn.weight", "features.1.token_mixer.1.fc1.weight",
              "features.4.token_mixer.2.c.weight", "features.1.channel_mixer.m.2.bn.bias",
              "classifier.classifier.l.weight", "classifier.classifier_dist.bn.running_mean"]:
        assert k in keys, k


def test_without_distillation_head():
    model = randomize_bn(create_model("m0.6", num_classes=10, distillation=False, seed=0))
    assert not any(k.startswith("classifier.classifier_dist") for k in model.state_dict())
    assert_fused_matches(model, natural_like_inputs())


@pytest.mark.parametrize("name", ["m0.6", "m1"])   # current and legacy RepVGGDW
def test_tolerance_catches_a_one_term_mistake(monkeypatch, name):
    """Drop the identity branch from the RepVGGDW fusion: the check must fail."""
    model = randomize_bn(create_model(name, num_classes=10, seed=3), seed=4)
    original = torch.nn.functional.pad

    def pad_without_identity(t, pad, *a, **k):
        if t.dim() == 4 and t.shape[-1] == 1 and bool((t == 1).all()):
            t = torch.zeros_like(t)
        return original(t, pad, *a, **k)

    monkeypatch.setattr(repvit_module.F, "pad", pad_without_identity)
    with pytest.raises(AssertionError):
        assert_fused_matches(model, natural_like_inputs())


def test_unfoldable_batchnorm_is_an_error():
    model = create_model("m0.6", num_classes=10, seed=0)
    model.features[1].token_mixer.append(nn.BatchNorm2d(40))  # a BN after SE: nothing to fold into
    with pytest.raises(ReparamError, match=r"features\.1\.token_mixer\.2"):
        reparameterize(model)


def test_reparameterize_leaves_input_untouched():
    model = create_model("m0.6", num_classes=10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reparameterize(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fused_logits_regression():
    """A seeded m0.9 with randomized BN -> stored fused logits; fails if the model
    definition or the folding drifts. Regenerate only for an intended change:
    ``python -m tests.models.test_repvit``."""
    expected = json.loads((DATA / "m0_9_fused_logits.json").read_text())
    logits = _regression_logits()
    assert logits.shape == (2, 1000)
    ref = torch.tensor(expected["logits_first_32"])
    assert torch.allclose(logits[:, :32], ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert abs(logits.sum().item() - expected["sum"]) <= 1e-3 * expected["abs_sum"]
    assert logits.argmax(1).tolist() == expected["argmax"]


def _regression_logits():
    model = randomize_bn(create_model("m0.9", seed=1234), seed=5678)
    fused = reparameterize(model)
    x = natural_like_inputs(2, 224, seed=42)
    with torch.no_grad():
        return fused(x)


if __name__ == "__main__":
    out = _regression_logits()
    (DATA / "m0_9_fused_logits.json").write_text(json.dumps({
        "logits_first_32": out[:, :32].tolist(), "sum": out.sum().item(),
        "abs_sum": out.abs().sum().item(), "argmax": out.argmax(1).tolist()}, indent=1))
