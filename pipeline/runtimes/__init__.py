"""Each artifact in the runtime it will run in, behind one interface:
``predict(pixels uint8 NHWC) -> scores`` where scores are logits (ONNX) or
probabilities (Core ML, TFLite), and ``method`` says how results were obtained.
``invoker(pixels)`` returns a call that runs the model once on input already converted
to what the runtime takes: latency is the runtime's, without this package's numpy
preprocessing (it once took 1 ms per 224 px image, which made int8 look slower next to fp32)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline.runtimes.coreml import CoreMLRuntime, MilRuntime, coreml_can_run
from pipeline.runtimes.litert import LiteRTRuntime
from pipeline.runtimes.ort import OnnxRuntime


class Runtime(Protocol):
    name: str          # e.g. "onnxruntime 1.32.0 CPU"
    method: str        # measured | simulated
    outputs: str       # logits | probabilities

    def predict(self, pixels: np.ndarray) -> np.ndarray: ...

    def invoker(self, pixels: np.ndarray) -> Callable[[], object]: ...


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
    if fmt == "openvino":
        from pipeline.runtimes.openvino import OpenVINORuntime   # imports openvino: only when asked
        return OpenVINORuntime(path, meta, threads)
    if fmt == "executorch":
        from pipeline.runtimes.executorch import ExecuTorchRuntime   # imports executorch: only when asked
        return ExecuTorchRuntime(path, meta, threads)
    if fmt == "executorch_coreml":
        from pipeline.runtimes.executorch import ExecuTorchCoreMLRuntime
        return ExecuTorchCoreMLRuntime(path, meta, threads, compile, batch_size, simulation)
    raise ValueError(f"no runtime for format {fmt!r}")
