import json
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic import CiuicConfig, ConfigError
from ciuic.config import CONFIG_VERSION, FIELDS

# Every field, and for each several values it must refuse. A new field without an entry here
# fails test_every_field_has_invalid_examples.
INVALID: dict[str, list[object]] = {
    "weights": ["nf5", "NF4", "", None, 4, ["nf4"]],
    "activations": ["int3", "fp16", "INT8", None, 8],
    "offload": ["gpu", ["activations", "gradients"], 5, {"activations": True}, [1], 2.5],
    "checkpointing": ["some", "", 0, -1, True, 1.5, None, [2]],
    "optimizer": ["sgd", "adam", "AdamW", None, 8],
    "step_in_backward": ["yes", 1, 0, None, "True"],
    "loss": ["fused", "", None, 1],
    "budget": [0, -5, "lots", "24 XB", "GiB", "0GiB", True, 1.5, [1], "-1GiB"],
}

VALID: dict[str, list[tuple[object, object]]] = {  # (given, stored)
    "weights": [("none", "none"), ("int8", "int8"), ("nf4", "nf4"), ("fp4", "fp4")],
    "activations": [(v, v) for v in ("none", "fp8", "int8", "int4", "int2")],
    "offload": [
        (set(), frozenset()),
        (None, frozenset()),
        ("none", frozenset()),
        ("activations", frozenset({"activations"})),
        (["optimizer", "activations"], frozenset({"activations", "optimizer"})),
        ({"activations"}, frozenset({"activations"})),
    ],
    "checkpointing": [("none", "none"), ("auto", "auto"), ("full", "full"), (1, 1), (3, 3)],
    "optimizer": [(v, v) for v in ("adamw", "adamw8bit", "adamw4bit")],
    "step_in_backward": [(True, True), (False, False)],
    "loss": [("standard", "standard"), ("chunked", "chunked")],
    "budget": [
        (None, None),
        (1, 1),
        ("24GiB", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("1.5 KiB", 1536),
        ("512", 512),
    ],
}


def test_every_field_has_invalid_and_valid_examples():
    assert set(INVALID) == set(FIELDS)
    assert set(VALID) == set(FIELDS)


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in INVALID.items() for v in values])
def test_invalid_value_names_field_value_and_allowed(field, value):
    with pytest.raises(ConfigError) as caught:
        CiuicConfig(**{field: value})
    message = str(caught.value)
    assert message.startswith(f"{field}={value!r} is not allowed")
    assert message.endswith(f"Allowed: {FIELDS[field].allowed}.")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("field", "given", "stored"), [(f, g, s) for f, pairs in VALID.items() for g, s in pairs]
)
def test_valid_value_is_normalized(field, given, stored):
    assert getattr(CiuicConfig(**{field: given}), field) == stored


def test_config_is_frozen_and_keyword_only():
    config = CiuicConfig()
    with pytest.raises(AttributeError):
        config.weights = "nf4"  # type: ignore[misc]
    with pytest.raises(TypeError):
        CiuicConfig("nf4")  # type: ignore[misc]


@pytest.mark.parametrize("name", CiuicConfig.PRESETS)
def test_presets_round_trip_through_dict_json_yaml_and_pickle(name, tmp_path):
    config = CiuicConfig.preset(name)
    assert CiuicConfig.from_dict(config.to_dict()) == config
    assert CiuicConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert pickle.loads(pickle.dumps(config)) == config
    for suffix in (".json", ".yaml", ".yml"):
        path = tmp_path / f"c{suffix}"
        config.to_file(path)
        assert CiuicConfig.from_file(path) == config


def test_presets_differ_and_overrides_apply():
    off, balanced, most = (CiuicConfig.preset(n) for n in ("off", "balanced", "max"))
    assert off == CiuicConfig()
    assert off.requested() == {}
    assert set(balanced.requested()) < set(most.requested())
    assert CiuicConfig.preset("balanced", budget="8GiB").budget == 8 * 2**30


def test_serialized_form_carries_version():
    data = CiuicConfig(offload={"optimizer", "activations"}).to_dict()
    assert data["version"] == CONFIG_VERSION
    assert data["offload"] == ["activations", "optimizer"]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"version": 2}, "version=2 is not supported"),
        ({"version": True}, "version=True is not supported"),
        ({"weight": "nf4"}, "config field 'weight' is unknown: known fields are weights, activations"),
        (["weights"], "is not a mapping"),
        ({"preset": "fast"}, "preset='fast' is unknown"),
    ],
)
def test_from_dict_rejects_bad_documents(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        CiuicConfig.from_dict(data)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="preset='fast' is unknown: choose one of 'off', 'balanced', 'max'"):
        CiuicConfig.preset("fast")


