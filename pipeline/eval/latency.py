"""iPhone latency of a Core ML program, in order of preference: measured on an attached
device (coremltools' on-device benchmarking, macOS), measured by the user with the
shipped Swift benchmark (imported JSON), or estimated by a small model fit to the
published RepViT latencies. The three are never mixed up: each says which it is."""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.resources import RESOURCES

FIT_DATA = RESOURCES / "iphone12_latency.json"
# Ops that are bookkeeping in the program, not work on the device's compute units.
NOT_COMPUTE = {"const", "cast", "classify", "quantize", "dequantize", "reshape"}
ESTIMATE_CAVEAT = (
    "estimated at fp16 speed: weight-only int8 and palettization do not speed up small CNNs "
    "on the Neural Engine, and W8A8 gains are documented only for newer chips (A16/A17 Pro), "
    "so no speed-up is assumed for compressed programs")


# ---------------------------------------------------------------- features of a program

def program_features(path: Path) -> dict:
    """GMACs (conv + linear), compute op count, weight MB and activation MB (fp16) of a
    saved ML program, read from its MIL (compression ops excluded: the same network)."""
    from pipeline.runtimes.mil import MilInterpreter

    interp = MilInterpreter(path)
    macs = act = 0
    ops = 0
    for op in interp.ops:
        t = op.op_type
        if t in NOT_COMPUTE or t.startswith("constexpr_"):
            continue
        ops += 1
        out = op.outputs[0].shape
        n_out = int(np.prod([int(d) for d in out])) if out else 1
        act += n_out
        if t == "conv":
            w = interp.consts[op.inputs["weight"].name]
            cin_per_group, kh, kw = w.shape[1:]
            macs += n_out * cin_per_group * kh * kw
        elif t == "linear":
            w = interp.consts[op.inputs["weight"].name]
            macs += n_out * w.shape[1]
    weights = sum(np.asarray(v).size for k, v in interp.consts.items() if hasattr(v, "shape") and np.asarray(v).size > 64)
    return {"gmacs": macs / 1e9, "ops": ops, "weights_m": weights / 1e6, "activations_m": act / 1e6}


# ---------------------------------------------------------------- the fitted model

@dataclass(frozen=True)
class LatencyModel:
    features: tuple[str, ...]
    coef: np.ndarray            # intercept first
    loo_mean_abs_ms: float
    loo_max_abs_ms: float
    ranges: dict                # feature -> (min, max) seen in the fit
    device: str
    source: str

    def predict(self, feats: dict) -> float:
        return float(self.coef[0] + sum(c * feats[f] for c, f in zip(self.coef[1:], self.features)))


def _design(rows: list[dict], features: tuple[str, ...]) -> np.ndarray:
    return np.array([[1.0] + [r[f] for f in features] for r in rows])


def _loo(rows: list[dict], features: tuple[str, ...]) -> np.ndarray:
    errs = []
    for i in range(len(rows)):
        train = rows[:i] + rows[i + 1:]
        coef, *_ = np.linalg.lstsq(_design(train, features), np.array([r["ms"] for r in train]), rcond=None)
        errs.append(_design([rows[i]], features) @ coef - rows[i]["ms"])
    return np.abs(np.concatenate(errs))


@lru_cache(maxsize=1)
def fitted() -> LatencyModel:
    """Least squares over the published latencies; among candidate feature sets, the one
    with the lowest leave-one-out error (six points allow no more than two features)."""
    data = json.loads(FIT_DATA.read_text())
    rows = [{**r["features"], "ms": r["published_ms"]} for r in data["variants"]]
    candidates = [("gmacs",), ("activations_m",), ("gmacs", "ops"), ("gmacs", "activations_m"),
                  ("activations_m", "ops")]
    scored = sorted(((float(_loo(rows, f).mean()), f) for f in candidates))
    best = scored[0][1]
    errs = _loo(rows, best)
    coef, *_ = np.linalg.lstsq(_design(rows, best), np.array([r["ms"] for r in rows]), rcond=None)
    ranges = {f: (min(r[f] for r in rows), max(r[f] for r in rows)) for f in best}
    return LatencyModel(best, coef, float(errs.mean()), float(errs.max()), ranges, data["device"], data["source"])


