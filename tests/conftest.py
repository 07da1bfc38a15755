import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """onnxruntime, nncf and our weight cache write under HOME / XDG_CACHE_HOME: keep
    every test's writes in a temporary folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    return home


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters: defaults (mean 0, var 1,
    gamma 1, beta 0; gamma 0 on RepViT's residual branches) hide folding bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                # Residual-branch BNs start at gamma 0 (bn_weight_init=0); trained nets keep
                # them small, otherwise deep variants blow activations up to ~1e5.
                centre = 0.0 if bool((m.weight == 0).all()) else 1.0
                spread = 0.2 if centre == 0.0 else 0.5
                m.weight.copy_(torch.randn(n, generator=g) * spread + centre)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED
