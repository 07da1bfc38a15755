"""Reading RepViT checkpoints of every common layout, safely, with errors that say what to do.

Layouts: the official release (``{"model": sd, ...}``, with or without the
distillation head), timm (``stem.``/``stages.``/``head.`` keys), a bare state dict,
DDP-prefixed state dicts, and this pipeline's own checkpoints; each as a ``torch.save``
file or as ``.safetensors`` (timm's and the Hugging Face hub's format).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.models.reparam import is_fused, reparameterize
from pipeline.models.repvit import RepViT, block_specs, create_model
from pipeline.variants import VARIANTS, Variant, get_variant

PIPELINE_FORMAT = "repvit-pipeline/1"
# Preprocessing and label facts a checkpoint may carry (as the shared reference does).
META_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "classes")


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]   # official key layout
    layout: str                          # official | timm | bare | pipeline
    meta: dict[str, Any] = field(default_factory=dict)
    variant_hint: Optional[str] = None   # what the file says it is

    @property
    def fused(self) -> bool:
        return bool(self.meta.get("fused"))

    @property
    def num_classes(self) -> int:
        key = "classifier.weight" if self.fused else "classifier.classifier.l.weight"
        return self.state_dict[key].shape[0]

    @property
    def distillation(self) -> bool:
        return "classifier.classifier_dist.l.weight" in self.state_dict


# ---------------------------------------------------------------- reading the file

def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (path.suffix == ".safetensors" or
            len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size)


def _read_safetensors(path: Path, size: int) -> dict:
    """A safetensors file as a state dict (it holds tensors only: nothing to execute)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} ({size:,} bytes) is not a readable safetensors file: it is truncated or "
            "corrupt (an interrupted download, a partial copy). Delete it and fetch it again. "
            f"(safetensors said: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def read_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``, or safetensors, with the failure modes turned
    into advice."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if is_safetensors(path):
        return _read_safetensors(path, size)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise CheckpointError(
                f"{path} ({size:,} bytes) is not a readable PyTorch checkpoint: it is truncated "
                "or corrupt, or not a checkpoint at all. Delete it and fetch it again. "
                f"(torch said: {str(e).splitlines()[0]})") from None
        raise CheckpointError(
            f"{path} holds pickled Python objects that need code to load, and this pipeline "
            "loads checkpoints with torch.load(weights_only=True) so that a file can never run "
            "code. Re-save the weights alone: torch.save({'model': model.state_dict()}, path). "
            f"(torch said: {str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path} ({size:,} bytes) is not a readable PyTorch checkpoint: it is truncated or "
            "corrupt (an interrupted download, a partial copy). Delete it and fetch it again. "
            f"(torch said: {str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- key layouts

def _timm_prefix_map(variant: Variant) -> dict[str, str]:
    """Official module prefix -> timm module prefix, for every block of ``variant``."""
    mapping = {"features.0.0": "stem.conv1", "features.0.2": "stem.conv2",
               "classifier.classifier": "head.head", "classifier.classifier_dist": "head.head_dist"}
    stride1 = {"token_mixer.0": "token_mixer", "token_mixer.1": "se",
               "channel_mixer.m.0": "channel_mixer.conv1", "channel_mixer.m.2": "channel_mixer.conv2"}
    down = {"token_mixer.0": "spatial_downsample", "token_mixer.2": "channel_downsample",
            "channel_mixer.m.0": "ffn.conv1", "channel_mixer.m.2": "ffn.conv2"}
    idx = 1
    for s, depth in enumerate(variant.depth):
        if s > 0:
            for a, b in down.items():
                mapping[f"features.{idx}.{a}"] = f"stages.{s}.downsample.{b}"
            idx += 1
        targets = [f"stages.{s}.blocks.{j}" for j in range(depth)]
        if s < len(variant.depth) - 1:
            targets.append(f"stages.{s + 1}.downsample.pre_block")
        for t in targets:
            for a, b in stride1.items():
                mapping[f"features.{idx}.{a}"] = f"{t}.{b}"
            idx += 1
    return mapping


def rename_prefixes(sd: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename each key by the longest module prefix found in ``mapping``."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in mapping:
                key = mapping[prefix] + "." + ".".join(parts[i:])
                break
        out[key] = value  # an unmapped key is left for the strict check to report
    return out


def timm_to_official(sd: dict[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    return rename_prefixes(sd, {t: o for o, t in _timm_prefix_map(variant).items()})


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_legacy(sd: dict[str, torch.Tensor]) -> bool:
    """First-version RepVGGDW: a BatchNorm on the 1x1 branch (``conv1.bn``), official or timm keys."""
    return any(re.search(r"token_mixer(\.0)?\.conv1\.bn\.weight$", k) for k in sd)


def _timm_signature(sd: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(embed_dim, depth) read off timm keys."""
    depths: dict[int, int] = {}
    for k in sd:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            s, j = int(m[1]), int(m[2])
            depths[s] = max(depths.get(s, 0), j + 1)
    dims = {}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.blocks\.0\.token_mixer\.conv\.c\.weight$", k)
        if m:
            dims[int(m[1])] = v.shape[0]
    if not depths or sorted(depths) != sorted(dims):
        return None
    order = sorted(depths)
    return tuple(dims[s] for s in order), tuple(depths[s] for s in order)


def _official_signature(sd: dict[str, torch.Tensor]) -> list[tuple[int, int, int, bool]]:
    """Per block: (in, out, stride, has SE), read off official keys."""
    sig = []
    i = 1
    while f"features.{i}.channel_mixer.m.0.c.weight" in sd:
        p = f"features.{i}."
        hidden = sd[p + "channel_mixer.m.0.c.weight"]
        down = p + "token_mixer.2.c.weight" in sd
        if down:
            inp, oup = sd[p + "token_mixer.0.c.weight"].shape[0], sd[p + "token_mixer.2.c.weight"].shape[0]
        else:
            inp = oup = hidden.shape[1]
        has_se = any(k.startswith(p + "token_mixer.1.fc1") for k in sd)
        sig.append((inp, oup, 2 if down else 1, has_se))
        i += 1
    return sig


def guess_variant(sd: dict[str, torch.Tensor]) -> Optional[str]:
    """The variant whose block structure matches an official-layout state dict."""
    sig, legacy = _official_signature(sd), _is_legacy(sd)
    for name, v in VARIANTS.items():
        if v.legacy == legacy and sig == [(b.inp, b.oup, b.stride, b.use_se) for b in block_specs(v)]:
            return name
    return None


def _guess_timm_variant(sd: dict[str, torch.Tensor]) -> Optional[Variant]:
    sig, legacy = _timm_signature(sd), _is_legacy(sd)
    for v in VARIANTS.values():
        if v.legacy == legacy and sig == (v.embed_dim, v.depth):
            return v
    return None


def parse(obj: Any, source: str = "checkpoint") -> Checkpoint:
    """Normalize whatever ``torch.load`` returned into an official-layout ``Checkpoint``."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict (a state dict or {{'model': ...}}), "
                              f"got {type(obj).__name__}")
    meta = {k: obj[k] for k in META_KEYS if k in obj}
    hint = obj.get("variant")
    if obj.get("format") == PIPELINE_FORMAT:
        meta.update(obj.get("meta", {}))
        return Checkpoint(dict(obj["state_dict"]), "pipeline", meta, hint)
    layout = "official"
    sd = None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            break
    if sd is None:
        sd, layout = obj, "bare"
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: the state dict holds values that are not tensors")
    sd = _strip_prefixes(dict(sd))
    if any(k.startswith(("stem.", "stages.")) for k in sd):
        v = get_variant(hint) if hint else _guess_timm_variant(sd)
        if v is None:
            raise CheckpointError(
                f"{source}: timm-layout keys, but stage widths/depths {_timm_signature(sd)} "
                f"match no RepViT variant ({', '.join(VARIANTS)})")
        sd, layout, hint = timm_to_official(sd, v), "timm", hint or v.name
    if "classifier.classifier.l.weight" not in sd:
        raise CheckpointError(
            f"{source}: no classifier weights (classifier.classifier.l.weight); this does not "
            f"look like a RepViT classifier checkpoint. First keys: {', '.join(list(sd)[:5])}")
    return Checkpoint(sd, layout, meta, hint)


# ---------------------------------------------------------------- building a model

def _mismatch_report(model: RepViT, sd: dict[str, torch.Tensor], limit: int = 5) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:limit])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:limit])}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), first: {'; '.join(shapes[:limit])}")
    return "; ".join(parts)


