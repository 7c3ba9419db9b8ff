"""Issue #14, budget at run time: fields left to ``"auto"`` are what ``ciuic.plan`` picks for the
live model and the first batch's shape, set before that step runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import ciuic
from tests.models import LLAMA_LORA_TARGETS, lora, qwen2

BUDGET = 8 * 2**20  # the plain step of this job peaks near 12 MiB (the plan's table shows it)
BATCH, SEQ = 2, 256
AUTO = dict(weights="auto", activations="auto", loss="auto")


def _model() -> nn.Module:
    return lora(qwen2(hidden_size=128).to(torch.bfloat16), rank=8, targets=LLAMA_LORA_TARGETS)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": tokens, "labels": tokens}


def _two_steps(config: Any) -> tuple[ciuic.CiuicHandle, int]:
    """Two training steps of the job under ``config``; the handle and the metered peak."""
    model = _model()
    handle = ciuic.apply_(model, config)
    optimizer = ciuic.build_optimizer(
        [p for p in model.parameters() if p.requires_grad], handle.config, lr=1e-3
    )
    with ciuic.MemoryMeter(device="cpu", track=(model, optimizer)) as meter:
        for seed in range(2):
            batch = _batch(seed)
            with ciuic.step_scope(model, inputs=batch):
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return handle, meter.peak_bytes


@pytest.fixture(scope="module")
def planned() -> tuple[ciuic.CiuicHandle, int]:
    return _two_steps(ciuic.CiuicConfig(budget=BUDGET, **AUTO))


def test_the_first_step_sets_what_the_planner_picks(planned: tuple[ciuic.CiuicHandle, int]) -> None:
    handle, _ = planned
    assert handle.plan is not None and handle.plan.fits
    requested = ciuic.CiuicConfig(budget=BUDGET, **AUTO)
    assert handle.requested == requested
    direct = ciuic.plan(
        _model(),
        seq_len=SEQ,
        batch=BATCH,
        budget=BUDGET,
        lora=_lora_of(handle),
        precision="true",
        config=requested,
        margin=0,
    )
    assert handle.config == direct.config
    assert handle.config.planned() == ()
    assert handle.config.to_dict() != requested.without_auto().to_dict()  # the plan changed something
    assert "applied  weights" in handle.report()


def _lora_of(handle: ciuic.CiuicHandle) -> Any:
    from ciuic.planner.runtime import live_lora

    assert handle.model is not None
    return live_lora(handle.model)


def test_the_planned_run_fits_the_budget_the_default_one_does_not(
    planned: tuple[ciuic.CiuicHandle, int],
) -> None:
    handle, peak = planned
    assert handle.plan is not None
    assert peak <= BUDGET
    # the fake pricing inside the first step is not counted by this real meter
    assert peak == pytest.approx(handle.plan.predicted_peak_bytes, rel=0.01)
    _, plain_peak = _two_steps(ciuic.CiuicConfig(budget=BUDGET))
    assert plain_peak > BUDGET


def test_fields_given_a_value_are_kept_as_given() -> None:
    requested = ciuic.CiuicConfig(
        budget=BUDGET, activations="auto", checkpointing="full", optimizer="adamw8bit"
    )
    handle, _ = _two_steps(requested)
    assert handle.plan is not None
    assert all(
        (c.config.checkpointing, c.config.optimizer, c.config.weights.enabled) == ("full", "adamw8bit", False)
        for c in handle.plan.candidates
    )
    assert handle.config.replace(activations="none") == requested.without_auto()


def test_auto_needs_a_budget_and_names_the_field() -> None:
    with pytest.raises(ciuic.ConfigError, match="weights='auto' is not allowed without a budget"):
        ciuic.CiuicConfig(weights="auto")
    with pytest.raises(ciuic.ConfigError, match=r"optimizer='auto' is not allowed.*Allowed:"):
        ciuic.CiuicConfig(budget=BUDGET, optimizer="auto")


def test_auto_round_trips_through_dict_and_applies_defaults_until_planned() -> None:
    config = ciuic.CiuicConfig(budget=BUDGET, **AUTO)
    assert ciuic.CiuicConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["weights"] == "auto" and config.planned() == ("weights", "activations", "loss")
    model = _model()
    handle = ciuic.apply_(model, config)
    assert handle.planning and handle.config == config.without_auto() and handle.applied == []
    ciuic.remove_(model)


def test_update_to_auto_is_refused_naming_the_field() -> None:
    model = _model()
    handle = ciuic.apply_(model, "off")
    with pytest.raises(ciuic.ConfigError, match=r"activations='auto' is not allowed in update\(\).*Allowed:"):
        handle.update(ciuic.CiuicConfig(budget=BUDGET, activations="auto"))
    assert handle.config == ciuic.CiuicConfig()
    ciuic.remove_(model)


def test_a_training_forward_before_the_plan_is_refused() -> None:
    """A loop that never passes the batch to ``step_scope`` would train with the defaults: refused."""
    model = _model()
    ciuic.apply_(model, ciuic.CiuicConfig(budget=BUDGET, activations="auto"))
    with pytest.raises(ciuic.ConfigError, match=r"activations='auto' is planned for the first batch's shape"):
        model(**_batch()).loss.backward()
    with torch.no_grad():
        model(**_batch())  # evaluation is no training step: nothing to plan
    ciuic.remove_(model)


def test_what_cannot_be_planned_is_one_error_naming_the_fields() -> None:
    model = _model()
    ciuic.apply_(model, ciuic.CiuicConfig(budget=BUDGET, loss="auto"))
    with pytest.raises(ciuic.ConfigError, match=r"inputs=dict holds no \(batch, tokens\) tensor"):
        ciuic.step_scope(model, inputs={"labels": torch.zeros(4)})
    ciuic.remove_(model)
    plain = nn.Sequential(nn.Linear(4, 4))
    ciuic.apply_(plain, ciuic.CiuicConfig(budget=BUDGET, activations="auto"))
    with pytest.raises(ciuic.ConfigError, match="holds no transformers causal LM"):
        ciuic.step_scope(plain, inputs=torch.zeros(2, 4, dtype=torch.long))
    ciuic.remove_(plain)


def test_a_model_the_planner_cannot_price_is_one_error_with_the_pricing_error() -> None:
    """The fp32 DeepSeek-V3's fused experts run a grouped matmul whose fake kernel takes bf16 only."""
    from tests.models import deepseek_v3

    model = lora(deepseek_v3())
    ciuic.apply_(model, ciuic.CiuicConfig(budget=BUDGET, loss="auto"))
    could_not = r"loss='auto': the planner could not price this model \(RuntimeError"
    with pytest.raises(ciuic.ConfigError, match=could_not):
        ciuic.step_scope(model, inputs=_batch())
    ciuic.remove_(model)
