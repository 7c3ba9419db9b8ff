"""``CiuicCallback``: the memory of a Lightning run, by category, in the Trainer's loggers.

On the CPU (and under any device without allocator statistics), :class:`ciuic.MemoryMeter`
counts every storage through a dispatch mode, which costs time on each op; so the callback
meters the first ``warmup`` training steps (where optimizer states are created and the peak
usually is) and then one step every ``every_n_steps``, with what was built before each
metered step counted through ``track=(model, optimizers)``. On CUDA the current peak comes
from ``torch.cuda.max_memory_allocated`` every step (free), the categories from the metered
steps. ``bench/lightning_meter.py`` measures the cost.

Hooks used: ``on_train_batch_start`` enters a meter on a metered step (outside the strategy's
step scope, so the meter sees what the techniques store), ``on_train_batch_end`` leaves it and
logs with ``pl_module.log`` (``ciuic/peak_<category>_bytes``, and ``ciuic/peak_bytes`` in the
progress bar); ``on_fit_end`` prints the table of the metered step with the highest peak.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

import ciuic
from ciuic.memory import DEVICE_CATEGORIES


class CiuicCallback(Callback):
    """Log the memory of the run by category, show the peak, print the table at the end.

    Args:
        every_n_steps: Meter (and log the categories of) one training step in this many.
        warmup: Meter every one of the first ``warmup`` steps.
        print_table: Print the memory table at the end of ``fit`` (rank zero).

    Example:
        >>> import lightning.pytorch as pl
        >>> from ciuic_lightning import CiuicCallback, CiuicStrategy
        >>> trainer = pl.Trainer(strategy=CiuicStrategy("balanced"), callbacks=[CiuicCallback()],
        ...                      accelerator="cpu", logger=False, enable_checkpointing=False)
    """

    def __init__(self, every_n_steps: int = 100, warmup: int = 2, print_table: bool = True) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is not allowed: use an int >= 1.")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r} is not allowed: use an int >= 0.")
        self.every_n_steps = every_n_steps
        self.warmup = warmup
        self.print_table = print_table
        self.peak: ciuic.MemoryReading | None = None
        """The reading of the metered step with the highest peak so far."""
        self.readings: dict[int, ciuic.MemoryReading] = {}
        """Each metered step's reading, by the global step it started at (0 is the first)."""
        self._meter: ciuic.MemoryMeter | None = None
        self._step = 0

    def metered(self, step: int) -> bool:
        """Whether global step ``step`` is metered."""
        return step < self.warmup or step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        if self.metered(self._step):
            device = trainer.strategy.root_device
            self._meter = ciuic.MemoryMeter(device=device, track=(pl_module, *trainer.optimizers))
            self._meter.__enter__()
        if _cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        meter, self._meter = self._meter, None
        if meter is not None:
            meter.__exit__(None, None, None)
            reading = meter.reading()
            self.readings[self._step] = reading
            if self.peak is None or reading.peak_bytes > self.peak.peak_bytes:
                self.peak = reading
            for name in DEVICE_CATEGORIES:
                pl_module.log(f"ciuic/peak_{name}_bytes", float(reading.peak_by_category[name]))
        current = self._current_peak(trainer)
        if current is not None:
            pl_module.log("ciuic/peak_bytes", float(current), prog_bar=True)

    def _current_peak(self, trainer: Any) -> int | None:
        if _cuda(trainer):
            return int(torch.cuda.max_memory_allocated(trainer.strategy.root_device))
        return None if self.peak is None else self.peak.peak_bytes

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        if self.print_table and self.peak is not None:
            steps = ", ".join(map(str, sorted(self.readings)))
            rank_zero_info(f"ciuic memory (metered steps {steps}):\n{self.peak.report()}")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        meter, self._meter = self._meter, None
        if meter is not None:
            meter.__exit__(None, None, None)


def _cuda(trainer: Any) -> bool:
    device = trainer.strategy.root_device
    return bool(device.type == "cuda" and torch.cuda.is_available())
