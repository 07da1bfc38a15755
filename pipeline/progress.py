"""Progress bars for long work (calibration, evaluation, training), quiet when not a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, unit: str):
        self.bar = tqdm(total=total, unit=" " + unit.split()[-1], desc=f"    {unit}", leave=False,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