def estimate(path: Path) -> dict:
    """A report latency entry (method ``estimated``) for the program at ``path``."""
    model = fitted()
    feats = program_features(path)
    ms = model.predict(feats)
    outside = [f for f in model.features
               if not model.ranges[f][0] * 0.9 <= feats[f] <= model.ranges[f][1] * 1.1]
    terms = " + ".join(f"{c:.3g} x {f}" for c, f in zip(model.coef[1:], model.features))
    details = (f"linear model {model.coef[0]:.3g} + {terms} fit to the published RepViT latencies "
               f"({model.source}); leave-one-out error {model.loo_mean_abs_ms:.2f} ms mean, "
               f"{model.loo_max_abs_ms:.2f} ms max; {ESTIMATE_CAVEAT}")
    if outside:
        details += (f"; WARNING: {', '.join(outside)} outside the fitted range (the published "
                    "figures are all at 224x224): extrapolated, expect a larger error")
    return {"target": f"iPhone 12 ({model.device})", "runtime": "Core ML", "median_ms": max(ms, 0.0),
            "p90_ms": None, "method": "estimated", "details": details,
            "error_ms": {"loo_mean_abs": model.loo_mean_abs_ms, "loo_max_abs": model.loo_max_abs_ms},
            "extrapolated": bool(outside), "features": feats}


# ---------------------------------------------------------------- measured on a device

def measure_on_device(path: Path, runs: int = 50, compute_units: str = "ALL") -> Optional[dict]:
    """Run the program on an attached iPhone with coremltools' on-device benchmarking
    (macOS with Xcode only). None when that is not possible here."""
    if platform.system() != "Darwin":
        return None
    import asyncio

    import coremltools as ct
    from coremltools.models.ml_program.experimental.perf_utils import MLModelBenchmarker
    from coremltools.models.ml_program.experimental.remote_device import Device, DeviceType

    devices = Device.get_connected_devices(DeviceType.IPHONE)
    if not devices:
        return None

    async def bench():
        device = await devices[0].prepare_for_model_debugging()
        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        benchmarker = MLModelBenchmarker(model=model, device=device)
        return device, await benchmarker.benchmark_predict(iterations=runs, warmup=True)

    device, m = asyncio.run(bench())
    samples = sorted(m.samples)
    return {"target": f"iPhone ({getattr(device, 'name', 'attached device')})", "runtime": "Core ML",
            "median_ms": m.statistics.median, "p90_ms": samples[int(0.9 * (len(samples) - 1))],
            "method": "measured", "details": f"on device via coremltools MLModelBenchmarker, "
                                            f"{compute_units} compute units, {runs} runs after warm-up; "
                                            f"device {device}"}


# ---------------------------------------------------------------- measured by the user

def import_measurement(report_path: Path, measurement_path: Path) -> dict:
    """Merge a JSON written by the shipped Swift benchmark into a deploy's report."""
    m = json.loads(Path(measurement_path).read_text())
    required = {"device", "os", "compute_units", "model", "median_ms", "p90_ms", "runs"}
    missing = required - m.keys()
    if missing:
        raise ValueError(f"{measurement_path}: not a RepViTBench result, missing {', '.join(sorted(missing))}")
    report = json.loads(Path(report_path).read_text())
    targets = [a for a in report["artifacts"] if a["format"] == "coreml"
               and Path(a["path"]).stem == Path(m["model"]).stem]
    if not targets:
        raise ValueError(f"{measurement_path} measured {m['model']}, which is not an artifact of "
                         f"{report_path}")
    entry = {"target": f"{m['device']} ({m['os']})", "runtime": "Core ML", "median_ms": m["median_ms"],
             "p90_ms": m["p90_ms"], "method": "measured",
             "details": f"measured by the user with RepViTBench, {m['compute_units']} compute units, "
                        f"{m['runs']} runs"}
    lat = targets[0]["latency"]
    lat[:] = [l for l in lat if l["target"] != entry["target"]] + [entry]
    return report
