"""``offload={'weights'}`` is lossless: training, copies and ``remove_`` are bitwise the run without it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ciuic
from ciuic import CiuicConfig
from ciuic.activations import find_blocks
from ciuic.demo import add_lora
from tests.core.weight_offload.helpers import (
    ATTENTION,
    LAYERS,
    frozen_bytes,
    model_of,
    same_bits,
    train,
    train_on,
)
from tests.gpu import requires_cuda
from tests.models import COPIES, deepseek_v3, progressions

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "nf4": {"weights": "nf4"},
    "checkpointing": {"checkpointing": "full"},
    "step_in_backward": {"step_in_backward": True},
    "nf4_checkpointing_step_in_backward": {
        "weights": "nf4",
        "checkpointing": "full",
        "step_in_backward": True,
    },
    "activations_int8_offloaded": {"activations": "int8", "offload": {"activations"}},
    "int8": {"weights": "int8"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_is_bitwise_the_run_without_offload(variant: str) -> None:
    fields = dict(VARIANTS[variant])
    offload = set(fields.pop("offload", set()))
    model, twin = model_of(), model_of()
    expected, _ = train(model, CiuicConfig(offload=offload, **fields))
    losses, _ = train(twin, CiuicConfig(offload=offload | {"weights"}, **fields))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert same_bits(twin, model)  # every parameter (frozen ones read from the host copies)
    ciuic.remove_(model)
    ciuic.remove_(twin)
    assert same_bits(twin, model)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_routed_expert_rows_train_bitwise_like_the_run_without_offload(checkpointing: str) -> None:
    model, twin = model_of(ATTENTION), model_of(ATTENTION)  # experts without LoRA: QuantizedExperts
    expected, _ = train(model, CiuicConfig(weights="nf4", checkpointing=checkpointing))
    losses, _ = train(twin, CiuicConfig(weights="nf4", checkpointing=checkpointing, offload={"weights"}))
    assert ciuic.handle_of(twin).record("weight_offload").details["expert_modules"]
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert same_bits(twin, model)


def test_demo_lora_with_trained_head_and_embeddings_is_bitwise_the_run_without_offload() -> None:
    """``ciuic.demo.add_lora`` trains copies of ``lm_head`` and ``embed_tokens``
    (``modules_to_save``): they stay on the device, the frozen originals go to the host."""
    model, twin = add_lora(deepseek_v3(num_layers=LAYERS)), add_lora(deepseek_v3(num_layers=LAYERS))
    expected, _ = train(model, CiuicConfig())
    losses, _ = train(twin, CiuicConfig(offload={"weights"}))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert same_bits(twin, model)


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_an_offloaded_model_trains_bitwise_like_the_original(how: str) -> None:
    model = model_of()
    ciuic.apply_(model, CiuicConfig(offload={"weights"}))
    twin = COPIES[how](model)
    for m in (model, twin):
        ids = progressions(batch_size=2, seq_len=16)
        m(input_ids=ids, labels=ids).loss.backward()
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (model, twin)]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    streamer = ciuic.handle_of(twin).record("weight_offload").details["streamer"]
    assert streamer.resident_bytes == 0 and streamer.model is twin
    ciuic.remove_(twin)
    assert same_bits(twin, model)


@requires_cuda
def test_cuda_training_is_bitwise_the_run_without_offload() -> None:
    model, twin = model_of().cuda(), model_of().cuda()
    expected, _ = train_on(model, CiuicConfig(checkpointing="full"), "cuda")
    losses, meter = train_on(twin, CiuicConfig(checkpointing="full", offload={"weights"}), "cuda")
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert same_bits(twin, model)
    block = max(frozen_bytes(b) for b in find_blocks(model))
    trainable = sum(p.numel() * p.element_size() for p in twin.parameters() if p.requires_grad)
    assert meter.peak_by_category["parameters"] - trainable <= 2.5 * block, meter.report()
