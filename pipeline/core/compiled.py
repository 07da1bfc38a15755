"""PyTorch scoring loops compiled with TorchInductor for large image sets: the float
reference and the Core ML simulation (the two slowest scorers at ImageNet scale).

A callable is traced once into an aten graph (``make_fx``) at one batch shape and compiled
by inductor; a smaller last batch is padded. Its output on the first batch is compared with
the eager callable's before anything is scored: a compile that changed what is computed
falls back to eager, and the facts say which ran, the measured difference and the compile
time. Compiling costs 5-60 s (inductor keeps compiled kernels on disk), so ``auto``
compiles only from ``AUTO_MIN_IMAGES`` images on.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    import torch

Setting = Literal["auto", "always", "never"]
# m0.9, 224 px, this 2-core machine: compiling costs about 30 s cold (5 s from inductor's
# disk cache) and saves about 6 ms per image in the Core ML simulation, 2 ms in the float
# reference: worth it from a few thousand images.
AUTO_MIN_IMAGES = 5000


def wanted(setting: Setting, images: int) -> bool:
    return setting == "always" or (setting == "auto" and images >= AUTO_MIN_IMAGES)


def _padded(x: torch.Tensor, batch: int) -> torch.Tensor:
    import torch

    if len(x) == batch:
        return x
    pad = x.new_zeros((batch - len(x), *x.shape[1:]))
    return torch.cat([x, pad]).contiguous(memory_format=_layout(x))


def _layout(x: torch.Tensor) -> torch.memory_format:
    import torch

    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class FixedBatch:
    """``eager`` (tensor -> tensor, rows independent), compiled on its first call for
    batches of ``batch`` rows. ``tolerance``: the largest max |compiled - eager| / max
    |eager| on that first batch that still uses the compiled graph. ``inductor``: inductor
    settings in force while compiling and running (``emulate_precision_casts`` keeps every
    fp32 -> fp16 -> fp32 rounding that the Core ML simulation relies on; without it the
    simulation's top-1 moved on 6 of 16 images)."""

    def __init__(self, eager: Callable[[torch.Tensor], torch.Tensor], batch: int, tolerance: float,
                 **inductor):
        # One compile thread: inductor's pool of compile processes raised the peak RSS of
        # bench_validation from 1.9 to 2.9 GB.
        self.eager, self.batch, self.tolerance = eager, batch, tolerance
        self.inductor = {"compile_threads": 1, **inductor}
        self.fn: Callable | None = None
        self.facts: dict = {"compiled": False, "reason": "not called yet"}

    @property
    def how(self) -> str:
        """What a runtime's name says about it: compiled, to be compiled, or nothing (eager)."""
        if self.fn is None:
            return ", to be inductor-compiled on its first batch"
        return ", inductor-compiled" if self.facts["compiled"] else ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        n = len(x)
        if n > self.batch:
            return torch.cat([self(x[s:s + self.batch]) for s in range(0, n, self.batch)])
        x = _padded(x, self.batch)
        if self.fn is None:
            self.fn = self._compile(x)
        if self.fn is self.eager:
            with torch.no_grad():
                return self.eager(x)[:n]
        import torch._inductor.config as inductor

        with torch.no_grad(), inductor.patch(self.inductor):
            return self.fn(x)[:n]

    def _compile(self, x: torch.Tensor) -> Callable:
        import torch

        start = time.perf_counter()
        try:
            import torch._inductor.config as inductor
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.no_grad(), inductor.patch(self.inductor):
                graph = make_fx(lambda t: self.eager(t))(x)   # a plain one-argument function to trace
                fn = torch.compile(graph, dynamic=False)
                got = fn(x)
        except Exception as e:   # no C++ compiler, an op inductor lacks: eager still works
            self.facts = {"compiled": False, "reason": f"inductor failed ({type(e).__name__}: {e}"[:300] + ")"}
            return self.eager
        seconds = time.perf_counter() - start
        with torch.no_grad():
            want = self.eager(x)
        check_s = time.perf_counter() - start - seconds
        diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if not diff <= self.tolerance:
            self.facts = {"compiled": False, "max_rel_diff_vs_eager": diff,
                          "reason": f"the compiled graph differed from eager by {diff:.2g} "
                                    f"(tolerance {self.tolerance:g}) on the first batch: eager used"}
            return self.eager
        # Both once per run, not per image: what an extrapolation to more images counts once.
        self.facts = {"compiled": True, "compile_s": round(seconds, 1), "check_s": round(check_s, 2),
                      "max_rel_diff_vs_eager": diff, "checked_on": f"first batch of {self.batch}"}
        return fn
