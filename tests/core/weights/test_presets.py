"""What the presets do to the frozen weights of a LoRA model (issue #10, defect 9b)."""

from __future__ import annotations

import torch

import ciuic
from ciuic.weights import QuantizedEmbedding, QuantizedHead
from tests.models import deepseek_v3, lora, qwen2


def _tables(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name.endswith(("lm_head", "embed_tokens")) and not name.endswith("lora_embedding")
    }


def test_max_stores_the_frozen_head_and_embeddings_in_8_bits_per_weight() -> None:
    for build in (deepseek_v3, qwen2):
        model = lora(build())
        dense = {name: module.weight.numel() for name, module in _tables(model).items()}
        assert len(dense) == 2
        ciuic.apply_(model, "max")
        for name, module in _tables(model).items():
            assert isinstance(module, (QuantizedEmbedding, QuantizedHead)), name
            assert module.weight_data.dtype == torch.uint8 and module.weight_data.numel() == dense[name]
            scale_bits = 8 * module.weight_absmax.numel() * 4 / dense[name]
            assert scale_bits <= 0.5, (name, scale_bits)  # one fp32 scale per 64 weights at most


def test_balanced_leaves_head_and_embeddings_as_they_are() -> None:
    model = lora(deepseek_v3())
    ciuic.apply_(model, "balanced")
    assert {type(m).__name__ for m in _tables(model).values()} == {"Linear", "Embedding"}
