"""The accuracy-aware pass for OpenVINO int8: the pipeline's own (the most sensitive layers
kept in float, 1, 2, 4, ..., each try accepted only if it brings the outputs closer to float
by KL beyond the noise: pipeline/search/accuracy_aware.py) against nncf's
``quantize_with_accuracy_control`` (it ranks the quantized operations by their effect on a
validation metric and reverts them to float one by one until the drop is within
``max_drop``), on a trained CIFAR-10 RepViT (the shared reference, or ``--checkpoint``).

Both start from the same quantize stage (equalized model, 256 calibration images), quantize
with the same nncf settings (the recipe's ``export.openvino``), and check the budget on the
same held-out training images (``data.budget_images``; top-1 points, as the pipeline's
budget). Both results are then scored on all 10,000 test images in OpenVINO's CPU plugin (f32
inference precision): top-1 drop against float, agreement, mean KL(float || int8), the layers
left in float (read from the compiled model) and the wall time of each pass (measured)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import add_checkpoint_option, model_title, reference_run, require_shared  # noqa: E402
from pipeline.app.deploy import deploy  # noqa: E402
from pipeline.eval.metrics import kl_per_image, points_with_se, softmax  # noqa: E402


def stage_dir(folder: Path, rep: dict, name: str) -> Path:
    key = next(s["key"] for s in rep["stages"] if s["name"] == name)
    return folder.parent / "cache" / name / key


def score(compiled, pixels: np.ndarray, batch: int = 250) -> np.ndarray:
    return np.concatenate([compiled(np.ascontiguousarray(pixels[i:i + batch]))[0]
                           for i in range(0, len(pixels), batch)])


def summary(logits, ref, labels) -> str:
    p, q = softmax(ref), softmax(logits)
    drop, se = points_with_se((ref.argmax(1) == labels).astype(np.float64) - (logits.argmax(1) == labels))
    return (f"drop {drop:5.2f} ± {se:.2f} points, agreement {100 * (q.argmax(1) == p.argmax(1)).mean():.2f}%, "
            f"mean KL {kl_per_image(p, q).mean():.5f}")


def nncf_accuracy_control(quant: Path, meta: dict, cfg, max_drop: float):
    """nncf.quantize_with_accuracy_control on the quantize stage's model, calibration and
    budget images, with the exporter's own conversion and nncf settings."""
    import nncf
    import openvino as ov

    from pipeline.formats.openvino import OpenVINOExporter, quantization_parameters
    from pipeline.io.checkpoints import load_model
    from pipeline.runtimes.openvino import compile_config
    from pipeline.search.accuracy_aware import held_out

    model, _ = load_model(quant / "model.pt")
    ov_model = OpenVINOExporter.float_ir(model, meta)
    calibration = np.load(quant / "calibration_pixels.npy")
    pixels, labels = held_out(quant)

    def top1(compiled, items) -> float:
        return float(np.mean([compiled(x)[0].argmax(1)[0] == y for x, y in items]))

    kwargs = quantization_parameters(cfg)
    start = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        ov_model, nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))]),
        nncf.Dataset([(pixels[i:i + 1], labels[i]) for i in range(len(pixels))], lambda item: item[0]),
        top1, max_drop=max_drop / 100, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration),
        preset=kwargs["preset"], fast_bias_correction=kwargs["fast_bias_correction"],
        advanced_quantization_parameters=kwargs["advanced_parameters"])
    seconds = time.perf_counter() - start
    return ov.Core().compile_model(quantized, "CPU", compile_config(cfg.inference_precision, 0)), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-drop", type=float, default=0.1, help="top-1 points on the held-out images")
    add_checkpoint_option(ap)
    args = ap.parse_args()
    require_shared()
    import openvino as ov

    from pipeline.runtimes.openvino import compile_config, execution

    sets = ["validate.latency_runs=3", "validate.threads=[1]", "validate.iphone=false", "export.formats=[openvino]"]
    runs = {}
    for label, budget in (("no pass", "null"), ("pipeline's pass", str(args.max_drop))):
        start = time.perf_counter()
        rep, folder = deploy(reference_run("int8", sets + [f"quantize.max_drop={budget}"], "bench-accuracy-control",
                                           0, args.checkpoint))
        runs[label] = (rep, folder, time.perf_counter() - start)
    rep, folder, _ = runs["no pass"]
    from pipeline.stages.export import ExportConfig

    cfg = ExportConfig().openvino
    ref = np.load(stage_dir(folder, rep, "reference") / "logits.npy")
    images = stage_dir(folder, rep, "images")
    pixels, labels = np.load(images / "pixels.npy", mmap_mode="r"), np.load(images / "labels.npy")
    n_held_out = runs["pipeline's pass"][0]["artifacts"][0]["export"]["accuracy_aware"]["images"]
    print(f"\n{model_title(rep)}, CIFAR-10; budget {args.max_drop} top-1 points on {n_held_out} "
          f"held-out training images; scored on all "
          f"{len(labels)} test images in OpenVINO CPU (f32 inference precision), this machine (measured)")
    for label, (r, f, seconds) in runs.items():
        a = r["artifacts"][0]
        aware = a["export"].get("accuracy_aware") or {}
        compiled = ov.Core().compile_model(str(next((f / a["path"]).glob("*.xml"))), "CPU", compile_config("f32", 0))
        floats = execution(compiled)["float_layers"]
        print(f"{label:16} {summary(score(compiled, pixels), ref, labels)}; float layers {floats}; "
              f"pass: {aware.get('float_layers', [])!s:.80} ({aware.get('stopped') or 'budget met' if aware else '-'}); "
              f"deploy {seconds:.0f} s (cached stages included)")
    passed, passed_folder, _ = runs["pipeline's pass"]
    quant = stage_dir(passed_folder, passed, "quantize")   # with the held-out images
    compiled, seconds = nncf_accuracy_control(quant, rep["preprocess"] | {"classes": []}, cfg, args.max_drop)
    print(f"{'nncf qwac':16} {summary(score(compiled, pixels), ref, labels)}; float layers "
          f"{execution(compiled)['float_layers']}; quantize_with_accuracy_control {seconds:.0f} s")


if __name__ == "__main__":
    main()
