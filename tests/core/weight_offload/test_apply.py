"""Applying ``offload={"weights"}``: refusals, the config, ``remove_``, ``state_dict`` meanwhile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig
from ciuic.weight_offload import WeightStreamer
from tests.core.weight_offload.helpers import model_of, same_bits
from tests.models import progressions


def test_a_model_without_frozen_weights_is_refused_naming_the_field() -> None:
    with pytest.raises(ciuic.ApplyError, match=r"offload=\{'weights'\}"):
        ciuic.apply_(nn.Linear(8, 8), CiuicConfig(offload={"weights"}))


def test_config_round_trips() -> None:
    config = CiuicConfig(offload={"weights", "activations"})
    assert CiuicConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["offload"] == ["activations", "weights"]


def test_remove_restores_the_weights_bitwise_and_state_dict_reads_the_host_copies() -> None:
    model = model_of()
    untouched = copy.deepcopy(model)
    handle = ciuic.apply_(model, CiuicConfig(offload={"weights"}))
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    assert streamer.resident_bytes == 0
    assert all(s.view.untyped_storage().nbytes() == 0 for s in streamer.slots.values())
    assert same_bits(model, untouched)  # state_dict while offloaded: the host copies
    ids = progressions(batch_size=2, seq_len=16)
    model(input_ids=ids, labels=ids).loss.backward()
    assert streamer.resident_bytes == 0  # freed again when backward ended
    ciuic.remove_(model)
    frozen = [n for n, p in untouched.named_parameters() if not p.requires_grad]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], dict(untouched.named_parameters())[n]) for n in frozen)
