"""OOM recovery through ``CiuicStrategy(budget=...)`` on a real Lightning Trainer (CPU).

The job of ``tests/core/recovery/test_recovery.py`` (LoRA on the tiny DeepSeek-V3, batches of
4 x 32 tokens), whose budgets are explained there: 1.6 MB fails the plain step in its forward
pass and fits ``loss='chunked', activations='int8'``, the second rung of the planner's order;
1.3 MB fails its last config (``loss='chunked', activations='int4', checkpointing='full',
offload={'activations'}``: 1,380,808 B at the first step) and fits it in 2 micro-batches
(1,015,240 B; 1,163,816 B with the optimizer states of the second step).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ciuic
from ciuic import ConfigError
from ciuic.errors import NothingFitsError
from ciuic.planner.escalate import escalations
from ciuic.recovery import Rung
from ciuic_lightning import CiuicStrategy
from tests.lightning.helpers import VOCAB, LoraModule, trainer
from tests.models import LLAMA_LORA_TARGETS, assert_adamw_runs_agree, lora, progressions, qwen2

STEPS = 2
LAST = dict(loss="chunked", activations="int4", checkpointing="full", offload=["activations"])
"""The end of the planner's config order: only micro-batches come after it."""


class RecordingModule(LoraModule):
    """``training_step`` calls ``self.model(...)``; the samples whose loss reached the update are
    read from the gradient of ``probe``.

    ``probe`` (zeros, one entry per sample, not optimized) enters the loss as the mean of the
    batch's entries: its value adds nothing, and its gradient is ``1/4`` per sample of a batch
    of 4, whether or not recovery split the batch (each part's loss is scaled by its share of
    the rows). A failed attempt's partial gradient, had recovery not put the gradients back,
    would show as ``2/4``; a lost sample as 0. Read before each optimizer step.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        if model is not None:
            self.model = model
        self.probe = torch.nn.Parameter(torch.zeros(4 * STEPS))
        self.seen: list[int] = []
        self.optimizer_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, ids = batch
        return self.model(input_ids=tokens, labels=tokens).loss + self.probe[ids].mean()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        counts = (self.probe.grad * 4).round().long().tolist()
        torch.testing.assert_close(self.probe.grad * 4, torch.tensor(counts, dtype=torch.float32))
        self.seen += [sample for sample, count in enumerate(counts) for _ in range(count)]
        self.probe.grad = None

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        optimizer.register_step_post_hook(lambda *args: self._stepped())
        return optimizer

    def _stepped(self) -> None:
        self.optimizer_steps += 1


def fit(
    tmp_path: Path, strategy: CiuicStrategy, model: torch.nn.Module | None = None, **kwargs: Any
) -> RecordingModule:
    torch.manual_seed(0)
    module = RecordingModule(model)
    tokens = progressions(batch_size=4 * STEPS, seq_len=32, vocab_size=VOCAB)
    data = DataLoader(TensorDataset(tokens, torch.arange(4 * STEPS)), batch_size=4, shuffle=False)
    trainer(tmp_path, strategy=strategy, max_steps=STEPS, **kwargs).fit(module, data)
    return module


def trainable(module: LoraModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_an_oom_step_is_retried_under_the_next_rung_and_matches_that_rung_from_the_start(
    tmp_path: Path,
) -> None:
    start = ciuic.CiuicConfig(budget=1_600_000)
    chunked, int8 = escalations(start)[:2]
    strategy = CiuicStrategy(budget=1_600_000)
    ours = fit(tmp_path, strategy)
    reference = fit(tmp_path, CiuicStrategy(int8.replace(budget=None)))

    recovery = strategy.ciuic_recovery
    assert recovery is not None
    assert recovery.tried == [Rung(start), Rung(chunked), Rung(int8)]
    assert int8.activations.codec == "int8"
    assert strategy.ciuic_config == int8  # what a checkpoint records
    assert Counter(ours.seen) == Counter(range(4 * STEPS)) == Counter(reference.seen)
    assert ours.optimizer_steps == reference.optimizer_steps == STEPS
    # the codec restarts from its seed when applied, at the start or at the escalation: bitwise
    after, expected = trainable(ours), trainable(reference)
    assert all(torch.equal(after[name], expected[name]) for name in expected)


def test_micro_batches_keep_the_batch_and_its_loss(tmp_path: Path) -> None:
    strategy = CiuicStrategy(budget=1_300_000, **LAST)
    ours = fit(tmp_path, strategy)
    whole = fit(tmp_path, CiuicStrategy(**LAST))

    recovery = strategy.ciuic_recovery
    assert recovery is not None
    assert [rung.micro_batches for rung in recovery.tried] == [1, 2]
    assert Counter(ours.seen) == Counter(range(4 * STEPS)) == Counter(whole.seen)
    assert ours.optimizer_steps == whole.optimizer_steps == STEPS
    # Two micro-batches sum the per-token losses in another order than one batch: the fp32
    # gradients agree to ~1e-6 relative (tests/core/recovery); tests.models.assert_adamw_runs_agree
    # says what that allows of the parameters.
    assert_adamw_runs_agree(trainable(ours), trainable(whole), lr=ours.lr)


def test_nothing_fits_stops_the_run_with_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(NothingFitsError, match="Nothing in the ladder fits"):
        fit(tmp_path, CiuicStrategy(budget=600_000))


def test_recovery_refuses_gradient_accumulation_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="accumulate_grad_batches=2"):
        fit(tmp_path, CiuicStrategy(budget=1_600_000), accumulate_grad_batches=2)


def test_auto_fields_are_planned_at_the_first_step_and_the_run_fits_its_budget(tmp_path: Path) -> None:
    """Issue #14, budget at run time through the strategy: the planned config fits, so the
    recovery never escalates, and every sample reaches the update once."""
    # Qwen2: the planner prices on fake tensors, whose grouped matmul (the fp32 DeepSeek-V3's
    # fused experts) takes bf16 only. Plain step 1.74 MB; loss='chunked', activations='int8' 1.23.
    strategy = CiuicStrategy(budget=1_400_000, activations="auto", loss="auto")
    module = fit(tmp_path, strategy, model=lora(qwen2(), targets=LLAMA_LORA_TARGETS))
    handle = ciuic.handle_of(module)
    assert handle is not None and handle.plan is not None and handle.plan.fits
    assert handle.config == handle.plan.config != handle.requested.without_auto()  # type: ignore[union-attr]
    assert strategy.ciuic_recovery is not None and strategy.ciuic_recovery.tried == [Rung(handle.config)]
    assert sorted(module.seen) == list(range(4 * STEPS)) and module.optimizer_steps == STEPS
