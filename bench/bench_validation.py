"""Validation throughput at ImageNet scale: m0.9 int8 (224 px) through all three formats on
the 1,000-photo ImageNet sample (../shared/data/imagenet-sample.tar.gz, val/<wnid>/ layout),
then the same per-image costs extrapolated to the 50,000 ImageNet validation images.

The figures are the pipeline's own timings from one deploy: ``images`` (decode and crop,
DataLoader workers), ``reference`` (the float model) and ``validate.<format>`` (each
runtime, batched), each stage's wall time and, inside it, its scoring loop's (the measured
``throughput`` facts). The extrapolation counts each stage's set-up (loading a runtime,
latency timing) once and multiplies the per-image work by 50000 / n: per-image cost stays
flat because every stage streams from a memory-mapped file in batches. The PyTorch scorers
(float reference, Core ML simulation) run inductor-compiled (``validate.compile=always``,
what ``auto`` does from 5,000 images): their compile time and the eager run that checks
it, inside the first batch, are counted once as set-up. It is labelled extrapolated, next
to the cruder "every second times 50000 / n". Weights are seeded random (no official
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
    ap.add_argument("--compile", default="always", choices=["always", "never"], help="validate.compile")
    args = ap.parse_args()
    require_shared()
    import numpy as np
    import torch

    from pipeline.app.deploy import RunOptions, deploy
    from pipeline.runtimes.coreml import MilRuntime
    from pipeline.io.data import normalized
    from pipeline.io.checkpoints import load_model
    from pipeline.eval.timing import cpu_name

    val = unpacked("imagenet-sample.tar.gz", "imagenet-sample/val")
    opts = RunOptions(quant="int8", variant="m0.9", checkpoint="random", data=str(val),
                      artifacts=ROOT / "artifacts" / "bench-validation",
                      sets=("validate.latency_runs=3", "validate.threads=[1]", "validate.iphone=false",
                            "data.calib_images=64", "quantize.max_drop=null",
                            f"validate.processes={args.processes}", f"validate.compile={args.compile}"),
                      force=("images", "reference", "validate"))
    rep, _ = deploy(opts)
    seconds = {s["name"]: s["seconds"] for s in rep["stages"]}
    n = rep["artifacts"][0]["fidelity"]["n"]
    # Per-image work: decoding, and each runtime's scoring loop (the stages' measured
    # throughput). Set-up (opening a runtime, latency timing) is paid once however many images.
    def scoring(e):   # the scoring loop, less the compile and its eager check inside the first batch
        once = e.get("compiled") or {}
        return e["throughput"]["seconds"] - once.get("compile_s", 0.0) - once.get("check_s", 0.0)
    scoring_s = {"images": seconds["images"], "reference": scoring(rep["reference"]),
                 **{f"validate.{a['format']}": scoring(a) for a in rep["artifacts"]}}
    total = sum(seconds[s] for s in scoring_s)
    per_image = sum(scoring_s.values())
    scale = args.target_images / n
    print(f"\nm0.9 int8, 224 px, {n} ImageNet photos, {cpu_name()}, validate.processes={args.processes}, "
          "measured per stage:")
    print(f"  {'stage':16} {'stage s':>8} {'scoring s':>9} {'images/s':>9}")
    for s, t in scoring_s.items():
        print(f"  {s:16} {seconds[s]:8.1f} {t:9.1f} {n / t:9.1f}")
    print(f"  {'all':16} {total:8.1f} {per_image:9.1f}")
    flat = total * scale
    fitted = total + per_image * (scale - 1)
    print(f"  -> {args.target_images} images, EXTRAPOLATED from {n} measured: {fitted / 60:.1f} min "
          f"(set-up once, scoring x{scale:.1f}; goal <= 30 min); every second x{scale:.1f}: {flat / 60:.1f} min")
    reference = seconds["reference"] + scoring_s["reference"] * (scale - 1)
    print(f"     of which the three int8 formats and decoding: {(fitted - reference) / 60:.1f} min; "
          f"the float reference (once per make compare): {reference / 60:.1f} min")

    for e in (rep["reference"], *rep["artifacts"]):
        if e.get("compiled"):
            print(f"  {e.get('format', 'reference')}: {e['runtime']}; {e['compiled']}")

    # Core ML simulation vs PyTorch eager, same 256 images, batch 16 (compiled as in the
    # deploy; its compile, from inductor's disk cache by now, in a warm-up batch).
    folder = ROOT / "artifacts" / "bench-validation" / "m0.9-int8"
    pixels = np.load(next((ROOT / "artifacts" / "bench-validation" / "cache" / "images").glob("*/pixels.npy")),
                     mmap_mode="r")[:256]
    mil = MilRuntime(folder / "RepViT-M0.9-int8.mlpackage", {}, compile=args.compile == "always")
    mil.predict(np.asarray(pixels[:16]))
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
    print(f"  Core ML simulation ({mil.name}; int8 W8A8 program, fp16) {len(pixels) / t_mil:.1f} images/s vs PyTorch eager "
          f"fp32 {len(pixels) / t_torch:.1f} images/s: {t_torch / t_mil:.2f}x (goal >= 0.5x), measured")


if __name__ == "__main__":
    main()
