"""Host latency ratios of the shipped artifacts (int8 and fp16 vs fp32), batch 1, each
pair measured alternating in one process (these machines are noisy: only ratios in one
run mean anything). Also the wall time of `make deploy` cold and warm."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import sample_images  # noqa: E402
from pipeline.deploy import RunOptions, deploy  # noqa: E402
from pipeline.runtimes import open_runtime  # noqa: E402
from pipeline.stages.reparam import preprocess_of  # noqa: E402
from pipeline.stages.validate import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def alternate(a, b, pixel, runs):
    ta, tb = [], []
    for _ in range(10):
        a.predict(pixel), b.predict(pixel)
    for _ in range(runs):
        for rt, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            rt.predict(pixel)
            times.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="m0.9")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    out = ROOT / "artifacts" / "bench-latency"
    log = lambda m: None  # noqa: E731
    base = dict(variant=args.variant, checkpoint="random", artifacts=out,
                sets=("export.formats=[onnx,tflite]", "validate.latency_runs=5"))
    reports = {q: deploy(RunOptions(quant=q, **base), log) for q in ("fp32", "fp16", "int8")}
    meta = reports["fp32"][0]["preprocess"] | {"classes": []}
    pixel = preprocess_of(meta).pixels(sample_images(1)[0])[None]
    print(f"measured: {cpu_name()}, RepViT-{args.variant.upper()} (untrained weights: speed only), "
          f"{meta['input_size']}px, batch 1, {args.runs} alternating runs per pair, medians")
    print(f"{'format':7} {'threads':>7} {'scheme':6} {'ms':>7} {'fp32 ms':>8} {'ratio':>6}")
    for fmt in ("onnx", "tflite"):
        for threads in args.threads:
            for q in ("fp16", "int8"):
                paths = {}
                for s in ("fp32", q):
                    rep, folder = reports[s]
                    a = next(a for a in rep["artifacts"] if a["format"] == fmt)
                    paths[s] = folder / a["path"]
                f32 = open_runtime(fmt, paths["fp32"], meta, threads)
                other = open_runtime(fmt, paths[q], meta, threads)
                t32, tq = alternate(f32, other, pixel, args.runs)
                print(f"{fmt:7} {threads:>7} {q:6} {tq:7.2f} {t32:8.2f} {tq / t32:6.2f}")
    # make deploy wall time, cold (fresh cache) and warm (everything cached)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["make", "-s", "deploy", f"PY={sys.executable}", f"VARIANT={args.variant}", "QUANT=int8",
               "CKPT=random", f"ARTIFACTS={tmp}"]
        times = []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
    print(f"make deploy VARIANT={args.variant} QUANT=int8: cold {times[0]:.1f} s, warm {times[1]:.2f} s "
          f"(measured wall time, this machine)")


if __name__ == "__main__":
    main()
