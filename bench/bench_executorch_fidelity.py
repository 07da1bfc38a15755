"""The ExecuTorch XNNPACK int8 .pte against the int8 .tflite, image by image: the mean
per-image KL(float || int8) of each on all scored images and the paired difference with
its standard error (is the .pte's KL no worse than the .tflite's beyond the noise?).

Reads a deploy folder that holds both (bench_int8_fidelity.py --formats executorch tflite
writes one) and its stage cache: the scored pixels, the float reference's logits. Both
artifacts run in their own runtimes (ExecuTorch, LiteRT) on this machine (measured).

    python bench/bench_executorch_fidelity.py artifacts/bench-int8-fidelity/m0.9-int8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.metrics import kl_per_image, softmax  # noqa: E402
from pipeline.runtimes import open_runtime  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    rep = json.loads((args.folder / "report.json").read_text())
    cache = args.folder.parent / "cache"
    key = {s["name"]: s["key"] for s in rep["stages"]}
    pixels = np.load(next((cache / "images").glob(f"{key['images'][:20]}*")) / "pixels.npy", mmap_mode="r")
    ref = softmax(np.load(next((cache / "reference").glob(f"{key['reference'][:20]}*")) / "logits.npy"))
    meta = rep["preprocess"] | {"classes": []}
    kl = {}
    for fmt in ("executorch", "tflite"):
        a = next(a for a in rep["artifacts"] if a["format"] == fmt)
        rt = open_runtime(fmt, args.folder / a["path"], meta, threads=2)
        scores = np.concatenate([rt.predict(np.asarray(pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
        kl[fmt] = kl_per_image(ref, scores if rt.outputs == "probabilities" else softmax(scores))
        print(f"{fmt:10} mean KL {kl[fmt].mean():.5f} ({rt.name}, measured)")
    d = kl["executorch"] - kl["tflite"]
    print(f"ExecuTorch - TFLite, paired over {len(d)} images: {d.mean():+.5f} ± {d.std(ddof=1) / np.sqrt(len(d)):.5f} "
          "(1 s.e.)")


if __name__ == "__main__":
    main()
