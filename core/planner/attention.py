"""Attention priced as a GPU runs it: torch's fused memory-efficient kernel, never a T x T matrix.

Fake CPU tensors run CPU kernels, and torch's CPU dispatch of ``scaled_dot_product_attention``
takes its math kernel for fake inputs (and for MLA's unequal query/value head dims on real ones),
which holds the ``heads x T x T`` score matrix and its softmax, memory a GPU's flash or
memory-efficient kernel never allocates: DeepSeek-V2-Lite QLoRA at 4,096 tokens prices at
14.26 GiB with 3.26 GiB of temporaries that way, 12.13 GiB with 1.15 GiB through
:data:`FUSED` (``python bench/moe_pricing.py [--attention as_run]``).

:data:`FUSED` is a transformers attention implementation that calls
``aten._scaled_dot_product_efficient_attention`` directly: its fake kernel allocates what the
CUDA kernel does (the output and a float32 log-sum-exp per query; backward the input gradients).
It has no CPU kernel, so it is for fake tensors only.

Grouped-query heads are repeated (``repeat_kv``, as transformers does when the kernel cannot
take ``enable_gqa``): a GPU's flash kernel reads them unrepeated, so GQA models are priced a
little high (two ``B x heads x T x head_dim`` copies per layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FUSED = "ciuic_fused"
"""The name of the implementation in transformers' ``AttentionInterface``."""


def fused_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over the memory-efficient SDPA kernel."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = int(getattr(module, "num_key_value_groups", 1))
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attention_mask, True, dropout, causal, scale=scaling
    )[0]
    return out.transpose(1, 2).contiguous(), None


def use_fused_attention_(model: nn.Module) -> bool:
    """Switch a transformers model to :data:`FUSED` in place; False if it is not one."""
    if not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FUSED, fused_attention_forward)
    AttentionMaskInterface.register(FUSED, sdpa_mask)  # None when causal alone says it all
    hf_model: Any = model
    hf_model.set_attn_implementation(FUSED)
    return True
