"""ciuic drops bitsandbytes' kernels-community log line, and nothing else."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from ciuic.logging_filters import BITSANDBYTES_CPU_LOGGER, quiet_bitsandbytes

# bitsandbytes/backends/cpu/ops.py logs exactly this format string when `kernels` is missing.
BNB_FORMAT = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1"
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_filter_drops_exactly_the_kernels_line() -> None:
    quiet_bitsandbytes()
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    records = _Records()
    logger.addHandler(records)
    # Other tests may configure logging (a level, disable_existing_loggers): start from a known state.
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    try:
        logger.warning(BNB_FORMAT, "No module named 'kernels'")
        logger.warning("Failed to load CPU gemm_4bit_forward for another reason")  # not the known line
        logger.warning("gemv_4bit fell back to the default kernel")
        logger.error(
            "%s from kernels-community", "Failed to load CPU gemm_4bit_forward"
        )  # same text: dropped
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
        logger.disabled = disabled
    assert records.messages == [
        "Failed to load CPU gemm_4bit_forward for another reason",
        "gemv_4bit fell back to the default kernel",
    ]


# bitsandbytes logs the line on import when the CPU has AVX512-BF16 and `kernels` is missing.
QUIET_IMPORT = """
import importlib.util, ciuic.logging_filters as f
f.quiet_bitsandbytes()
import bitsandbytes
from bitsandbytes.functional import has_avx512bf16
print(bool(has_avx512bf16()) and importlib.util.find_spec("kernels") is None)
"""


def test_importing_bitsandbytes_after_ciuic_prints_no_kernels_line() -> None:
    done = subprocess.run([sys.executable, "-c", QUIET_IMPORT], capture_output=True, text=True, check=True)
    if done.stdout.strip() != "True":
        pytest.skip("bitsandbytes logs no kernels line here (no AVX512-BF16 here, or kernels installed)")
    assert "gemm_4bit_forward" not in done.stderr and "kernels-community" not in done.stderr
