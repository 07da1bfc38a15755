"""Core ML itself (macOS), or the ML program read back and interpreted (any OS: simulated)."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from pipeline.core.compiled import FixedBatch


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
        from pipeline.runtimes.mil import MilInterpreter

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
        return self.scores(self.interp.input_tensor(pixels.transpose(0, 3, 1, 2)))

    def scores(self, x):
        """The program's outputs for input tensor ``x`` (compiled where it was built)."""
        return (self.compiled or self.interp.forward)(x).numpy()

    def invoker(self, pixels):
        x = self.interp.input_tensor(pixels[:1].transpose(0, 3, 1, 2))
        return lambda: self.interp.forward(x)


def coreml_can_run() -> bool:
    return platform.system() == "Darwin"
