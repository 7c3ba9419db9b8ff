"""trainer.save_checkpoint / fit(ckpt_path=...) with converted weights and quantized optimizer
states: a run saved at step 20 and resumed to 40 equals the uninterrupted run, bitwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import ciuic
from ciuic_lightning import CHECKPOINT_KEY, CiuicStrategy
from tests.lightning.helpers import LoraModule, loader, trainer

EPOCH = 20
"""Steps per epoch: the checkpoint is taken at the end of the first epoch. (The runs stop by
``max_epochs``: resumed from a checkpoint of a run stopped by ``max_steps``, Lightning 2.6 reads
the first batch of the epoch twice, with or without Ciuic.)"""


class SaveAfterFirstEpoch(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def _data() -> Any:
    return loader(2 * EPOCH, batch_size=2, seq_len=16)


def _state(module: LoraModule, run: pl.Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return params, run.optimizers[0].state_dict()


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("preset", ["balanced", "max"])
def test_resume_at_20_continues_bitwise_to_40(tmp_path: Path, preset: str) -> None:
    path = tmp_path / "step20.ckpt"
    straight = LoraModule()
    run = trainer(
        tmp_path, strategy=CiuicStrategy(preset), max_epochs=2, callbacks=[SaveAfterFirstEpoch(path)]
    )
    run.fit(straight, _data())
    expected = _state(straight, run)

    resumed = LoraModule()
    again = trainer(tmp_path, strategy=CiuicStrategy(preset), max_epochs=2)
    again.fit(resumed, _data(), ckpt_path=path)
    assert again.global_step == 2 * EPOCH and len(resumed.losses) == EPOCH
    assert resumed.losses == straight.losses[EPOCH:]
    params, optimizer = _state(resumed, again)
    _assert_equal(params, expected[0], "params")
    _assert_equal(optimizer, expected[1], "optimizer")
    assert isinstance(again.optimizers[0], ciuic.optim.CiuicAdamW)


def test_checkpoint_records_the_config_and_converted_weights(tmp_path: Path) -> None:
    module = LoraModule()
    run = trainer(tmp_path, strategy=CiuicStrategy("balanced", activations="int4"), max_steps=1)
    run.fit(module, loader(2, batch_size=2, seq_len=16))
    run.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    config = ciuic.CiuicConfig.preset("balanced", activations="int4")
    assert checkpoint[CHECKPOINT_KEY] == config.to_dict()
    assert ciuic.saved_config(checkpoint["state_dict"]) == config
    assert any(t.dtype == torch.uint8 for t in checkpoint["state_dict"].values())  # NF4 codes


def test_resuming_under_another_config_warns(tmp_path: Path) -> None:
    module = LoraModule()
    run = trainer(tmp_path, strategy=CiuicStrategy("balanced"), max_steps=1)
    run.fit(module, loader(2, batch_size=2, seq_len=16))
    run.save_checkpoint(tmp_path / "last.ckpt")
    other = trainer(tmp_path, strategy=CiuicStrategy("balanced", activations="int4"), max_steps=2)
    with pytest.warns(UserWarning, match="another Ciuic config \\(activations differ"):
        other.fit(LoraModule(), loader(4, batch_size=2, seq_len=16), ckpt_path=tmp_path / "last.ckpt")
