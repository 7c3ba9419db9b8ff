"""The device holds about two decoder blocks of frozen weights, the host all of them (``MemoryMeter``)."""

from __future__ import annotations

import itertools

import pytest
import torch

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.activations import find_blocks
from ciuic.weight_offload import WeightStreamer
from tests.core.weight_offload.helpers import (
    LAYERS,
    frozen_bytes,
    model_of,
    outside_bytes,
    train,
    trainable_bytes,
    transient_bytes,
)
from tests.models import llama, lora, progressions


@pytest.mark.parametrize("weights", ["none", "nf4"])
def test_device_holds_at_most_two_and_a_half_blocks_and_the_host_all_weights(weights: str) -> None:
    model, twin = model_of(), model_of()
    _, plain = train(twin, CiuicConfig(weights=weights), metered=True)
    frozen = frozen_bytes(twin)  # of the model as trained: NF4 blocks and scales with weights='nf4'
    block = max(frozen_bytes(b) for b in find_blocks(twin))  # a block's worth
    trainable = trainable_bytes(twin) + transient_bytes(twin)  # on the device either way
    assert plain.peak_by_category["parameters"] - trainable == frozen  # without offload: all of them
    assert frozen >= 0.8 * LAYERS * block  # the blocks are most of the weights

    _, meter = train(model, CiuicConfig(weights=weights, offload={"weights"}), metered=True)
    on_device = meter.peak_by_category["parameters"] - trainable
    assert on_device <= 2.5 * block, meter.report()
    assert meter.peak_by_category["offloaded"] == frozen, meter.report()
    assert meter.peak_offloaded_bytes == frozen


def test_forward_and_backward_fetch_each_block_once() -> None:
    model = model_of()
    handle = ciuic.apply_(model, CiuicConfig(offload={"weights"}))
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    ids = progressions(batch_size=2, seq_len=16)
    model(input_ids=ids, labels=ids).loss.backward()
    assert [streamer.fetches[f"block {i}"] for i in range(LAYERS)] == [2] * LAYERS
    with torch.no_grad():
        model(input_ids=ids)
    assert [streamer.fetches[f"block {i}"] for i in range(LAYERS)] == [3] * LAYERS
    blocks = handle.record("weight_offload").details["block_bytes"]
    assert streamer.max_resident_bytes <= max(a + b for a, b in itertools.pairwise(blocks)) + outside_bytes(
        streamer
    )
    ciuic.remove_(model)


def test_runs_under_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = lora(llama(num_layers=4), targets=("q_proj", "v_proj"))
    frozen, block = frozen_bytes(real), frozen_bytes(find_blocks(real)[0])
    with torch.device("meta"):
        model = lora(llama(num_layers=4), targets=("q_proj", "v_proj"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        handle = ciuic.apply_(model, CiuicConfig(offload={"weights"}))
        with MemoryMeter(device="cpu", track=(model,)) as meter:
            ids = torch.zeros(1, 8, dtype=torch.long)
            model(input_ids=ids, labels=ids).loss.backward()
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    assert meter.peak_by_category["offloaded"] == frozen
    assert 0 < streamer.max_resident_bytes <= 2 * block + outside_bytes(streamer)
