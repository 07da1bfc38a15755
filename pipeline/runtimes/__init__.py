"""Each artifact in the runtime it will run in, behind one interface:
``predict(pixels uint8 NHWC) -> scores`` where scores are logits (ONNX) or
probabilities (Core ML, TFLite), and ``method`` says how results were obtained.
``invoker(pixels)`` returns a call that runs the model once on input already converted
to what the runtime takes: latency is the runtime's, without this package's numpy
preprocessing (it once took 1 ms per 224 px image, which made int8 look slower next to fp32)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..compiled import FixedBatch
from ..formats import normalized


class Runtime(Protocol):
    name: str          # e.g. "onnxruntime 1.32.0 CPU"
    method: str        # measured | simulated
    outputs: str       # logits | probabilities

    def predict(self, pixels: np.ndarray) -> np.ndarray: ...

    def invoker(self, pixels: np.ndarray) -> Callable[[], object]: ...


class OnnxRuntime:
    """``lanes`` > 1: that many one-thread sessions in place of one ``threads``-thread
    session, and ``predict`` splits each batch over them, run side by side. onnxruntime runs
    some ops between its int8 convolutions on one thread (DequantizeLinear, QLinearMul: its
    profiler, m0.9), so a batch of 16 scored 221 images/s on two one-thread sessions against
    196 on one two-thread session (six runs each, medians; identical logits). ``invoker``
    (latency, one image) runs the first session: time latency on a runtime without lanes."""
    method, outputs = "measured", "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1, lanes: int = 1):
        import onnxruntime as ort

        from ..formats.onnx import session

        self.sessions = [session(path, 1) for _ in range(lanes)] if lanes > 1 else [session(path, threads)]
        self.meta = meta
        self.name = f"onnxruntime {ort.__version__} CPU" + (f" ({lanes} one-thread sessions)" if lanes > 1 else "")

    def predict(self, pixels):
        x = normalized(pixels, self.meta)
        parts = np.array_split(x, max(1, min(len(self.sessions), len(x))))
        if len(parts) == 1:
            return self.sessions[0].run(None, {"input": x})[0]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(parts)) as pool:   # onnxruntime lets go of the GIL while it runs
            return np.concatenate(list(pool.map(lambda sp: sp[0].run(None, {"input": sp[1]})[0],
                                                zip(self.sessions, parts))))

    def invoker(self, pixels):
        feed = {"input": normalized(pixels, self.meta)}
        return lambda: self.sessions[0].run(None, feed)


class LiteRTRuntime:
    """The .tflite as an app runs it: raw RGB pixels in (uint8 for full-integer models,
    float values 0..255 otherwise), class probabilities out."""
    method, outputs = "measured", "probabilities"

    def __init__(self, path: Path, meta: dict, threads: int = 1):
        import importlib.metadata

        from ..formats.tflite import interpreter

        self.it, self.meta = interpreter(path, threads), meta
        self.inp, self.out = self.it.get_input_details()[0], self.it.get_output_details()[0]
        self.name = f"LiteRT {importlib.metadata.version('ai-edge-litert')} CPU (XNNPACK)"

    def predict(self, pixels):
        from ..formats.tflite import predict

        return predict(self.it, pixels)

    def invoker(self, pixels):
        from ..formats.tflite import to_input

        x = to_input(pixels[:1], self.inp)

        def run():
            self.it.set_tensor(self.inp["index"], x)
            self.it.invoke()
            return self.it.get_tensor(self.out["index"])
        return run


class CoreMLRuntime:
    """Core ML itself (macOS only)."""
    method, outputs = "measured", "probabilities"

    def __init__(self, path: Path, meta: dict, threads: int = 1, compute_units: str = "ALL"):
        import coremltools as ct

        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.classes = meta["classes"]
        self.name = f"Core ML (macOS {platform.mac_ver()[0]}, {compute_units})"

    def predict(self, pixels):
        from PIL import Image

        out = []
        for p in pixels:
            probs = self.model.predict({"image": Image.fromarray(p)})["classLabel_probs"]
            out.append([probs[c] for c in self.classes])
        return np.asarray(out, np.float32)

    def invoker(self, pixels):
        from PIL import Image

        image = {"image": Image.fromarray(pixels[0])}
        return lambda: self.model.predict(image)


class MilRuntime:
    """The ML program read back and interpreted (any OS): simulated. ``compile``: batches
    of ``batch_size`` run through the program compiled with inductor (``compiled.py``; used
    only if it matches the interpreter on the first batch)."""
    method, outputs = "simulated", "probabilities"

    def __init__(self, path: Path, meta: dict, threads: int = 1, compile: bool = False, batch_size: int = 16,
                 simulation: str = "int8"):
        from .mil import MilInterpreter

        # "int8": W8A8 convs as int8 x int8 sums where oneDNN sums exactly; "fp16": dequantize, convolve.
        self.interp = MilInterpreter(path, integer_convs=None if simulation == "int8" else False)
        self.interp.prepare()   # before the compiled graph is traced
        # Probabilities within 1e-3 of the interpreter's (it measured bit-identical here).
        self.compiled = (FixedBatch(self.interp.forward, batch_size, tolerance=1e-3, emulate_precision_casts=True)
                         if compile else None)

    @property
    def name(self) -> str:
        ints = ", int8 x int8 convs" if self.interp.integer_convs else ""
        return f"MIL interpreter (PyTorch{ints}{self.compiled.how if self.compiled else ''}, simulated Core ML)"

    def predict(self, pixels):
        # Batched: per-op Python overhead is paid once per batch, not once per image.
        x = self.interp.input_tensor(pixels.transpose(0, 3, 1, 2))
        return (self.compiled or self.interp.forward)(x).numpy()

    def invoker(self, pixels):
        x = self.interp.input_tensor(pixels[:1].transpose(0, 3, 1, 2))
        return lambda: self.interp.forward(x)


def alternate_latency(runtimes: list, pixels: np.ndarray, warmup: int = 10, runs: int = 50) -> list[float]:
    """Median milliseconds of one inference on ``pixels`` for each runtime (its
    ``invoker``), the runtimes taking turns run by run, so that a noisy machine slows them
    alike: only the ratios of one call mean much."""
    import statistics
    import time

    calls = [rt.invoker(pixels) for rt in runtimes]
    for _ in range(warmup):
        for call in calls:
            call()
    times = [[] for _ in runtimes]
    for _ in range(runs):
        for call, t in zip(calls, times):
            start = time.perf_counter()
            call()
            t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def coreml_can_run() -> bool:
    return platform.system() == "Darwin"


def open_runtime(fmt: str, path: Path, meta: dict, threads: int = 1, compile: bool = False,
                 batch_size: int = 16, lanes: int = 1, simulation: str = "int8") -> Runtime:
    """``compile``/``batch_size``/``simulation`` (``export.coreml.simulation``): the Core ML
    simulation's (the only PyTorch runtime); ``lanes``: onnxruntime's (batches split over
    one-thread sessions)."""
    if fmt == "onnx":
        return OnnxRuntime(path, meta, threads, lanes)
    if fmt == "tflite":
        return LiteRTRuntime(path, meta, threads)
    if fmt == "coreml":
        return (CoreMLRuntime(path, meta, threads) if coreml_can_run()
                else MilRuntime(path, meta, threads, compile, batch_size, simulation))
    raise ValueError(f"no runtime for format {fmt!r}")
