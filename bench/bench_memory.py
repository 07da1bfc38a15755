"""Peak resident memory of `make deploy` (int8, untrained weights, 224 px): the whole
default deploy, and each format alone, each in a fresh process with a fresh cache (the
peak of that process, from getrusage; measured on this machine). The goal: the default
deploy within 2 GB, whatever the number of calibration images."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_of(args: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of one deploy in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pipeline", "deploy", "--ckpt", "random", "--artifacts", tmp,
               "--set", "validate.latency_runs=5", *args]
        start = time.perf_counter()
        pid = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
        _, status, usage = os.wait4(pid, 0)
        if status != 0:
            raise SystemExit(f"deploy failed: {' '.join(cmd)}")
        return usage.ru_maxrss / 1024 / 1024, time.perf_counter() - start   # ru_maxrss: KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="m0.9")
    ap.add_argument("--quant", default="int8")
    args = ap.parse_args()
    base = ["--variant", args.variant, "--quant", args.quant]
    rows = [("all formats (default deploy)", base)]
    rows += [(f"{fmt} alone", base + ["--set", f"export.formats=[{fmt}]"]) for fmt in ("coreml", "onnx", "tflite")]
    print(f"measured: peak RSS of one `pipeline deploy` process, {args.variant} {args.quant}, "
          "untrained weights, 224 px, 256 calibration images, fresh cache")
    for label, a in rows:
        gb, s = peak_of(a)
        print(f"  {label:30} {gb:5.2f} GB  ({s:.0f} s)")


if __name__ == "__main__":
    main()
