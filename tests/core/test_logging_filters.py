"""ciuic drops bitsandbytes' kernels-community log line, and nothing else."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from ciuic.logging_filters import BITSANDBYTES_CPU_LOGGER, KERNELS_COMMUNITY, quiet_bitsandbytes

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
    try:
        logger.warning(BNB_FORMAT, "No module named 'kernels'")
        logger.warning("Failed to load CPU gemm_4bit_forward for another reason")  # not the known line
        logger.warning("gemv_4bit fell back to the default kernel")
        logger.error(
            "%s from kernels-community", "Failed to load CPU gemm_4bit_forward"
        )  # same text: dropped
    finally:
        logger.removeHandler(records)
    assert records.messages == [
        "Failed to load CPU gemm_4bit_forward for another reason",
        "gemv_4bit fell back to the default kernel",
    ]


def _stderr_of_import(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_importing_bitsandbytes_after_ciuic_prints_no_kernels_line() -> None:
    plain = subprocess.Popen(
        [sys.executable, "-c", "import bitsandbytes"], stderr=subprocess.PIPE, text=True
    )  # in parallel with the quiet import below
    quiet = _stderr_of_import(
        "from ciuic.logging_filters import quiet_bitsandbytes as q; q(); import bitsandbytes"
    )
    _, loud = plain.communicate()
    if KERNELS_COMMUNITY not in loud:
        pytest.skip("this bitsandbytes on this CPU (no AVX512-BF16, or kernels installed) logs no such line")
    assert KERNELS_COMMUNITY not in quiet
