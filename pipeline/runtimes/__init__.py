"""Each artifact in the runtime it will run in, behind one interface:
``predict(pixels uint8 NHWC) -> scores`` where scores are logits (ONNX, TFLite) or
probabilities (Core ML), and ``method`` says how results were obtained."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Protocol

import numpy as np

from ..formats import normalized


class Runtime(Protocol):
    name: str          # e.g. "onnxruntime 1.32.0 CPU"
    method: str        # measured | simulated
    outputs: str       # logits | probabilities

    def predict(self, pixels: np.ndarray) -> np.ndarray: ...


class OnnxRuntime:
    method, outputs = "measured", "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1):
        import onnxruntime as ort

        from ..formats.onnx import session

        self.sess, self.meta = session(path, threads), meta
        self.name = f"onnxruntime {ort.__version__} CPU"

    def predict(self, pixels):
        return self.sess.run(None, {"input": normalized(pixels, self.meta)})[0]


class LiteRTRuntime:
    method, outputs = "measured", "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1):
        import importlib.metadata

        from ..formats.tflite import interpreter

        self.it, self.meta = interpreter(path, threads), meta
        self.inp, self.out = self.it.get_input_details()[0], self.it.get_output_details()[0]
        self.name = f"LiteRT {importlib.metadata.version('ai-edge-litert')} CPU (XNNPACK)"

    def predict(self, pixels):
        from ..formats.tflite import from_output, to_input

        x = normalized(pixels, self.meta).transpose(0, 2, 3, 1)
        outs = []
        for i in range(len(x)):
            self.it.set_tensor(self.inp["index"], to_input(x[i:i + 1], self.inp))
            self.it.invoke()
            outs.append(from_output(self.it.get_tensor(self.out["index"]), self.out))
        return np.concatenate(outs)


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


class MilRuntime:
    """The ML program read back and interpreted (any OS): simulated."""
    method, outputs = "simulated", "probabilities"

    def __init__(self, path: Path, meta: dict, threads: int = 1):
        from .mil import MilInterpreter

        self.interp = MilInterpreter(path)
        self.name = "MIL interpreter (PyTorch, simulated Core ML)"

    def predict(self, pixels):
        x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2).astype(np.float32))
        return np.concatenate([self.interp.run(x[i:i + 1]) for i in range(len(x))])


def coreml_can_run() -> bool:
    return platform.system() == "Darwin"


def open_runtime(fmt: str, path: Path, meta: dict, threads: int = 1) -> Runtime:
    if fmt == "onnx":
        return OnnxRuntime(path, meta, threads)
    if fmt == "tflite":
        return LiteRTRuntime(path, meta, threads)
    if fmt == "coreml":
        return CoreMLRuntime(path, meta, threads) if coreml_can_run() else MilRuntime(path, meta)
    raise ValueError(f"no runtime for format {fmt!r}")
