"""Logging filters that drop known third-party noise, and only that.

bitsandbytes logs, at ``WARNING`` level while it is being imported, that it could not load an
optional CPU 4-bit kernel from the ``kernels`` package (its pure-PyTorch path is used instead).
That line reaches every ciuic user who imports bitsandbytes (directly, or through peft and
transformers) and says nothing about their run, so ciuic drops it with a ``logging.Filter`` on
the exact logger that emits it. Nothing else on that logger, and no other logger, is touched.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
"""The logger of ``bitsandbytes/backends/cpu/ops.py``, which logs the kernels line on import."""

KERNELS_COMMUNITY = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""How the dropped message begins."""


class DropKnownNoise(logging.Filter):
    """Drops the log records whose message begins with one of ``prefixes``; keeps every other.

    Args:
        prefixes: Beginnings of the messages to drop (matched against the record's format
            string, before ``%`` arguments are filled in, and against the formatted message).

    Example:
        >>> import logging
        >>> drop = DropKnownNoise("Failed to load")
        >>> record = logging.LogRecord("x", logging.WARNING, "f.py", 1, "Failed to load %s", ("k",), None)
        >>> drop.filter(record), drop.filter(logging.LogRecord("x", 30, "f.py", 1, "other", (), None))
        (False, True)
    """

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.prefixes):
            return False
        return not record.getMessage().startswith(self.prefixes)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line.

    Idempotent. bitsandbytes logs the line while it is imported, so this must run before the
    first ``import bitsandbytes`` (``import ciuic`` is the place); it imports nothing itself.

    Example:
        >>> quiet_bitsandbytes()
        >>> quiet_bitsandbytes()  # a second call adds no second filter
        >>> sum(isinstance(f, DropKnownNoise) for f in logging.getLogger(BITSANDBYTES_CPU_LOGGER).filters)
        1
    """
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(existing, DropKnownNoise) for existing in logger.filters):
        logger.addFilter(DropKnownNoise(KERNELS_COMMUNITY))
