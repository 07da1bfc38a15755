import json

import torch
from click.testing import CliRunner

from pipeline.app.cli import main
from pipeline.io.checkpoints import load_model
from pipeline.models import create_model, randomize_bn


def test_variants_prints_counted_and_published():
    result = CliRunner().invoke(main, ["variants", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(result.output)}
    assert set(rows) == {"m0.6", "m0.9", "m1.0", "m1.1", "m1.5", "m2.3", "m1", "m2", "m3"}
    assert rows["m0.9"]["params_m"] == 5.07 and rows["m0.9"]["published_params_m"] == 5.1
    assert {n for n, r in rows.items() if r["legacy"]} == {"m1", "m2", "m3"}
    assert rows["m3"]["params_m"] == 10.12 and rows["m3"]["published_top1"] == 81.4
    assert rows["m3"]["hub"] == "hf-hub:timm/repvit_m3.dist_in1k"


def test_reparam_writes_a_verified_fused_checkpoint(tmp_path):
    model = randomize_bn(create_model("m0.6", 10, seed=0))
    torch.save({"model": model.state_dict(), "input_size": 64}, tmp_path / "in.pth")
    out = tmp_path / "fused.pt"
    result = CliRunner().invoke(main, ["reparam", "--ckpt", str(tmp_path / "in.pth"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "BatchNorms folded" in result.output and "top-1 agreement 100%" in result.output
    fused, c = load_model(out)
    assert c.fused and c.meta["input_size"] == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-4)


def test_bad_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(main, ["reparam", "--ckpt", str(tmp_path / "bad.pth"),
                                       "--out", str(tmp_path / "o.pt")])
    assert result.exit_code == 2
    assert "truncated or corrupt" in result.output and not (tmp_path / "o.pt").exists()


def test_unknown_variant_lists_valid_ones(tmp_path):
    result = CliRunner().invoke(main, ["reparam", "--variant", "m9", "--ckpt", "random",
                                       "--out", str(tmp_path / "o.pt")])
    assert result.exit_code == 2 and "valid variants: m0.6, m0.9" in result.output