def build_model(ckpt: Checkpoint, variant: Variant | str | None = None,
                source: str = "checkpoint") -> RepViT:
    """A training-time RepViT with ``ckpt`` loaded strictly; classes and heads from the file."""
    guessed = None if ckpt.fused else guess_variant(ckpt.state_dict)
    chosen = variant or ckpt.variant_hint or guessed
    if chosen is None:
        raise CheckpointError(f"{source}: its structure matches no RepViT variant "
                              f"({', '.join(VARIANTS)}); name one explicitly")
    v = get_variant(chosen) if isinstance(chosen, str) else chosen
    model = create_model(v, ckpt.num_classes, ckpt.distillation and not ckpt.fused)
    if ckpt.fused:
        model = reparameterize(model)
    report = _mismatch_report(model, ckpt.state_dict)
    if report:
        advice = (f"this checkpoint looks like {guessed}: use VARIANT={guessed}"
                  if guessed and guessed != v.name else
                  "check that the file is a RepViT checkpoint of this variant")
        raise CheckpointError(f"{source} does not fit {v.title}: {report}. {advice}.")
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()


def load_model(path: str | Path, variant: Variant | str | None = None) -> tuple[RepViT, Checkpoint]:
    """Model (training-time, or fused for a fused pipeline checkpoint) and what the file said."""
    ckpt = parse(read_file(path), source=str(path))
    return build_model(ckpt, variant, source=str(path)), ckpt


def save_pipeline_checkpoint(path: str | Path, model: RepViT, meta: dict[str, Any] | None = None) -> None:
    """This pipeline's checkpoint: weights plus the facts a later stage needs."""
    meta = {**(meta or {}), "fused": is_fused(model)}
    torch.save({"format": PIPELINE_FORMAT, "variant": model.variant.name,
                "state_dict": model.state_dict(), "meta": meta}, path)
