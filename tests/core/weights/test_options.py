"""``WeightOptions`` validation: every invalid value names the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from ciuic import ConfigError
from ciuic.weights import WeightOptions, quantize_

INVALID = {
    "format": ["int4", "NF4", None],
    "double_quant": [1, "yes"],
    "quantize_head": [0, None],
    "head": ["fp8", "INT8", None, True],
    "embeddings": ["int4", None],
    "freeze": ["model.layers", (1,)],
    "skip": ["lm_head", (None,)],
    "prune": ["2:2", "4:2", "0:4", "2-4", 0.0, 1.0, 1, "50%"],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in INVALID.items() for v in values])
def test_invalid_values_name_field_value_and_allowed(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        WeightOptions(**{field: value})
    assert f"{field}={value!r} is not allowed" in str(error.value)
    assert "Allowed:" in str(error.value)


def test_every_field_has_invalid_examples() -> None:
    assert set(INVALID) == {f.name for f in dataclasses.fields(WeightOptions)}


def test_format_none_without_pruning_is_off_and_the_shim_refuses_it() -> None:
    assert not WeightOptions(format="none").enabled
    assert WeightOptions(format="none", prune="2:4").enabled
    assert not WeightOptions(format="none", prune="2:4").quantized
    with pytest.raises(ConfigError, match="converts nothing"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), WeightOptions(format="none"))


def test_quantize_head_is_an_alias_of_head_int8_and_a_contradiction_is_refused() -> None:
    assert WeightOptions(quantize_head=True).head == "int8"
    assert WeightOptions(quantize_head=True, head="int8").head == "int8"
    with pytest.raises(ConfigError, match=r"alias of head='int8'\) contradicts head='nf4'"):
        WeightOptions(quantize_head=True, head="nf4")


def test_format_none_with_only_the_head_or_embeddings_is_allowed() -> None:
    assert WeightOptions(format="none", head="nf4").head == "nf4"
    assert WeightOptions(format="none", embeddings="int8").embeddings == "int8"


def test_options_are_frozen_keyword_only_and_pickle() -> None:
    options = WeightOptions(format="int8", freeze=["model.layers"], prune=0.5)  # type: ignore[arg-type]
    assert options.freeze == ("model.layers",)
    assert pickle.loads(pickle.dumps(options)) == options
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.format = "nf4"  # type: ignore[misc]
    with pytest.raises(TypeError):
        WeightOptions("nf4")  # type: ignore[misc]
