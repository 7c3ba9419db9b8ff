"""OOM recovery through ``CiuicCallback(budget=...)`` on a real Hugging Face ``Trainer`` (CPU).

The job of ``tests/core/recovery/test_recovery.py`` (LoRA on the tiny DeepSeek-V3, batches of
4 x 32 tokens), whose budgets are explained there and in ``tests/lightning/test_recovery.py``:
1.6 MB fails the plain step and fits ``loss='chunked', activations='int8'`` (the second rung
of the planner's order); 1.3 MB fails its last config and fits it in 2 micro-batches.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback

import ciuic
from ciuic.errors import NothingFitsError
from ciuic.planner.escalate import escalations
from ciuic.recovery import Rung
from ciuic_hf import CiuicCallback
from tests.hf.common import LR, arguments
from tests.models import LLAMA_LORA_TARGETS, assert_adamw_runs_agree, deepseek_v3, lora, progressions, qwen2

STEPS = 2
ROWS = 4
VALID = 31  # valid (shifted) labels per row: no padding
LAST = dict(loss="chunked", activations="int4", checkpointing="full", offload=["activations"])
"""The end of the planner's config order: only micro-batches come after it."""


class IdentifiedRows(torch.utils.data.Dataset):
    """Progressions with a ``sample_id`` per row."""

    def __init__(self, count: int) -> None:
        self.ids = progressions(batch_size=count, seq_len=32)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "labels": self.ids[index], "sample_id": index}


class ProbeTrainer(Trainer):
    """A ``compute_loss`` subclass; the samples whose loss reached the update are read from the
    gradient of a ``probe`` parameter of the model (zeros, one entry per sample).

    The probe enters the loss as each row's entry times its valid tokens over
    ``num_items_in_batch``, the normalization of the model's own loss: its gradient is
    ``31 / 124 = 1/4`` per sample of a batch of 4, split or not (exact in binary). A failed
    attempt's gradient left in place would show as ``2/4``, a lost sample as 0 (with gradient
    accumulation over 2 batches: ``1/8`` per sample).
    """

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        ids = inputs.pop("sample_id")
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss + (probe(model)[ids] * VALID).sum() / num_items_in_batch


def probe(model: Any) -> torch.nn.Parameter:
    parameter: torch.nn.Parameter = model.get_parameter("probe")
    return parameter


class Ledger(TrainerCallback):
    """Reads the probe before each optimizer step; counts the steps."""

    def __init__(self, rows_per_step: int) -> None:
        self.rows_per_step = rows_per_step
        self.seen: list[int] = []
        self.optimizer_steps = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        grad = probe(kwargs["model"]).grad * self.rows_per_step
        counts = grad.round().long().tolist()
        torch.testing.assert_close(grad, torch.tensor(counts, dtype=grad.dtype))
        self.seen += [sample for sample, count in enumerate(counts) for _ in range(count)]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer_steps += 1


def train(
    tmp_path: Path, callback: CiuicCallback, accumulation: int = 1, model: torch.nn.Module | None = None
) -> tuple[ProbeTrainer, Ledger]:
    samples = ROWS * STEPS * accumulation
    model = lora(deepseek_v3()) if model is None else model
    model.register_parameter("probe", torch.nn.Parameter(torch.zeros(samples)))
    ledger = Ledger(ROWS * accumulation)
    args = arguments(
        tmp_path,
        max_steps=STEPS,
        gradient_accumulation_steps=accumulation,
        remove_unused_columns=False,
        weight_decay=0.0,
    )
    trainer = ProbeTrainer(
        model=model,
        args=args,
        train_dataset=IdentifiedRows(samples),
        callbacks=[callback, ledger],
    )
    trainer.train()
    return trainer, ledger


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_an_oom_step_is_retried_under_the_next_rung_and_matches_that_rung_from_the_start(
    tmp_path: Path,
) -> None:
    start = ciuic.CiuicConfig(budget=1_600_000)
    chunked, int8 = escalations(start)[:2]
    callback = CiuicCallback(budget=1_600_000)
    ours, ours_ledger = train(tmp_path / "ours", callback)
    reference, reference_ledger = train(tmp_path / "reference", CiuicCallback(int8.replace(budget=None)))

    recovery = callback.recovery
    assert recovery is not None
    assert recovery.tried == [Rung(start), Rung(chunked), Rung(int8)]
    assert int8.activations.codec == "int8"
    assert ciuic.handle_of(ours.model).config == int8  # type: ignore[union-attr]
    assert Counter(ours_ledger.seen) == Counter(range(ROWS * STEPS)) == Counter(reference_ledger.seen)
    assert ours_ledger.optimizer_steps == reference_ledger.optimizer_steps == STEPS
    after, expected = trainable(ours), trainable(reference)
    assert all(torch.equal(after[name], expected[name]) for name in expected)


