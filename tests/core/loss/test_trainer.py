"""``loss='chunked'`` under the real ``transformers.Trainer``: evaluation and metric-reading subclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ciuic
from ciuic.loss import apply_chunked_loss
from tests.models import deepseek_v3, lora, progressions

SAMPLES, SEQ_LEN = 8, 16


def _dataset(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rows = progressions(batch_size=SAMPLES, seq_len=SEQ_LEN, seed=seed)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def _accuracy(prediction: Any) -> dict[str, float]:
    """Next-token accuracy from the logits, as a user's compute_metrics would compute it."""
    logits, labels = prediction.predictions, prediction.label_ids
    assert logits.shape == (SAMPLES, SEQ_LEN, 64)  # the full logits reached compute_metrics
    return {"accuracy": float(np.mean(logits[:, :-1].argmax(-1) == labels[:, 1:]))}


def _args(tmp_path: Path, **kwargs: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=4,
        per_device_train_batch_size=4, save_strategy="no", **kwargs,
    )  # fmt: skip


def _evaluate(model: nn.Module, tmp_path: Path) -> dict[str, float]:
    from transformers import Trainer

    trainer = Trainer(model=model, args=_args(tmp_path), eval_dataset=_dataset(), compute_metrics=_accuracy)
    metrics: dict[str, float] = trainer.evaluate()
    return metrics


def test_evaluate_with_compute_metrics_on_a_lora_deepseek_v3(tmp_path: Path) -> None:
    expected = _evaluate(lora(deepseek_v3()), tmp_path / "standard")
    model = lora(deepseek_v3())
    ciuic.apply_(model, ciuic.CiuicConfig(loss="chunked"))
    got = _evaluate(model, tmp_path / "chunked")
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert got["eval_accuracy"] == expected["eval_accuracy"]


def _logits_trainer() -> Any:
    from transformers import Trainer

    class LogitsTrainer(Trainer):  # type: ignore[misc]
        """Reads outputs.logits in training, as a trainer logging a training metric does."""

        checked = 0

        def compute_loss(
            self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
        ) -> Any:
            outputs = model(**inputs)
            with torch.no_grad():  # gradients off: the model's own path, full logits
                own = model(**inputs)
            assert outputs.logits is not None and not outputs.logits.requires_grad
            assert torch.equal(outputs.logits, own.logits)
            assert abs(outputs.loss.item() - own.loss.item()) <= 1e-5 * own.loss.item()
            type(self).checked += 1
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return LogitsTrainer


def test_a_trainer_reading_training_logits_with_the_opt_in(tmp_path: Path) -> None:
    model = lora(deepseek_v3())
    apply_chunked_loss(model, training_logits=True)
    trainer_class = _logits_trainer()
    trainer = trainer_class(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset())
    trainer.train()
    assert trainer_class.checked == 2
