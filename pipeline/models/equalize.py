"""Range equalization of the fused RepViT's residual stream, for per-tensor int8 activations.

Every int8 target quantizes activations per tensor: one step size for all channels. In
RepViT the tensors int8 hurts most are those of the residual stream (token-mixer
outputs, SE outputs, residual sums), where a few channels span +-30 and most +-3, so
most channels get a handful of levels. Each such tensor is produced by convolutions
whose rows (output channels) can be scaled freely: a depthwise conv maps channel k to
channel k, and per-output-channel symmetric int8 weights quantize a scaled row to the
scaled quantized row. Its consumers are depthwise convs (rescaled the same way) and
pointwise convs / the classifier, whose input columns absorb the inverse scale. So channel
k of the stream between two depthwise convs can be multiplied by ``s_k`` without changing
the float function (up to rounding).

Scaling small channels up (``s_k = (max_j r_j / r_k) ** alpha``, ``r`` the channels'
calibrated absolute maxima) keeps the tensor's range and shrinks their quantization noise
by ``s_k``; the price is paid in the consumers' weight columns, which shrink and lose
resolution within their output channel. ``alpha`` 0.5 balances the two (cross-layer
equalization, Nagel et al. 2019, applied to the residual stream rather than conv pairs).
Measured on the shared reference (docs/int8-fidelity.md): simulated W8A8 KL to float 0.0034 -> 0.0019.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EqualizeError(ValueError):
    pass


def check_alpha(alpha: float) -> None:
    """A recipe's ``equalize_alpha`` (quantize and qat sections)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"equalize_alpha {alpha} is outside (0, 1] (0.5 balances activation and "
                         "weight resolution)")


def _rows(layer: nn.Module, s: torch.Tensor) -> None:
    layer.weight.mul_(s.view(-1, *[1] * (layer.weight.dim() - 1)))
    layer.bias.mul_(s)


def _columns(layer: nn.Module, s: torch.Tensor) -> None:
    layer.weight.div_(s.view(1, -1, *[1] * (layer.weight.dim() - 2)))


def _se(token_mixer: nn.Sequential):
    return token_mixer[1] if hasattr(token_mixer[1], "fc1") else None


def _check(model: nn.Module) -> None:
    def ok(layer):
        return isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.bias is not None
    try:
        stem_ok = ok(model.features[0][-1])
        blocks_ok = all(ok(b.token_mixer[0]) and b.token_mixer[0].groups == b.token_mixer[0].in_channels
                        and ok(b.channel_mixer.m[0]) and ok(b.channel_mixer.m[2])
                        and (len(b.token_mixer) == 2 or ok(b.token_mixer[2]))
                        for b in model.features[1:])
        head_ok = ok(model.classifier)
    except (AttributeError, IndexError, TypeError):
        stem_ok = blocks_ok = head_ok = False
    if not (stem_ok and blocks_ok and head_ok and getattr(model, "fused", False)):
        raise EqualizeError("equalization needs the fused RepViT of the reparam stage (conv + bias "
                            "everywhere, a Linear head); set quantize.equalize: false for other models")


@torch.no_grad()
def channel_absmax(model: nn.Module, x: torch.Tensor, modules: list[nn.Module],
                   batch: int = 64) -> dict[int, torch.Tensor]:
    """Per-channel max |output| of each of ``modules`` over the images ``x`` (NCHW)."""
    out: dict[int, torch.Tensor] = {}

    def hook(module):
        def record(_, __, y):
            a = y.abs().amax(dim=(0, 2, 3))
            out[id(module)] = a if id(module) not in out else torch.maximum(out[id(module)], a)
        return record

    handles = [m.register_forward_hook(hook(m)) for m in modules]
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return out


def watched_tensors(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the residual stream's tensors (stem, each block's
    token mixer, squeeze-excite and channel mixer): what equalization evens out."""
    features = list(model.features)
    watched = [features[0][-1]]
    for b in features[1:]:
        watched += [b.token_mixer[0], b.channel_mixer] + ([_se(b.token_mixer)] if _se(b.token_mixer) else [])
    return watched


def median_spread(ranges: dict) -> float:
    """max / median channel range of each tensor, the median over tensors (2 decimals)."""
    return round(float(torch.tensor([float(r.max() / r.clamp_min(1e-8).median())
                                     for r in ranges.values()]).median()), 2)


def ranges_after(absmax: dict, applied: dict) -> dict:
    """Each watched tensor's per-channel max |output| after equalization, from before's and
    the scale its stream took (exact algebra: no second pass over the calibration images;
    tests/models/test_equalize.py measures it)."""
    return {k: absmax[k] * applied[k] for k in absmax}


@torch.no_grad()
def equalize_residual_stream(model: nn.Module, x: torch.Tensor, alpha: float = 0.5,
                             max_scale: float = 16.0) -> tuple[nn.Module, dict]:
    """An equalized copy of the fused ``model`` (same float function) and facts about it:
    the stream tensors' range spread (max / median channel range) before and after.
    ``x``: calibration images, normalized NCHW."""
    _check(model)
    m = copy.deepcopy(model).eval()
    features = list(m.features)
    watched = watched_tensors(m)
    absmax = channel_absmax(m, x, watched)

    def scale_for(*modules) -> torch.Tensor:
        r = torch.stack([absmax[id(t)] for t in modules]).amax(0).clamp_min(1e-8)
        return ((r.max() / r) ** alpha).clamp(max=max_scale)

    # Each watched tensor's output is multiplied channel-wise by the scale of the stream it
    # writes: its range after equalization is its range before times that scale.
    applied = {}
    s_prev = scale_for(features[0][-1])
    _rows(features[0][-1], s_prev)
    applied[id(features[0][-1])] = s_prev
    for b in features[1:]:
        tm, cm, se = b.token_mixer, b.channel_mixer.m, _se(b.token_mixer)
        dw = tm[0]
        if len(tm) == 3:    # downsampling block: dw (stride 2) [-> SE] -> pointwise -> residual FFN
            s_dw = scale_for(dw, *([se] if se else []))
            dw.weight.mul_((s_dw / s_prev).view(-1, 1, 1, 1))
            dw.bias.mul_(s_dw)
            if se:
                _columns(se.fc1, s_dw)
            _columns(tm[2], s_dw)
            s_out = scale_for(b.channel_mixer)
            _rows(tm[2], s_out)
            applied.update({id(dw): s_dw, **({id(se): s_dw} if se else {})})
        else:               # dw (identity folded in) [-> SE] -> residual FFN, one stream
            s_out = scale_for(dw, b.channel_mixer, *([se] if se else []))
            dw.weight.mul_((s_out / s_prev).view(-1, 1, 1, 1))
            dw.bias.mul_(s_out)
            if se:
                _columns(se.fc1, s_out)
            applied.update({id(dw): s_out, **({id(se): s_out} if se else {})})
        applied[id(b.channel_mixer)] = s_out
        _columns(cm[0], s_out)
        _rows(cm[2], s_out)
        s_prev = s_out
    _columns(m.classifier, s_prev)

    facts = {"method": f"residual-stream range equalization (alpha {alpha:g}, scales <= {max_scale:g})",
             "tensors": len(watched),
             "range_spread_before": median_spread(absmax),
             "range_spread_after": median_spread(ranges_after(absmax, applied))}
    return m, facts
