"""Issue #14: no preset loses to the plain QLoRA recipe at 7B, at 1k, 4k and 16k tokens."""

from __future__ import annotations

import functools

import pytest

import ciuic
from ciuic import CiuicConfig
from ciuic.planner import Candidate, qlora_recipe

MODEL = "deepseek-r1-distill-qwen-7b"


@functools.cache
def priced(preset: str, tokens: int) -> tuple[Candidate, Candidate]:
    """(QLoRA recipe, preset) priced on the full-size shape."""
    configs = [qlora_recipe(), CiuicConfig.preset(preset)]
    result = ciuic.plan(
        MODEL, seq_len=tokens, batch=1, budget="1TiB", lora=16, candidates=configs
    )
    recipe, chosen = result.candidates
    return recipe, chosen


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1024, 4096, 16384])
def test_balanced_beats_the_qlora_recipe(tokens: int) -> None:
    recipe, balanced = priced("balanced", tokens)
    assert not recipe.error and not balanced.error
    assert balanced.peak_bytes < recipe.peak_bytes


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1024, 4096, 16384])
def test_max_beats_the_qlora_recipe_and_todays_max(tokens: int) -> None:
    recipe, best = priced("max", tokens)
    assert not best.error, best.error
    assert best.peak_bytes < recipe.peak_bytes
    if tokens == 4096:
        assert best.peak_bytes <= 6.87 * 2**30