def test_file_suffix_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"suffix '\.toml'"):
        CiuicConfig().to_file(tmp_path / "c.toml")


def test_replace_validates():
    assert CiuicConfig().replace(loss="chunked").loss == "chunked"
    with pytest.raises(ConfigError, match="loss='fast'"):
        CiuicConfig().replace(loss="fast")


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True), st.text(max_size=8),
    st.sampled_from([v for pairs in VALID.values() for v, _ in pairs if not isinstance(v, set)]),
    st.lists(st.sampled_from(["activations", "optimizer", "gpu", 1]), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
_keys = st.one_of(st.sampled_from([*FIELDS, "version"]), st.text(max_size=6), st.integers())


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_random_documents_give_a_config_or_a_value_error(data):
    try:
        config = CiuicConfig.from_dict(data)
    except ValueError:
        return
    assert CiuicConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("c.yaml", "weights: nf4\nactivations: [int8\n", r"is not valid YAML: .* at line 3, column 1\.$"),
        ("c.yaml", "weights: nf4\n  bad: : indent\n", r"is not valid YAML: .* at line 2, column \d+\.$"),
        (
            "c.json",
            '{"weights": "nf4",\n "loss": }\n',
            r"is not valid JSON: Expecting value at line 2, column 10\.$",
        ),
    ],
)
def test_malformed_file_is_one_config_error_naming_file_and_position(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        CiuicConfig.from_file(path)
    message = str(caught.value)
    assert message.startswith(f"config file {str(path)!r}")
    assert "\n" not in message
    assert re.search(fragment, message), message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("name", "text"), [("c.yaml", ""), ("c.yaml", "# only a comment\n"), ("c.json", " \n")]
)
def test_empty_file_is_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty: write at least one field"):
        CiuicConfig.from_file(path)


def test_file_values_errors_name_the_file_and_a_preset_key_starts_from_a_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- weights\n")
    with pytest.raises(ConfigError, match="holds a list, not a mapping"):
        CiuicConfig.from_file(path)
    path.write_text("preset: balanced\nactivations: int4\nweights:\n  format: nf4\n  prune: '2:4'\n")
    config = CiuicConfig.from_file(path)
    assert config == CiuicConfig.preset(
        "balanced", activations="int4", weights={"format": "nf4", "prune": "2:4"}
    )
    assert config.weights.prune == "2:4"
    path.write_text("weights: {format: nf4, prune: '9:4'}\n")
    with pytest.raises(ConfigError, match=r"config file .*: weights\.prune='9:4' is not allowed"):
        CiuicConfig.from_file(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        CiuicConfig.from_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("field", "value", "attribute", "expected"),
    [
        (
            "weights",
            {"format": "nf4", "double_quant": True, "freeze": ["model.embed"]},
            "freeze",
            ("model.embed",),
        ),
        ("activations", {"codec": "int4", "group_size": 32}, "group_size", 32),
        ("loss", {"kind": "chunked", "chunk_bytes": 1024}, "chunk_bytes", 1024),
    ],
)
def test_every_technique_option_is_a_config_field(field, value, attribute, expected, tmp_path):
    config = CiuicConfig(**{field: value})
    assert getattr(getattr(config, field), attribute) == expected
    assert config.to_dict()[field] == {k: v for k, v in value.items()}
    for suffix in (".json", ".yaml"):
        config.to_file(tmp_path / f"c{suffix}")
        assert CiuicConfig.from_file(tmp_path / f"c{suffix}") == config
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(ConfigError, match=rf"{field}\.nope is not a \w+Options field: known fields are"):
        CiuicConfig(**{field: {**value, "nope": 1}})


def test_activation_rules_round_trip_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("activations:\n  codec: int2\n  rules:\n    - {codec: int8, types: ['*Attention']}\n")
    config = CiuicConfig.from_file(path)
    (rule,) = config.activations.rules
    assert (rule.codec, rule.types) == ("int8", ("*Attention",))
    config.to_file(tmp_path / "d.yaml")
    assert CiuicConfig.from_file(tmp_path / "d.yaml") == config
