"""Checkpoints as timm and the Hugging Face hub publish them, checked against timm's own key
names and shapes (tests/data/timm_repvit_keys_and_cfgs.json, written by timm 1.0.29) and,
for the legacy layout, against timm's own logits (timm_repvit_m1_legacy_golden.pth): not
against this project's mapping."""
import json
from pathlib import Path

import pytest
import torch

from pipeline.io import checkpoints as ck
from pipeline.models import reparameterize

DATA = Path(__file__).resolve().parent / "data"
TIMM = json.loads((DATA / "timm_repvit_keys_and_cfgs.json").read_text())["models"]
# timm model -> the variant it must load as
EXPECTED = {"repvit_m0_9": "m0.9", "repvit_m1_0": "m1.0", "repvit_m1_1": "m1.1", "repvit_m1_5": "m1.5",
            "repvit_m2_3": "m2.3", "repvit_m1": "m1", "repvit_m2": "m2", "repvit_m3": "m3"}


def timm_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under timm's exact key names and shapes, with BatchNorm statistics a
    trained net could have (positive variances, small residual-branch scales)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in TIMM[name]["keys"]:
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("bn.weight", "bn.bias", "running_mean")):
            sd[key] = torch.randn(shape, generator=g) * 0.2 + (0.5 if key.endswith("bn.weight") else 0.0)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return sd


def test_every_timm_model_is_covered():
    assert set(TIMM) == set(EXPECTED)
    assert {n for n, m in TIMM.items() if m["legacy"]} == {"repvit_m1", "repvit_m2", "repvit_m3"}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_timm_checkpoints_load_strictly_and_fuse_exactly(name, fmt, tmp_path):
    sd = timm_state_dict(name)
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    model, c = ck.load_model(path)
    assert c.layout == "timm" and model.variant.name == EXPECTED[name]
    assert model.variant.legacy == TIMM[name]["legacy"]
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, fused = model(x), reparameterize(model)(x)
    assert (ref - fused).abs().max() <= 1e-6 * ref.abs().max()


def test_legacy_m1_matches_timms_own_logits(tmp_path):
    golden = torch.load(DATA / "timm_repvit_m1_legacy_golden.pth", weights_only=True)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in golden["model"].items()}
    torch.save(sd, tmp_path / "m1.pth")
    model, _ = ck.load_model(tmp_path / "m1.pth")
    assert model.variant.name == "m1"
    x, want = golden["input"].float(), golden["logits"].float()
    with torch.no_grad():
        got, fused = model(x), reparameterize(model)(x)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    assert (fused - want).abs().max() <= 1e-5 * scale


def test_legacy_and_current_are_told_apart():
    """m1 and m0.9 (m2 and m1.1) have the same widths and depths: only the RepVGGDW differs."""
    for legacy, current in (("repvit_m1", "repvit_m0_9"), ("repvit_m2", "repvit_m1_1")):
        assert ck._guess_timm_variant(timm_state_dict(legacy)).name == EXPECTED[legacy]
        assert ck._guess_timm_variant(timm_state_dict(current)).name == EXPECTED[current]


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(timm_state_dict("repvit_m0_9"), str(path))
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(ck.CheckpointError, match=r"not a readable safetensors file: it is truncated"):
        ck.load_model(path)


def hub_cache(root: Path, repo: str, files: dict[str, bytes], commit: str = "0123456789abcdef" * 2 + "01234567"):
    """A Hugging Face hub cache as huggingface_hub lays it out (refs/main -> snapshot)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return commit


def test_hf_hub_checkpoint_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """CKPT=hf-hub:<repo>[@revision] through huggingface_hub, in its offline mode against a
    local hub cache (no network): weights, preprocessing from config.json, provenance."""
    import huggingface_hub.constants as hub_constants
    from safetensors.torch import save_file

    from pipeline.io.download import DownloadUnavailable
    from pipeline.stages import load

    weights = tmp_path / "model.safetensors"
    save_file(timm_state_dict("repvit_m1"), str(weights))
    config = {"architecture": "repvit_m1", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 160, 160], "crop_pct": 0.9, "interpolation": "bilinear",
                                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    cache = tmp_path / "hub"
    commit = hub_cache(cache, "timm/repvit_m1.dist_in1k",
                       {"model.safetensors": weights.read_bytes(), "config.json": json.dumps(config).encode()})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    for spec in ("hf-hub:timm/repvit_m1.dist_in1k", f"hf-hub:timm/repvit_m1.dist_in1k@{commit}"):
        cfg = load.LoadConfig(variant="m1", checkpoint=spec)
        out = tmp_path / spec.replace("/", "_").replace(":", "_")
        out.mkdir()
        result = load.load(cfg, out)
        assert result.weights.trained and result.weights.sha256 == ck_sha256(weights)
        assert result.weights.source.startswith(spec.split("@")[0]) and "model.safetensors" in result.weights.source
        assert (result.meta["input_size"], result.meta["crop_pct"], result.meta["interpolation"]) == (160, 0.9, "bilinear")
        assert result.meta["mean"] == [0.5] * 3 and len(result.meta["classes"]) == 1000
        assert load.fingerprint(cfg)["hub_sha256"] == result.weights.sha256
    # The wrong variant gets the usual advice; a repository not in the cache, offline, says what to do.
    with pytest.raises(ck.CheckpointError, match="looks like m1: use VARIANT=m1"):
        load.load(load.LoadConfig(variant="m0.9", checkpoint="hf-hub:timm/repvit_m1.dist_in1k"), tmp_path)
    with pytest.raises(DownloadUnavailable, match="not in the local hub cache"):
        load.load(load.LoadConfig(variant="m3", checkpoint="hf-hub:timm/repvit_m3.dist_in1k"), tmp_path)
    with pytest.raises(ValueError, match=r"hf-hub:<org>/<name>\[@revision\]"):
        load.load(load.LoadConfig(variant="m3", checkpoint="hf-hub:repvit_m3"), tmp_path)


def ck_sha256(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,wrapper", [("m1", "model"), ("m3", "model_ema"), ("m2", None)])
def test_official_layout_legacy_release_files(name, wrapper, tmp_path):
    """The first version's release files ({"model": ...} with official key names), an EMA
    copy and a bare state dict, with a fine-tuned 37-class head: the variant is recognised
    from the keys alone."""
    from pipeline.models import create_model, randomize_bn

    ref = randomize_bn(create_model(name, num_classes=37, seed=4), seed=4)
    sd = ref.state_dict()
    torch.save({wrapper: sd} if wrapper else sd, tmp_path / "w.pth")
    model, c = ck.load_model(tmp_path / "w.pth")
    assert model.variant.name == name and model.num_classes == 37
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
