"""The pipeline's one output channel: ``logging`` under the ``pipeline`` logger.

Every module logs to ``logging.getLogger(__name__)``; what users see is set once, by the
CLI (``-v`` / ``-q``) or a bench script (:func:`configure`). Messages go to standard error
(standard output is the command's result: a summary, or JSON with ``--json``); warnings
say ``WARNING:``, errors at -q still show. Progress bars (core/progress.py) are tqdm's, on a terminal only.
"""
from __future__ import annotations

import logging
import sys

ROOT_LOGGER = "pipeline"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted (so a
    redirected or captured stderr gets the messages)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Format(logging.Formatter):
    def format(self, record):
        msg = super().format(record)
        if record.levelno == logging.WARNING:   # errors name themselves (FAILED, error:)
            return "\n".join(f"{record.levelname}: {line}" for line in msg.splitlines())
        return msg


def configure(verbosity: int = 0) -> logging.Logger:
    """Show the pipeline's messages on stderr: ``-1`` warnings only (``-q``), ``0`` progress
    (default), ``1`` debug detail (``-v``). Idempotent."""
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger
