"""Which activation ranges keep int8 closest to float? Each format's calibration options
(after the residual-stream equalization, which is on by default) on the trained reference (../shared/data/reference: RepViT-M0.9, CIFAR-10, 64x64; ``--checkpoint`` for another, e.g. bench/make_second_reference.py's), through
the pipeline: 256 training images calibrate, test images are scored, the accuracy-aware
pass is off (``quantize.max_drop=null``) so the rows compare the ranges alone. Prints the
top-1 drop against float with its standard error (paired) and the top-1 agreement with
float, the less noisy of the two; the defaults in recipes/base.yaml were chosen from it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import add_checkpoint_option, model_title, reference_run, require_shared  # noqa: E402
from pipeline.app.deploy import deploy  # noqa: E402

# (format, what, recipe overrides); the shipped default is the row without overrides.
CHOICES = [
    ("coreml", "min/max, symmetric", ["export.coreml.activation_observer=min_max"]),
    ("coreml", "moving-average min/max, symmetric (default)", []),
    ("coreml", "EMA min/max, symmetric", ["export.coreml.activation_observer=ema_min_max"]),
    ("coreml", "min/max, affine", ["export.coreml.activation_observer=min_max",
                                   "export.coreml.quantization_scheme=affine"]),
    ("coreml", "moving-average min/max, affine", ["export.coreml.quantization_scheme=affine"]),
    ("coreml", "percentile 99 of each image's min/max", ["export.coreml.activation_percentile=99"]),
    ("onnx", "min/max", ["export.onnx.calibration=minmax"]),
    ("onnx", "percentile 99.99", ["export.onnx.percentile=99.99"]),
    ("onnx", "percentile 99.999 (default)", []),
    ("onnx", "percentile 99.999, all images at once", ["export.onnx.calibration_stride=0"]),
    ("onnx", "entropy", ["export.onnx.calibration=entropy"]),
    ("onnx", "percentile 99.999, 1024 calibration images", ["data.calib_images=1024"]),
    ("tflite", "percentile 99 of each image's min/max (default)", []),
    ("tflite", "percentile 99, 1024 calibration images", ["data.calib_images=1024"]),
    ("tflite", "min/max over all images", ["export.tflite.calibration=min_max"]),
    ("tflite", "min/max over all images, 1024 calibration images", ["export.tflite.calibration=min_max",
                                                                    "data.calib_images=1024"]),
    ("tflite", "moving average of each image's min/max", ["export.tflite.calibration=moving_average"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eval-images", type=int, default=0, help="test images scored (0: all 10,000)")
    ap.add_argument("--formats", nargs="+", default=["coreml", "onnx", "tflite"])
    add_checkpoint_option(ap)
    args = ap.parse_args()
    require_shared()
    common = ["validate.latency_runs=3", "validate.threads=[1]", "quantize.max_drop=null"]
    rows = []
    for fmt, what, sets in CHOICES:
        if fmt not in args.formats:
            continue
        rep, _ = deploy(reference_run("int8", common + [f"export.formats=[{fmt}]"] + sets, "bench-calibration",
                                      args.eval_images, args.checkpoint))
        (a,) = rep["artifacts"]
        rows.append((fmt, what, a["accuracy"]["drop_vs_float"], a["fidelity"]["top1_agreement"], a["method"]))
        print(f"{fmt} {what}: {rows[-1][2]} {rows[-1][3]}", file=sys.stderr)
    ref = rep["reference"]["accuracy"]
    print(f"\n{model_title(rep)}, CIFAR-10, {ref['n']} test images; float PyTorch top-1 "
          f"{100 * ref['top1']:.2f}% (measured). Core ML rows are simulated (MIL interpreter: int8 x int8 convs, fp16 elsewhere); "
          "ONNX rows are measured in onnxruntime.")
    print(f"{'format':7} {'activation ranges':50} {'drop, points':>14} {'agreement %':>12}")
    for fmt, what, drop, agreement, method in rows:
        print(f"{fmt:7} {what:50} {drop['points']:6.2f} ± {drop['standard_error']:.2f} "
              f"{100 * agreement:12.2f} [{method}]")


if __name__ == "__main__":
    main()
