"""The escalation order the OOM recovery follows."""

from __future__ import annotations

from ciuic import CiuicConfig
from ciuic.planner import escalations, micro_batch_counts


def _fields(config: CiuicConfig) -> tuple[object, ...]:
    d = config.to_dict()
    return d["loss"], d["activations"], d["checkpointing"], d["offload"]


def test_order_from_nothing() -> None:
    assert [_fields(c) for c in escalations(CiuicConfig())] == [
        ("chunked", "none", "none", []),
        ("chunked", "int8", "none", []),
        ("chunked", "int4", "none", []),
        ("chunked", "int4", 2, []),
        ("chunked", "int4", "full", []),
        ("chunked", "int4", "full", ["activations"]),
    ]


def test_met_steps_are_left_out_and_nothing_is_made_less() -> None:
    start = CiuicConfig(activations="int2", checkpointing="full", optimizer="adamw8bit", weights="nf4")
    steps = escalations(start)
    assert [_fields(c) for c in steps] == [
        ("chunked", "int2", "full", []),
        ("chunked", "int2", "full", ["activations"]),
    ]
    assert all(c.weights == "nf4" and c.optimizer == "adamw8bit" for c in steps)


def test_the_end_of_the_order_is_empty() -> None:
    assert escalations(CiuicConfig.preset("max")) == []


def test_every_step_round_trips() -> None:
    for config in escalations(CiuicConfig(budget="8GiB")):
        assert CiuicConfig.from_dict(config.to_dict()) == config
        assert config.budget == 8 * 2**30


def test_micro_batches() -> None:
    assert micro_batch_counts(8) == [2, 4, 8]
    assert micro_batch_counts(5) == [2, 4, 5]
    assert micro_batch_counts(2) == [2]
    assert micro_batch_counts(1) == []
