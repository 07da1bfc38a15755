"""How close post-training int8 stays to float, per format, with and without the
residual-stream equalization (pipeline/models/equalize.py), on the trained reference
(../shared/data/reference: RepViT-M0.9, CIFAR-10, 64x64; ``--checkpoint`` for another, e.g. bench/make_second_reference.py's): 256 training images calibrate,
the 10,000 test images are scored, the accuracy-aware pass is off so the rows compare the
quantization alone. Prints the top-1 drop against float with its paired standard error,
the top-1 agreement with float and the mean KL(float || int8) per image. Core ML rows are
simulated (MIL interpreter: int8 x int8 convs, fp16 elsewhere); ONNX and TFLite rows run in onnxruntime and LiteRT."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import add_checkpoint_option, disagreements_by_margin, model_title, reference_run, require_shared  # noqa: E402
from pipeline.app.deploy import deploy  # noqa: E402

ROWS = [("no equalization", ["quantize.equalize=false"]),
        ("equalized, alpha 0.5 (default)", [])]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eval-images", type=int, default=0, help="test images scored (0: all 10,000)")
    ap.add_argument("--formats", nargs="+", default=["coreml", "onnx", "tflite"])
    ap.add_argument("--extra", nargs="*", default=[], help="label=set1,set2 rows to add")
    ap.add_argument("--rows", nargs="*", type=int, default=None, help="built-in rows to run (indices; default all)")
    add_checkpoint_option(ap)
    args = ap.parse_args()
    require_shared()
    rows = ([r for i, r in enumerate(ROWS) if args.rows is None or i in args.rows]
            + [(e.split("=", 1)[0], e.split("=", 1)[1].split(",")) for e in args.extra])
    common = ["validate.latency_runs=3", "validate.threads=[1]", "validate.iphone=false",
              "quantize.max_drop=null", f"export.formats=[{','.join(args.formats)}]"]
    results = []
    for label, sets in rows:
        rep, _ = deploy(reference_run("int8", common + sets, "bench-int8-fidelity", args.eval_images, args.checkpoint))
        for a in rep["artifacts"]:
            results.append((a["format"], label, a["accuracy"]["drop_vs_float"], a["fidelity"], a["method"]))
    ref = rep["reference"]["accuracy"]
    print(f"\n{model_title(rep)}, CIFAR-10, {ref['n']} test images; float PyTorch top-1 "
          f"{100 * ref['top1']:.2f}% (measured). Core ML rows are simulated (MIL interpreter: int8 x int8 convs, fp16 elsewhere).")
    print(f"{'format':7} {'int8':32} {'drop, points':>14} {'agreement %':>12} {'mean KL':>9}")
    for fmt, label, drop, fid, method in sorted(results, key=lambda r: r[0]):
        print(f"{fmt:7} {label:32} {drop['points']:6.2f} ± {drop['standard_error']:.2f} "
              f"{100 * fid['top1_agreement']:12.2f} {fid.get('mean_kl', float('nan')):9.5f} [{method}]")
        if fid.get("agreement_by_float_margin"):
            print(f"        disagreements by float's top-1 - top-2 margin: {disagreements_by_margin(fid)}")


if __name__ == "__main__":
    main()
