"""``price(attention="fused")``: attention priced as a GPU's memory-efficient kernel."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from ciuic import ConfigError
from ciuic.planner import price
from ciuic.planner.attention import fused_attention_forward
from tests.models import deepseek_v3, lora

SEQ = 512


def _mla() -> torch.nn.Module:
    return deepseek_v3(hidden_size=128).to(torch.bfloat16)


def _price(attention: str) -> int:
    pricing = price(_mla, "off", seq_len=SEQ, batch=1, lora=lambda m: lora(m, rank=8), attention=attention)
    return int(pricing.breakdown["temporary"])


def test_fused_attention_keeps_no_score_matrix_where_the_cpu_kernel_does() -> None:
    model = _mla()
    heads = model.config.num_attention_heads
    score_matrix = heads * SEQ * SEQ * 2  # one layer's bf16 heads x T x T
    as_run, fused = _price("as_run"), _price("fused")
    assert as_run - fused >= score_matrix


def test_fused_attention_returns_what_sdpa_returns_in_transformers_layout() -> None:
    class Attention(torch.nn.Module):
        num_key_value_groups = 2
        is_causal = True

    with FakeTensorMode():
        query = torch.randn(1, 4, 16, 24, dtype=torch.bfloat16, requires_grad=True)
        key = torch.randn(1, 2, 16, 24, dtype=torch.bfloat16)
        value = torch.randn(1, 2, 16, 8, dtype=torch.bfloat16)
        out, weights = fused_attention_forward(Attention(), query, key, value, None, scaling=0.5)
        expected = F.scaled_dot_product_attention(
            query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), is_causal=True, scale=0.5
        )
        out.sum().backward()
        assert out.shape == expected.transpose(1, 2).shape == (1, 16, 4, 8)
        assert weights is None and query.grad is not None and query.grad.shape == query.shape


def test_attention_choices_are_checked_before_pricing() -> None:
    with pytest.raises(ConfigError, match=r"attention='flash' is not allowed\. Allowed: 'as_run', 'fused'"):
        price(_mla, "off", seq_len=8, batch=1, attention="flash")
    with pytest.raises(ConfigError, match=r"attention='fused' .* no CPU kernel: use it with fake=True"):
        price(_mla, "off", seq_len=8, batch=1, attention="fused", fake=False)
