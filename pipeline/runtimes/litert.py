"""LiteRT: the .tflite artifact as an Android app runs it (XNNPACK)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.quiet import quiet


class LiteRTRuntime:
    """The .tflite as an app runs it: raw RGB pixels in (uint8 for full-integer models,
    float values 0..255 otherwise), class probabilities out."""
    method, outputs = "measured", "probabilities"

    def __init__(self, path: Path, meta: dict, threads: int = 1):
        import importlib.metadata

        self.it, self.meta = interpreter(path, threads), meta
        self.inp, self.out = self.it.get_input_details()[0], self.it.get_output_details()[0]
        self.name = f"LiteRT {importlib.metadata.version('ai-edge-litert')} CPU (XNNPACK)"

    def predict(self, pixels):
        return predict(self.it, pixels)

    def invoker(self, pixels):
        x = to_input(pixels[:1], self.inp)

        def run():
            self.it.set_tensor(self.inp["index"], x)
            self.it.invoke()
            return self.it.get_tensor(self.out["index"])
        return run


def interpreter(path: Path, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    with quiet():  # "Created TensorFlow Lite XNNPACK delegate" on fd 2
        it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def to_input(pixels: np.ndarray, detail: dict) -> np.ndarray:
    """uint8 NHWC pixels -> what the input tensor holds: the bytes themselves (uint8,
    full-integer models) or their values as float32."""
    if detail["dtype"] == np.uint8:   # the bytes as they are; the scale (1/255) is the model's
        scale, zero = detail["quantization"]
        if zero != 0 or abs(scale * 255 - 1) > 1e-6:
            raise ValueError(f"uint8 input with scale {scale} and zero point {zero}: expected pixel bytes "
                              "(scale 1/255, zero point 0)")
        return np.ascontiguousarray(pixels, np.uint8)
    if detail["dtype"] == np.float32:
        return np.ascontiguousarray(pixels, np.float32)
    raise ValueError(f"input tensor of type {detail['dtype']}: this pipeline writes uint8 or float32 "
                      "pixel inputs (re-export the artifact)")


def from_output(y: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def run_tflite(path: Path, pixels: np.ndarray, threads: int = 1) -> np.ndarray:
    """Class probabilities for uint8 NHWC ``pixels`` (one image at a time, as an app runs it)."""
    return predict(interpreter(path, threads), pixels)


def predict(it, pixels: np.ndarray) -> np.ndarray:
    """``run_tflite`` on an open interpreter."""
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for i in range(len(pixels)):
        it.set_tensor(inp["index"], to_input(pixels[i:i + 1], inp))
        it.invoke()
        outs.append(from_output(it.get_tensor(out["index"]), out))
    return np.concatenate(outs)
