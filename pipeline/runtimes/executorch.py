"""ExecuTorch: a ``.pte`` as an app runs it, in ExecuTorch's own runtime (its Python
bindings: the same C++ runtime and XNNPACK delegate the Android and iOS libraries ship).

A Core ML-delegated program cannot run on Linux (the delegate needs Core ML itself): there
its ML program is read back out of the ``.pte`` (the delegate's processed bytes are the
``.mlpackage``'s files) and interpreted like the ``.mlpackage`` (runtimes/mil.py: simulated);
on macOS, where ExecuTorch's runtime has the Core ML backend, it runs for real."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.quiet import quiet
from pipeline.io.data import normalized


def version() -> str:
    import executorch.version

    return executorch.version.__version__.split("+")[0]


def set_threads(threads: int) -> None:
    """ExecuTorch's CPU thread pool (one per process, shared by every program) to ``threads``."""
    with quiet():   # the pool's CPU probe and "Resetting threadpool to N threads" log to fd 2
        from executorch.extension.pybindings import portable_lib

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(int(threads))


def _runtime():
    """ExecuTorch's runtime (once per process; its CPU probe logs to fd 2 on first use)."""
    with quiet():
        from executorch.runtime import Runtime

        return Runtime.get()


def _program(path: Path):
    with quiet():   # importing exir imports torchao, which prints what it cannot load
        from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(path).read_bytes())
    return getattr(pte, "program", pte), pte


def metadata(path: Path) -> dict[str, str]:
    """The program's constant methods (labels, preprocessing) as strings, read by the runtime."""
    program = _runtime().load_program(Path(path))
    return {name: str(program.load_method(name).execute([])[0])
            for name in sorted(program.method_names) if name != "forward"}


def execution(path: Path) -> dict:
    """How ExecuTorch runs the program's ``forward``, read from the program itself: its
    delegate calls by backend and the operators left to ExecuTorch's portable kernels."""
    program, _ = _program(path)
    plan = next(p for p in program.execution_plan if p.name == "forward")
    backends = Counter(d.id for d in plan.delegates)
    calls = Counter(type(i.instr_args).__name__ for chain in plan.chains for i in chain.instructions)
    outside = Counter()
    for chain in plan.chains:
        for i in chain.instructions:
            if type(i.instr_args).__name__ == "KernelCall":
                outside[plan.operators[i.instr_args.op_index].name] += 1
    partitions = calls.get("DelegateCall", 0)
    backend = ", ".join(sorted(backends)) or "none"
    return {"runtime": f"ExecuTorch {version()}", "backend": backend, "delegate_partitions": partitions,
            "ops_outside_delegate": dict(outside), "fast_path": partitions == 1 and not outside,
            "how": "read from the program (its delegate calls and kernel calls)"}


class ExecuTorchRuntime:
    """float NCHW normalized input (batch 1), logits out, on ExecuTorch's runtime."""
    method, outputs = "measured", "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1):
        self.threads, self.meta = int(threads), meta
        set_threads(self.threads)
        with quiet():   # XNNPACK's CPU probe logs to fd 2 when the first delegate loads
            self.forward = _runtime().load_program(Path(path)).load_method("forward")
        self.execution = execution(path)   # read once: the name's backend and the export's facts
        self.name = f"ExecuTorch {version()} CPU ({self.execution['backend']})"

    def predict(self, pixels):
        import torch

        set_threads(self.threads)
        x = torch.from_numpy(normalized(pixels, self.meta))
        return np.concatenate([self.forward.execute([x[i:i + 1]])[0].numpy() for i in range(len(x))])

    def invoker(self, pixels):
        import torch

        x = torch.from_numpy(normalized(pixels[:1], self.meta))
        set_threads(self.threads)
        return lambda: self.forward.execute([x])


def coreml_packages(path: Path, out_dir: Path) -> list[Path]:
    """The ``.mlpackage`` of each Core ML delegate call of the program, written under ``out_dir``."""
    from executorch.backends.apple.coreml import executorchcoreml

    program, pte = _program(path)
    named = {}
    if getattr(pte, "named_data", None) is not None:
        named = {k: pte.named_data.buffers[e.buffer_index] for k, e in pte.named_data.pte_data.items()}
    out = []
    for i, d in enumerate(x for p in program.execution_plan for x in p.delegates if x.id == "CoreMLBackend"):
        data = program.backend_delegate_data[d.processed.index].data
        if data.startswith(b"CMJR"):   # a reference to named data (multifunction programs)
            data = named[json.loads(data[4:].decode())["key"]]
        folder = Path(out_dir) / f"delegate_{i}"
        folder.mkdir(parents=True)
        if not executorchcoreml.unflatten_directory_contents(data, str(folder)):
            raise ValueError(f"{path}: Core ML delegate {i} could not be unpacked")
        out += sorted(folder.rglob("*.mlpackage"))
    return out


def coreml_backend_available() -> bool:
    return _runtime().backend_registry.is_available("CoreMLBackend")


class ExecuTorchCoreMLRuntime:
    """A Core ML-delegated program: run by ExecuTorch where its runtime has the Core ML
    backend (macOS), else its delegate's ML program interpreted (simulated, as MilRuntime)."""
    outputs = "logits"

    def __init__(self, path: Path, meta: dict, threads: int = 1, compile: bool = False, batch_size: int = 16,
                 simulation: str = "int8"):
        from pipeline.runtimes.coreml import MilRuntime

        self.meta = meta
        if coreml_backend_available():
            self.real = ExecuTorchRuntime(path, meta, threads)
            self.method, self.name = "measured", self.real.name
            return
        self.real = None
        self._tmp = tempfile.TemporaryDirectory()
        packages = coreml_packages(path, Path(self._tmp.name))
        if len(packages) != 1:
            raise ValueError(f"{path}: {len(packages)} Core ML delegates; the pipeline writes programs with one")
        self.sim = MilRuntime(packages[0], meta, threads, compile, batch_size, simulation)
        self.compiled = self.sim.compiled
        self.method = "simulated"
        self.name = f"{self.sim.name.removesuffix(', simulated Core ML)')}, simulated ExecuTorch Core ML delegate)"

    def _input(self, pixels):
        from pipeline.io.data import normalized_tensor

        return normalized_tensor(pixels, self.meta["mean"], self.meta["std"])

    def predict(self, pixels):
        if self.real is not None:
            return self.real.predict(pixels)
        return self.sim.scores(self._input(pixels))

    def invoker(self, pixels):
        if self.real is not None:
            return self.real.invoker(pixels)
        x = self._input(pixels[:1])
        return lambda: self.sim.interp.forward(x)
