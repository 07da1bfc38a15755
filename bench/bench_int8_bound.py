"""How far is W8A8 from the fidelity goals, whatever its ranges? A simulation of the
equalized model (torchao PT2E fake quantization: the QAT student's graph, int8 weights per
channel, activations per tensor at conv / linear inputs and outputs and residual adds), on
the trained reference (``--checkpoint`` for another). For three range statistics it
scores the same ranges at 8, 9 and 10 activation bits (finer steps, nothing else changed),
so that a goal can be read as "the fidelity of N-bit activations"; then, at 8 bits, each
kind of tensor left in float in turn (where the loss is made), and int8 weights alone.
Those figures are simulated (fp32 PyTorch on this CPU), not measured in a runtime; each
format's own quantizer picks its own tensors and ranges (bench_int8_fidelity measures those).

Last, what wider activations would cost where they exist (``--no-latency`` skips it):
int8 weights with 16-bit activations, made by each library's own quantizer
(onnxruntime's ``quantize_static`` with uint16 activations, ai-edge-quantizer's
``static_wi8_ai16``) from bench_latency's fp32 artifacts, timed against the fp32 and int8
ones (measured, this CPU, 1 thread, batch 1, alternating runs; calibration on noise: speed
only). Core ML has no wider activation type (coremltools quantizes activations to 8 bits).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import add_checkpoint_option, latency_artifacts, reference_run, require_shared  # noqa: E402
from pipeline.app.deploy import resolve_recipe  # noqa: E402
from pipeline.app.plan import SCORING, STAGES  # noqa: E402
from pipeline.app.report import execution_line  # noqa: E402
from pipeline.core.quiet import quiet  # noqa: E402
from pipeline.core.runner import Cache, run_stages  # noqa: E402
from pipeline.eval.metrics import agreement_by_float_margin, kl_per_image, softmax  # noqa: E402
from pipeline.eval.timing import alternate_latency, cpu_name  # noqa: E402
from pipeline.formats.onnx import execution as onnx_execution  # noqa: E402
from pipeline.formats.tflite import FLOAT_ENDS, execution as tflite_execution  # noqa: E402
from pipeline.io.checkpoints import load_model  # noqa: E402
from pipeline.io.data import normalized_tensor  # noqa: E402
from pipeline.quant.fakequant import (TorchaoPT2E, activation_fake_quants, fake_quant_range,  # noqa: E402
                                      set_percentile_ranges)
from pipeline.runtimes import open_runtime  # noqa: E402

# (what, percentile, of all values): the statistics the formats calibrate with.
STATISTICS = [
    ("percentile 99 of the images' extremes (TFLite default, QAT)", 99.0, False),
    ("percentile 99.999 of all values (onnxruntime default)", 99.999, True),
    ("min/max over the calibration images", 100.0, False),
]
BITS = (8, 9, 10)


def prepared_run(args):
    """The equalized fused model, its calibration images and the scored images with the
    float model's logits, through the pipeline's own cached stages."""
    opts = reference_run("int8", ["quantize.max_drop=null"], "bench-int8-fidelity", args.eval_images,
                         args.checkpoint)
    recipe = resolve_recipe(opts)
    stages = [STAGES[n] for n in ("load", "reparam", "quantize")] + SCORING
    records = run_stages(stages, recipe.sections, Cache(opts.artifacts / "cache"))
    quant = records["quantize"].dir
    model, ckpt = load_model(quant / "model.pt")

    def tensor(pixels):
        return normalized_tensor(pixels, ckpt.meta["mean"], ckpt.meta["std"]).contiguous()

    logits = np.load(records["reference"].dir / "logits.npy")
    pixels = np.load(records["images"].dir / "pixels.npy", mmap_mode="r")
    title = f"RepViT-{recipe.variant.upper()} at {ckpt.meta['input_size']} px ({args.checkpoint.name})"
    return model.eval(), tensor(np.load(quant / "calibration_pixels.npy")), pixels, logits, tensor, title


def set_activation_bits(fake_quants, ranges, bits: int) -> None:
    """Each activation's ``(lo, hi)`` range at ``bits`` (unsigned, affine): the same range
    in 2**bits - 1 steps. Simulation only: no runtime runs activations wider than 8 bits."""
    top = 2 ** bits - 1
    for fq, (lo, hi) in zip(fake_quants, ranges):
        fq.quant_min, fq.quant_max = 0, top
        fq.activation_post_process.quant_min, fq.activation_post_process.quant_max = 0, top
        scale = (hi - lo) / top
        fq.scale.fill_(scale)
        fq.zero_point.fill_(int(round(-lo / scale)))


def by_producer(student, fake_quants) -> dict[str, list]:
    """The activation fake-quantizers grouped by the op whose output each one rounds."""
    modules = dict(student.named_modules())
    wanted = {id(m) for m in fake_quants}
    groups = collections.defaultdict(list)
    for n in student.graph.nodes:
        if n.op == "call_module" and id(modules[n.target]) in wanted:
            src = n.args[0]
            name = (str(src.target).split(".")[-2] if src.op == "call_function" else
                    "network input" if src.op == "placeholder" else src.op)
            groups[name].append(modules[n.target])
    return dict(groups)


def onnx_a16(fp32: Path, out: Path) -> Path:
    """``fp32`` quantized by onnxruntime with int8 weights per channel and uint16 activations."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    (inp,) = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    rng = np.random.default_rng(0)

    class Noise(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(fp32), str(out), Noise(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8, per_channel=True)
    return out


def tflite_a16(fp32: Path, out: Path) -> Path:
    """``fp32`` quantized by ai-edge-quantizer's 16x8 recipe (int8 weights, int16 activations)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    it = Interpreter(model_path=str(fp32))
    (signature, spec), = it.get_signature_list().items()
    name = spec["inputs"][0]
    detail = it.get_signature_runner(signature).get_input_details()[name]
    rng = np.random.default_rng(0)
    feeds = [{name: rng.integers(0, 255, detail["shape"]).astype(detail["dtype"])} for _ in range(4)]
    q = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai16() + FLOAT_ENDS)   # pixels in, as int8
    q.quantize(q.calibrate({signature: feeds})).export_model(str(out), overwrite=True)
    return out


class RawLiteRT:
    """A .tflite fed noise of its own input type (the 16x8 model takes int16, which the
    pipeline's runtime does not feed), for timing only: every LiteRT row is timed so."""

    def __init__(self, path: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=1)
        self.it.allocate_tensors()
        (self.detail,) = self.it.get_input_details()

    def invoker(self, _pixels):
        d = self.detail
        self.it.set_tensor(d["index"], np.random.default_rng(0).integers(0, 100, d["shape"]).astype(d["dtype"]))
        return self.it.invoke


def wider_activation_latency(runs: int) -> None:
    import tempfile

    _, path_of, meta, pixel = latency_artifacts("m0.9", ("fp32", "int8"))
    print(f"\nwhat wider activations cost where a runtime has them: measured, {cpu_name()}, "
          f"RepViT-M0.9 at {meta['input_size']} px (untrained weights: speed only), 1 thread, batch 1, "
          f"medians of {runs} alternating runs")
    print(f"  {'runtime':12} {'fp32 ms':>8} {'W8A8 ms':>8} {'W8A16 ms':>9} {'W8A16 / fp32':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, fmt, make, runtime in (
                ("onnxruntime", "onnx", onnx_a16, lambda p: open_runtime("onnx", p, meta, 1)),
                ("LiteRT", "tflite", tflite_a16, RawLiteRT)):
            with quiet():   # both quantizers print progress and advice
                a16 = make(path_of("fp32", fmt), Path(tmp) / f"a16.{fmt}")
            t32, t8, t16 = alternate_latency([runtime(p) for p in (path_of("fp32", fmt), path_of("int8", fmt), a16)],
                                             pixel, runs=runs)
            print(f"  {label:12} {t32:8.2f} {t8:8.2f} {t16:9.2f} {t16 / t32:13.2f}", flush=True)
            how = tflite_execution(a16) if fmt == "tflite" else onnx_execution(a16)
            print(f"    W8A16 runs as: {execution_line(how)[0]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eval-images", type=int, default=0, help="test images scored (0: all 10,000)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--no-latency", action="store_true", help="skip the wider activations' latency")
    ap.add_argument("--runs", type=int, default=30, help="alternating latency runs")
    add_checkpoint_option(ap)
    args = ap.parse_args()
    require_shared()
    model, calib, pixels, logits, tensor, title = prepared_run(args)
    float_probs = softmax(logits)

    @torch.no_grad()
    def score(student, what: str) -> None:
        """Agreement, mean KL and disagreements (all; float margin < 0.05) as the reports count them."""
        start = time.perf_counter()
        probs = softmax(torch.cat([student(tensor(pixels[i:i + args.batch_size]))
                                   for i in range(0, len(pixels), args.batch_size)]).numpy())
        bins = agreement_by_float_margin(float_probs, probs)
        differ = sum(b["disagreements"] for b in bins)
        print(f"  {what:58} {100 * (1 - differ / len(probs)):6.2f}% {kl_per_image(float_probs, probs).mean():9.5f} "
              f"{differ:6d} {bins[0]['disagreements']:6d}   ({time.perf_counter() - start:.0f} s)", flush=True)

    near_ties = agreement_by_float_margin(float_probs, float_probs)[0]["images"]
    print(f"\n{title}, CIFAR-10, {len(pixels)} test images, {near_ties} with float's "
          "top-1 - top-2 probability < 0.05. Simulated: torchao PT2E fake quantization of the "
          f"equalized model, fp32 on this CPU, ranges from {len(calib)} calibration images.")
    print(f"  {'':58} {'agree':>7} {'mean KL':>9} {'differ':>6} {'<0.05':>6}")
    backend = TorchaoPT2E()
    batches = [calib[i:i + 32] for i in range(0, len(calib), 32)]
    students = []
    for what, percentile, of_values in STATISTICS:
        student = backend.prepare(model, calib[:8])
        set_percentile_ranges(student, batches, percentile, of_values)
        backend.set_mode(student, False)
        fqs = activation_fake_quants(student)
        ranges = [fake_quant_range(fq) for fq in fqs]
        print(f"ranges: {what}")
        for bits in BITS:
            set_activation_bits(fqs, ranges, bits)
            score(student, f"W8A{bits}")
        set_activation_bits(fqs, ranges, 8)
        students.append((student, fqs))
    print(f"where W8A8 loses (ranges: {STATISTICS[1][0]}; one kind of tensor in float at a time)")
    student, fqs = students[1]
    for producer, group in sorted(by_producer(student, fqs).items()):
        for fq in group:
            fq.disable_fake_quant()
        score(student, f"float outputs of {producer} ({len(group)} tensors)")
        for fq in group:
            fq.enable_fake_quant()
    for fq in fqs:
        fq.disable_fake_quant()
    score(student, "int8 weights only (activations float)")
    if not args.no_latency:
        wider_activation_latency(args.runs)


if __name__ == "__main__":
    main()
