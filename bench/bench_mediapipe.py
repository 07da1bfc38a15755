"""The shipped .tflite in MediaPipe Tasks' ImageClassifier, on the trained reference
(../shared/data/reference: RepViT-M0.9, CIFAR-10, 64 px): fp32, fp16 and int8 deployed by
the pipeline (LiteRT top-1 from its report), then every test image, preprocessed as the
pipeline does (resize, centre crop to 64x64), classified by MediaPipe from its uint8 RGB
pixels. Prints MediaPipe's top-1 next to the report's LiteRT top-1 and how many images the
two disagree on. Needs MediaPipe (the test extras) and ../shared/data."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import reference_run, require_shared, unpacked  # noqa: E402
from pipeline.io.data import DataConfig, load_pixels, resolve_sets  # noqa: E402
from pipeline.app.deploy import deploy  # noqa: E402
from pipeline.runtimes.litert import run_tflite  # noqa: E402
from pipeline.core.progress import Progress  # noqa: E402
from pipeline.io.data import preprocess_of  # noqa: E402


def mediapipe_top1(path: Path, pixels: np.ndarray, classes: list[str]) -> np.ndarray:
    import mediapipe as mp
    from mediapipe.tasks import python as tasks
    from mediapipe.tasks.python import vision

    index = {c: i for i, c in enumerate(classes)}
    options = vision.ImageClassifierOptions(base_options=tasks.BaseOptions(model_asset_path=str(path)),
                                            max_results=1)
    top1 = []
    with vision.ImageClassifier.create_from_options(options) as clf, \
            Progress(len(pixels), f"MediaPipe {path.name}") as bar:
        for p in pixels:
            cats = clf.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(p)))
            top1.append(index[cats.classifications[0].categories[0].category_name])
            bar.update(1)
    return np.asarray(top1)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quants", nargs="+", default=["fp32", "fp16", "int8"])
    ap.add_argument("--eval-images", type=int, default=0, help="0: all 10,000 test images")
    args = ap.parse_args()
    require_shared()
    cifar = unpacked("cifar10-jpg.tar.gz", "cifar10")
    sets = ["export.formats=[tflite]", "validate.latency_runs=5", "validate.threads=[1]"]
    rows = []
    for q in args.quants:
        rep, folder = deploy(reference_run(q, sets, "bench-mediapipe", args.eval_images))
        (art,) = rep["artifacts"]
        meta = {**rep["preprocess"], "classes": None}
        classes = (folder / "labels.txt").read_text().split()
        data = resolve_sets(DataConfig(eval=str(cifar / "test"), calib=str(cifar / "train"),
                                       eval_images=args.eval_images or None), classes)
        pixels = load_pixels(data.eval, preprocess_of(meta))
        labels = np.asarray(data.eval.labels)
        start = time.perf_counter()
        theirs = mediapipe_top1(folder / art["path"], pixels, classes)
        seconds = time.perf_counter() - start
        ours = run_tflite(folder / art["path"], pixels).argmax(1)
        rows.append((q, 100 * art["accuracy"]["top1"], 100 * (theirs == labels).mean(),
                     int((theirs != ours).sum()), len(labels), seconds))
    print(f"\nRepViT-M0.9 CIFAR-10 reference, {rows[0][4]} test images, MediaPipe Tasks ImageClassifier "
          "(measured, this machine) vs the pipeline's LiteRT top-1 (report.json)")
    print(f"{'scheme':6} {'LiteRT top-1 %':>15} {'MediaPipe top-1 %':>18} {'differ':>7} {'MediaPipe s':>12}")
    for q, lite, mp_top1, differ, n, s in rows:
        print(f"{q:6} {lite:15.2f} {mp_top1:18.2f} {differ:7d} {s:12.1f}")


if __name__ == "__main__":
    main()
