"""Peak memory for the ``Trainer``'s logs.

Two sources, chosen by ``CiuicCallback(memory=...)``:

- ``"peak"``: ``torch.cuda.max_memory_allocated`` on a CUDA device (free to read); nothing on a
  CPU-only run, where no allocator keeps a peak;
- ``"meter"``: a :class:`ciuic.MemoryMeter` around ``Trainer.train``: exact bytes per category
  at the peak, on any device. It is a dispatch mode that sees every op, so it slows the step
  down (about 2.3x on the tiny CPU model of the tests), which is why it is not the default.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch

from ciuic import MemoryMeter
from ciuic.memory.meter import CATEGORIES

MEMORY_MODES = ("auto", "peak", "meter", "off")
"""``CiuicCallback(memory=...)``: ``auto`` is ``peak`` on CUDA and ``off`` on CPU."""

PEAK_KEY = "ciuic/peak_bytes"
"""The log key of the peak so far (device bytes)."""


def category_key(category: str) -> str:
    """The log key of one category's bytes at the peak (``ciuic/peak_activations_bytes``...)."""
    return f"ciuic/peak_{category}_bytes"


class PeakMemory:
    """The peak so far, read at each log (a meter around ``train`` when ``mode == "meter"``)."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in MEMORY_MODES:
            raise ValueError(
                f"memory={mode!r} is not allowed. Allowed: {', '.join(map(repr, MEMORY_MODES))}."
            )
        if mode == "auto":
            mode = "peak" if device.type == "cuda" else "off"
        self.mode = mode
        self.device = device
        self.meter: MemoryMeter | None = None

    def measuring(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """The context ``Trainer.train`` runs in: a meter tracking ``model``, or nothing."""
        if self.mode != "meter":
            return contextlib.nullcontext()
        meter = MemoryMeter(device=self.device, track=(model,))
        self.meter = meter
        return cast(contextlib.AbstractContextManager[Any], meter)

    def entries(self) -> dict[str, int]:
        """The log entries: the peak, and with the meter its breakdown by category."""
        if self.mode == "meter" and self.meter is not None:
            reading = self.meter.reading()
            by_category = {category_key(c): reading.peak_by_category[c] for c in CATEGORIES}
            return {PEAK_KEY: reading.peak_bytes, **by_category}
        if self.mode == "peak" and self.device.type == "cuda":
            return {PEAK_KEY: int(torch.cuda.max_memory_allocated(self.device))}
        return {}
