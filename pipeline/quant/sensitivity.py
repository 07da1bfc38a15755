"""Which layers int8 hurts most: each Conv/Linear of the fused model quantized alone
(W8A8: per-channel symmetric int8 weights, per-tensor uint8 input from min/max over the
calibration images), the logit SQNR against the float model. The accuracy-aware pass keeps
the lowest-SQNR layers in float first."""
from __future__ import annotations

import torch
from torch import nn


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / 127.0
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _fake_quant_input(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * torch.log10(ref.pow(2).sum() / noise).item()


@torch.no_grad()
def layer_sensitivity(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """[{layer, sqnr_db}], most sensitive (lowest SQNR) first."""
    model = model.eval()
    layers = quantizable_layers(model)
    ranges: dict[str, tuple[float, float]] = {}

    def record(name):
        def hook(_mod, inp):
            lo, hi = inp[0].min().item(), inp[0].max().item()
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(lo, old[0]), max(hi, old[1]))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in layers]
    ref = model(x)
    for h in handles:
        h.remove()
    out = []
    for name in layers:
        mod = model.get_submodule(name)
        weight = mod.weight.data
        mod.weight.data = _fake_quant_weight(weight)
        lo, hi = ranges[name]
        handle = mod.register_forward_pre_hook(lambda _m, inp: (_fake_quant_input(inp[0], lo, hi),))
        try:
            out.append({"layer": name, "sqnr_db": _sqnr_db(ref, model(x))})
        finally:
            handle.remove()
            mod.weight.data = weight
    return sorted(out, key=lambda r: r["sqnr_db"])
