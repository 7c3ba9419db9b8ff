"""Models and measurements shared by the weight-conversion tests.

The DeepSeek-V3 model here is the shared tiny builder at hidden size 256 (experts of 128 x 256
weights, MLA ranks 128/64): large enough that bitsandbytes' block sizes (64 for 4-bit, 256
for 8-bit) and per-row scales cost what they cost on real models, small enough for a CPU.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ciuic import MemoryMeter
from ciuic.weights import Codec, quantize_linear
from tests.models import deepseek_v3, qwen2

HIDDEN = 256
ATTENTION_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
"""LoRA targets that PEFT 0.21 does not remap to the fused experts' parameters (it turns
``gate_proj``/``up_proj``/``down_proj`` targets on transformers-5 MoE models into
``target_parameters`` on the experts)."""


def frozen_deepseek(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """DeepSeek-V3 architecture (a dense layer, then MoE with 4 routed experts + 1 shared)."""
    return deepseek_v3(hidden_size=HIDDEN, seed=seed).to(dtype).requires_grad_(False)


def frozen_qwen2(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """Qwen2 architecture, the DeepSeek-R1-Distill shape."""
    return qwen2(hidden_size=HIDDEN, seed=seed).to(dtype).requires_grad_(False)


def warm_bitsandbytes() -> None:
    """Fill bitsandbytes' one-time caches (NF4/FP4 tables, the 8-bit dynamic map) so that a
    meter measuring a conversion sees only what the converted model holds."""
    for fmt in ("nf4", "fp4", "int8"):
        Codec(fmt).encode(torch.zeros(256))
        quantize_linear(nn.Linear(64, 64), fmt)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def measure_conversion(model: nn.Module, convert) -> dict[str, int]:
    """Bytes of the converted weights before and after ``convert(model)``, read off a MemoryMeter.

    The conversion runs inside the meter (so bitsandbytes' scales, which are not parameters
    or buffers, are seen being allocated); a spike allocated afterwards makes a new peak, so
    ``peak_by_category['parameters']`` is then the converted model's parameter bytes.
    Untouched tensors (embeddings, norms, lm_head, router) are subtracted from both figures.
    """
    warm_bitsandbytes()
    # Weak references: a storage pointer can be reused by the conversion's own allocations.
    before = [weakref.ref(t) for t in _tensors(model)]
    with MemoryMeter(track=(model,), device="cpu") as meter:
        dense = meter.current_bytes
        result = convert(model)
        spike = torch.empty(meter.peak_bytes + 1, dtype=torch.uint8)  # the new peak
        del spike
    kept = {id(t) for t in (ref() for ref in before) if t is not None}
    untouched = sum(t.untyped_storage().nbytes() for t in _tensors(model) if id(t) in kept)
    return {
        "before": dense - untouched,
        "after": meter.peak_by_category["parameters"] - untouched,
        "untouched": untouched,
        "result": result,
    }
