"""Routed experts stored per expert are fetched from the host only when the router picks them."""

from __future__ import annotations

import ciuic
from ciuic import CiuicConfig
from ciuic.weight_offload import WeightStreamer
from ciuic.weights.experts import QuantizedExperts
from tests.core.weight_offload.helpers import ATTENTION, LAYERS, model_of
from tests.models import progressions


def test_only_the_routed_experts_the_router_picked_are_fetched() -> None:
    model = model_of(ATTENTION, num_experts=8)  # experts without LoRA: weights='nf4' stores them per expert
    handle = ciuic.apply_(model, CiuicConfig(weights="nf4", offload={"weights"}))
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    experts = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}
    assert sorted(experts) == sorted(streamer.expert_modules) and len(experts) == LAYERS - 1
    picked: dict[str, set[int]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, name=n: picked.setdefault(name, set()).update(args[1].flatten().tolist())
        )
        for n, m in experts.items()
    ]
    ids = progressions(batch_size=1, seq_len=2)
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    fetched: dict[str, list[int]] = {}
    for name, _, expert in streamer.expert_fetches:
        fetched.setdefault(name, []).append(expert)
    for name in experts:
        assert set(fetched[name]) == picked[name] and len(picked[name]) < 8
        # gate_up_proj and down_proj, in forward and again in backward
        assert sorted(fetched[name]) == sorted(list(picked[name]) * 4)
    ciuic.remove_(model)
