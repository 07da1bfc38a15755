"""Regenerates pipeline/resources/iphone12_latency.json: per-variant features of the
converted Core ML program (fp16, iOS17, 224x224, read back from the saved package) next to
the published iPhone 12 latencies. The latency model is fit from this file at run time.
Takes about a minute (six conversions)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.eval.latency import FIT_DATA, fitted, program_features
from pipeline.formats.base import ExportContext
from pipeline.formats.coreml import CoreMLConfig, CoreMLExporter
from pipeline.models import create_model, reparameterize
from pipeline.variants import VARIANTS


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, v in VARIANTS.items():
            fused = reparameterize(create_model(v, seed=0))
            meta = {"input_size": 224, "crop_pct": v.crop_pct, "interpolation": v.interpolation,
                    "mean": list(v.mean), "std": list(v.std), "classes": [str(i) for i in range(1000)],
                    "weights": {}}
            path = Path(tmp) / f"{name}.mlpackage"
            CoreMLExporter().export(fused, ExportContext("fp16", meta, name, path), CoreMLConfig())
            feats = program_features(path)
            rows.append({"variant": name, "published_ms": v.published.iphone12_ms, "features": feats})
            print(name, v.published.iphone12_ms, feats)
    FIT_DATA.write_text(json.dumps({
        "device": "A14 Bionic, Neural Engine", "source": "RepViT README / paper: iPhone 12, iOS 16, "
        "Core ML, Xcode 14 performance report", "variants": rows}, indent=1))
    fitted.cache_clear()
    m = fitted()
    print(f"model: {m.features} coef {m.coef}; leave-one-out |error| mean {m.loo_mean_abs_ms:.3f} ms, "
          f"max {m.loo_max_abs_ms:.3f} ms")


if __name__ == "__main__":
    main()
