"""Validation throughput at ImageNet scale: m0.9 int8 (224 px) through all three formats on
the 1,000-photo ImageNet sample (../shared/data/imagenet-sample.tar.gz, val/<wnid>/ layout),
then the same per-image costs extrapolated to the 50,000 ImageNet validation images.

The figures are the pipeline's own stage timings from one deploy: ``images`` (decode and
crop, DataLoader workers), ``reference`` (the float model, PyTorch) and ``validate.<format>``
(each runtime, batched; latency timing included). The extrapolation multiplies by 50: it
assumes the per-image cost stays flat (it does: every stage streams from a memory-mapped
file in batches) and is labelled extrapolated. Weights are seeded random (no official
weights offline), which changes no timing. Also prints the Core ML simulation's throughput
next to PyTorch eager on the same images (the issue's 0.5x goal)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import ROOT, require_shared, unpacked  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target-images", type=int, default=50_000)
    ap.add_argument("--processes", type=int, default=1, help="validate.processes: torchrun processes per format")
    args = ap.parse_args()
    require_shared()
    import numpy as np
    import torch

    from pipeline.deploy import RunOptions, deploy, log_stderr
    from pipeline.runtimes import MilRuntime
    from pipeline.formats import normalized
    from pipeline.checkpoints import load_model
    from pipeline.stages.validate import cpu_name

    val = unpacked("imagenet-sample.tar.gz", "imagenet-sample/val")
    opts = RunOptions(quant="int8", variant="m0.9", checkpoint="random", data=str(val),
                      artifacts=ROOT / "artifacts" / "bench-validation",
                      sets=("validate.latency_runs=3", "validate.threads=[1]", "validate.iphone=false",
                            "data.calib_images=64", "quantize.max_drop=null",
                            f"validate.processes={args.processes}"),
                      force=("images", "reference", "validate"))
    rep, _ = deploy(opts, log_stderr)
    seconds = {s["name"]: s["seconds"] for s in rep["stages"]}
    n = rep["artifacts"][0]["fidelity"]["n"]
    scoring = ["images", "reference"] + [f"validate.{a['format']}" for a in rep["artifacts"]]
    total = sum(seconds[s] for s in scoring)
    print(f"\nm0.9 int8, 224 px, {n} ImageNet photos, {cpu_name()}, validate.processes={args.processes}, "
          "measured per stage:")
    for s in scoring:
        print(f"  {s:16} {seconds[s]:7.1f} s  {n / seconds[s]:7.1f} images/s")
    scale = args.target_images / n
    print(f"  {'all':16} {total:7.1f} s  -> {args.target_images} images: {total * scale / 60:.1f} min "
          f"(EXTRAPOLATED x{scale:g} from {n} measured; goal <= 30 min)")

    # Core ML simulation vs PyTorch eager, same 256 images, batch 16.
    folder = ROOT / "artifacts" / "bench-validation" / "m0.9-int8"
    pixels = np.load(next((ROOT / "artifacts" / "bench-validation" / "cache" / "images").glob("*/pixels.npy")),
                     mmap_mode="r")[:256]
    mil = MilRuntime(folder / "RepViT-M0.9-int8.mlpackage", {})
    fused, ckpt = load_model(next((ROOT / "artifacts" / "bench-validation" / "cache" / "reparam").glob("*/fused.pt")))
    t = time.perf_counter()
    for s in range(0, len(pixels), 16):
        mil.predict(np.asarray(pixels[s:s + 16]))
    t_mil = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(pixels), 16):
            fused(torch.from_numpy(normalized(np.asarray(pixels[s:s + 16]), ckpt.meta)))
    t_torch = time.perf_counter() - t
    print(f"  Core ML simulation (int8 W8A8 program, fp16) {len(pixels) / t_mil:.1f} images/s vs PyTorch eager "
          f"fp32 {len(pixels) / t_torch:.1f} images/s: {t_torch / t_mil:.2f}x (goal >= 0.5x), measured")


if __name__ == "__main__":
    main()
