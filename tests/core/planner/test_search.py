"""``ciuic.plan`` on small models: real pricing on fake tensors, no mocks."""

from __future__ import annotations

import json

import pytest
import torch

import ciuic
from ciuic import CiuicConfig
from ciuic.errors import ConfigError
from ciuic.planner import Candidate, Plan, margin_bytes, qlora_recipe


def small_qwen2(layers: int = 4) -> object:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config.dtype = torch.bfloat16
    return config


def budget_leaving(usable: int) -> int:
    """The budget whose margin leaves ``usable`` bytes (margin: 1 GiB + 10% of the budget)."""
    budget = int((usable + 2**30) / 0.9)
    while budget - margin_bytes(budget) < usable:
        budget += 1
    return budget


@pytest.mark.slow
def test_plan_picks_a_fitting_config_when_the_plain_one_does_not_fit() -> None:
    shape = small_qwen2()
    plain = ciuic.plan(shape, seq_len=64, batch=2, budget="1TiB", lora=8)
    assert plain.fits and plain.config.requested() == {"budget": 2**40}  # everything fits: nothing on
    usable = plain.predicted_peak_bytes * 2 // 3
    tight = ciuic.plan(shape, seq_len=64, batch=2, budget=budget_leaving(usable), lora=8)
    assert tight.fits
    assert tight.predicted_peak_bytes <= usable
    assert tight.chosen is tight.candidates[-1]  # the search stops at the first fit
    assert tight.config.requested().keys() - {"budget"}
    for candidate in tight.to_dict()["candidates"]:
        assert CiuicConfig.from_dict(candidate["config"]).to_dict() == candidate["config"]


def test_candidates_are_priced_as_given_and_the_table_lists_them() -> None:
    shape = small_qwen2(layers=2)
    configs = [qlora_recipe(), CiuicConfig.preset("balanced")]
    result = ciuic.plan(shape, seq_len=32, batch=1, budget="1TiB", lora=8, candidates=configs)
    assert [c.config for c in result.candidates] == configs
    table = result.table()
    assert "nf4 ckpt=full" in table and "yes" in table and "margin 103.40 GiB" in table
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) >= {"fits", "config", "predicted_peak_bytes", "breakdown", "candidates"}
    assert data["predicted_peak_bytes"] == sum(v for k, v in data["breakdown"].items() if k != "offloaded")


def test_plan_of_a_loaded_model_leaves_it_alone() -> None:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(small_qwen2(layers=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ciuic.plan(model, seq_len=16, batch=1, budget="1TiB", lora=4, candidates=[qlora_recipe()])
    assert result.fits
    assert ciuic.handle_of(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())


def test_chosen_is_the_fitting_candidate_of_least_slowdown() -> None:
    def cand(slowdown: float, fits: bool, error: str = "") -> Candidate:
        return Candidate(CiuicConfig(), 10, {"parameters": 10}, fits, slowdown, 0.0, error)

    slow, faster = cand(1.6, True), cand(1.2, True)
    plan = Plan(
        candidates=(cand(1.0, False, error="failed"), slow, faster, cand(1.1, False)),
        budget=2**31,
        margin=2**30,
        seq_len=8,
        batch=1,
        lora=None,
    )
    assert plan.chosen is faster


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ConfigError, match="seq_len=0"):
        ciuic.plan("deepseek-r1-distill-qwen-7b", seq_len=0, batch=1, budget="8GiB")
    with pytest.raises(ConfigError, match="budget"):
        ciuic.plan("deepseek-r1-distill-qwen-7b", seq_len=8, batch=1, budget="eight")
    with pytest.raises(ConfigError, match="shipped shape"):
        ciuic.plan("no-such-model", seq_len=8, batch=1, budget="8GiB")
