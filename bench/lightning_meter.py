"""Step-time cost of CiuicCallback's metering in a Lightning run (ratio only).

    python bench/lightning_meter.py [--steps 60]

Runs the same CiuicStrategy("balanced") LoRA job on the tiny DeepSeek-V3 (CPU, one thread) in
three forms, interleaved, twice each (the fastest of the two counts):
without the callback, with it metering every step (``every_n_steps=1``: a MemoryMeter dispatch
mode around each step), and with its defaults (first 2 steps, then one in 100). Prints the
median step time of each relative to the run without it. The first 3 steps are not timed.

Measured (``python bench/lightning_meter.py --steps 40``, a shared 2-core CPU): metering every
step 5.38x; the defaults 0.97x (no timed step is metered: that is the noise). Metering every
step is far over the 10% bound on CPU, hence the sampling: a run of N steps meters about
1 + N/100 of them (steps 0, 1 and every 100th), so 4.4 * (1 + N/100) / N extra time: 9% at
100 steps, 4.8% at 1,000, 4.4% beyond.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ciuic_lightning import CiuicCallback, CiuicStrategy
from tests.lightning.helpers import LoraModule, loader, trainer


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def median_step(steps: int, meter: CiuicCallback | None) -> float:
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer] if meter is None else [meter, timer]
    run = trainer(
        "/tmp/ciuic_bench_lightning", strategy=CiuicStrategy("balanced"), max_steps=steps, callbacks=callbacks
    )
    run.fit(LoraModule(), loader(4 * steps))
    return statistics.median(timer.times[3:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    steps = parser.parse_args().steps
    torch.set_num_threads(1)  # as the tests: tiny ops, and no spinning workers on a shared CPU
    runs: dict[str, list[float]] = {"base": [], "every": [], "default": []}
    for _ in range(2):  # interleaved, the fastest of two: a shared CPU is noisy
        runs["base"].append(median_step(steps, None))
        runs["every"].append(median_step(steps, CiuicCallback(every_n_steps=1, print_table=False)))
        runs["default"].append(median_step(steps, CiuicCallback(print_table=False)))
    base, every, default = (min(runs[k]) for k in ("base", "every", "default"))
    print(f"median step time relative to no callback ({steps} steps, CPU):")
    print(f"  meter every step        {every / base:.2f}x")
    print(f"  defaults (2, then 1/100) {default / base:.2f}x")


if __name__ == "__main__":
    main()
