"""Progress for long work (calibration, evaluation, training): a bar with rate and ETA on a
terminal; elsewhere (CI logs, pipes) a line with rate and ETA every ``every_s`` seconds.
Silent when the pipeline's messages are (``-q``: core/log.py)."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, unit: str, every_s: float = 30.0):
        self.shown = logging.getLogger("pipeline").isEnabledFor(logging.INFO)
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit=" " + unit.split()[-1], desc=f"    {unit}", leave=False,
                        disable=not (self.tty and self.shown), dynamic_ncols=True)
        self.total, self.unit, self.every_s = total, unit, every_s
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        now = time.monotonic()
        if self.shown and not self.tty and now - self.last >= self.every_s and 0 < self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            print(f"    {self.unit}: {self.done}/{self.total}, {rate:.1f}/s, "
                  f"ETA {_clock((self.total - self.done) / rate)}", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