def test_micro_batches_keep_the_batch_and_its_loss(tmp_path: Path) -> None:
    callback = CiuicCallback(budget=1_300_000, **LAST)
    ours, ours_ledger = train(tmp_path / "ours", callback)
    whole, whole_ledger = train(tmp_path / "whole", CiuicCallback(**LAST))

    recovery = callback.recovery
    assert recovery is not None
    assert [rung.micro_batches for rung in recovery.tried] == [1, 2]
    assert Counter(ours_ledger.seen) == Counter(range(ROWS * STEPS)) == Counter(whole_ledger.seen)
    assert ours_ledger.optimizer_steps == whole_ledger.optimizer_steps == STEPS
    logged = [e["loss"] for e in ours.state.log_history if "loss" in e]
    expected_loss = [e["loss"] for e in whole.state.log_history if "loss" in e]
    assert logged == pytest.approx(expected_loss, rel=1e-6)  # the parts' sum is the batch's loss
    # Another summation order: tests.models.assert_adamw_runs_agree says what that allows.
    assert_adamw_runs_agree(trainable(ours), trainable(whole), lr=LR)


def test_micro_batches_inside_a_gradient_accumulation_window(tmp_path: Path) -> None:
    # 2 batches of 4 per optimizer step: num_items_in_batch counts the window's 248 tokens and
    # each micro-batch keeps it. (A retry in the middle of a window keeping the gradients of its
    # earlier batches is tests/core/recovery's test_a_retried_batch_keeps_the_gradients...)
    callback = CiuicCallback(budget=1_300_000, **LAST)
    ours, ours_ledger = train(tmp_path / "ours", callback, accumulation=2)
    whole, whole_ledger = train(tmp_path / "whole", CiuicCallback(**LAST), accumulation=2)

    recovery = callback.recovery
    assert recovery is not None
    assert [rung.micro_batches for rung in recovery.tried] == [1, 2]
    assert Counter(ours_ledger.seen) == Counter(range(2 * ROWS * STEPS)) == Counter(whole_ledger.seen)
    assert ours_ledger.optimizer_steps == whole_ledger.optimizer_steps == STEPS
    assert_adamw_runs_agree(trainable(ours), trainable(whole), lr=LR)


def test_nothing_fits_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(NothingFitsError, match="Nothing in the ladder fits"):
        train(tmp_path, CiuicCallback(budget=600_000))


def test_auto_fields_are_planned_at_the_first_step_and_the_run_fits_its_budget(tmp_path: Path) -> None:
    """Issue #14, budget at run time through the callback: the planned config fits, so the
    recovery never escalates, and every sample reaches the update once."""
    # Qwen2: the planner prices on fake tensors, whose grouped matmul (the fp32 DeepSeek-V3's
    # fused experts) takes bf16 only. Plain step 1.74 MB; loss='chunked', activations='int8' 1.23.
    callback = CiuicCallback(budget=1_400_000, activations="auto", loss="auto")
    ours, ledger = train(tmp_path, callback, model=lora(qwen2(), targets=LLAMA_LORA_TARGETS))
    handle = ciuic.handle_of(ours.model)
    assert handle is not None and handle.plan is not None and handle.plan.fits
    assert handle.config == handle.plan.config != handle.requested.without_auto()  # type: ignore[union-attr]
    assert callback.recovery is not None and callback.recovery.tried == [Rung(handle.config)]
    assert Counter(ledger.seen) == Counter(range(ROWS * STEPS)) and ledger.optimizer_steps == STEPS
