"""CiuicCallback: per-category peaks through the LightningModule's log, the peak in the
progress bar, the memory table at the end of fit."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

import ciuic
from ciuic.memory import DEVICE_CATEGORIES
from ciuic_lightning import CiuicCallback, CiuicStrategy
from tests.lightning.helpers import LoraModule, loader, trainer


def test_logs_categories_of_metered_steps_and_prints_the_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = CiuicCallback(every_n_steps=3, warmup=1)
    run = trainer(
        tmp_path,
        strategy=CiuicStrategy("balanced"),
        max_steps=5,
        callbacks=[callback],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    with caplog.at_level(logging.INFO):
        run.fit(LoraModule(), loader(10, batch_size=2, seq_len=16))
    assert sorted(callback.readings) == [0, 3]  # warmup step 0, then every 3rd
    peak = max(callback.readings.values(), key=lambda r: r.peak_bytes)
    assert callback.peak == peak
    assert run.progress_bar_metrics["ciuic/peak_bytes"] == peak.peak_bytes
    with open(Path(run.logger.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged = [row for row in rows if row.get("ciuic/peak_parameters_bytes")]
    assert [int(row["step"]) for row in logged][:1] == [0]
    for row in logged:  # Lightning carries a step's logged value on until it is logged again
        step = max(s for s in callback.readings if s <= int(row["step"]))
        reading = callback.readings[step]
        for name in DEVICE_CATEGORIES:
            assert float(row[f"ciuic/peak_{name}_bytes"]) == reading.peak_by_category[name]
    assert peak.report() in caplog.text


def test_metered_step_counts_what_was_built_before_it(tmp_path: Path) -> None:
    """track=(module, optimizers): parameters and optimizer states of earlier steps count."""
    callback = CiuicCallback(every_n_steps=2, warmup=0, print_table=False)
    module = LoraModule()
    run = trainer(tmp_path, strategy=CiuicStrategy(optimizer="adamw8bit"), max_steps=3, callbacks=[callback])
    run.fit(module, loader(6, batch_size=2, seq_len=16))
    reading = callback.readings[2]
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    assert reading.peak_by_category["parameters"] >= params
    assert reading.peak_by_category["optimizer"] > 0
    assert isinstance(run.optimizers[0], ciuic.optim.CiuicAdamW)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="every_n_steps=0 is not allowed"):
        CiuicCallback(every_n_steps=0)
