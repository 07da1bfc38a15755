import pytest
import torch

from pipeline.io import checkpoints as ck
from pipeline.models import create_model, randomize_bn, reparameterize
from pipeline.variants import VARIANTS


def official_file(tmp_path, name="m0.6", num_classes=10, distillation=True, seed=0, **extra):
    model = randomize_bn(create_model(name, num_classes, distillation, seed=seed), seed=seed)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict(), **extra}, path)
    return path, model


def same_outputs(a, b):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


@pytest.mark.parametrize("distillation", [True, False])
def test_official_release_layout_loads_strict(tmp_path, distillation):
    path, ref = official_file(tmp_path, distillation=distillation, num_classes=101)
    model, c = ck.load_model(path)
    assert c.layout == "official" and model.variant.name == "m0.6"
    assert model.num_classes == 101 and model.distillation == distillation
    assert same_outputs(model, ref)


def test_bare_and_ddp_state_dicts(tmp_path):
    ref = create_model("m0.6", 10, seed=1)
    torch.save(ref.state_dict(), tmp_path / "bare.pth")
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "ddp.pth")
    for f, layout in [("bare.pth", "bare"), ("ddp.pth", "bare")]:
        model, c = ck.load_model(tmp_path / f)
        assert c.layout == layout and same_outputs(model, ref)


@pytest.mark.parametrize("name", [n if n in ("m0.9", "m1") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in VARIANTS])   # timm's own keys: tests/test_timm_checkpoints.py
def test_timm_layout_maps_to_official(tmp_path, name):
    ref = create_model(name, 10, seed=2)
    mapping = ck._timm_prefix_map(ref.variant)
    assert len(set(mapping.values())) == len(mapping), "mapping must be one-to-one"
    timm_sd = ck.rename_prefixes(ref.state_dict(), mapping)
    assert not any(k.startswith(("features.", "classifier.")) for k in timm_sd)
    torch.save(timm_sd, tmp_path / "timm.pth")
    model, c = ck.load_model(tmp_path / "timm.pth")
    assert c.layout == "timm" and model.variant.name == name
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_timm_key_names_match_timm_structure():
    """Hand-checked against timm's RepVit: m0.9 stage 0 has 2 blocks, then the stage-1
    downsample's pre_block; official features.4 is the stride-2 block."""
    m = ck._timm_prefix_map(VARIANTS["m0.9"])
    assert m["features.1.token_mixer.0"] == "stages.0.blocks.0.token_mixer"
    assert m["features.1.token_mixer.1"] == "stages.0.blocks.0.se"
    assert m["features.3.channel_mixer.m.0"] == "stages.1.downsample.pre_block.channel_mixer.conv1"
    assert m["features.4.token_mixer.0"] == "stages.1.downsample.spatial_downsample"
    assert m["features.4.channel_mixer.m.2"] == "stages.1.downsample.ffn.conv2"
    assert m["features.26.token_mixer.0"] == "stages.3.blocks.1.token_mixer"
    assert m["classifier.classifier_dist"] == "head.head_dist"


@pytest.mark.parametrize("fused", [False, True])
def test_pipeline_checkpoint_roundtrip(tmp_path, fused):
    ref = randomize_bn(create_model("m0.6", 10, seed=3))
    if fused:
        ref = reparameterize(ref)
    ck.save_pipeline_checkpoint(tmp_path / "p.pt", ref, {"classes": list("abcdefghij")})
    model, c = ck.load_model(tmp_path / "p.pt")
    assert c.layout == "pipeline" and c.meta["classes"][0] == "a" and c.fused == fused
    assert same_outputs(model, ref)


class TrainingArgs:
    """Stands for the argparse/config objects training scripts pickle into checkpoints."""


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": create_model("m0.6", 10).state_dict(),
                "args": TrainingArgs()}, path)
    with pytest.raises(ck.CheckpointError, match=r"weights_only=True.*Re-save"):
        ck.load_model(path)


def test_truncated_file(tmp_path):
    path, _ = official_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=r"truncated or corrupt"):
        ck.load_model(path)


def test_wrong_variant_names_the_likely_one(tmp_path):
    path, _ = official_file(tmp_path, name="m1.1")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_model(path, variant="m0.9")
    msg = str(e.value)
    assert "RepViT-M0.9" in msg and "looks like m1.1" in msg and "VARIANT=m1.1" in msg
    assert "shape mismatch" in msg and "features.0.0.c.weight" in msg


def test_missing_keys_are_listed(tmp_path):
    path, model = official_file(tmp_path)
    sd = model.state_dict()
    del sd["features.2.token_mixer.0.conv1.weight"]
    torch.save({"model": sd}, path)
    with pytest.raises(ck.CheckpointError, match=r"missing key.*features\.2\.token_mixer\.0\.conv1\.weight"):
        ck.load_model(path, variant="m0.6")


def test_not_a_repvit_checkpoint(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "x.pth")
    with pytest.raises(ck.CheckpointError, match="does not look like a RepViT"):
        ck.load_model(tmp_path / "x.pth")


def test_metadata_is_carried(tmp_path):
    path, _ = official_file(tmp_path, input_size=64, crop_pct=1.0, classes=list("0123456789"))
    c = ck.parse(ck.read_file(path))
    assert c.meta == {"input_size": 64, "crop_pct": 1.0, "classes": list("0123456789")}


def test_shared_reference_loads(shared_data):
    model, c = ck.load_model(shared_data / "reference" / "repvit_m0_9_cifar10_64px.pth")
    assert model.variant.name == "m0.9" and model.num_classes == 10 and model.distillation
    assert c.meta["input_size"] == 64 and len(c.meta["classes"]) == 10
