"""bitsandbytes linears: conversion, dequantization, state_dict loading gaps closed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ciuic.weights import dequantize_linear, quantize_linear, snr_db


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_quantize_linear_keeps_bias_and_original(fmt: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64).requires_grad_(False)
    weight = linear.weight.detach().clone()
    q = quantize_linear(linear, fmt, double_quant=fmt != "int8")
    assert q.bias is linear.bias and torch.equal(linear.weight, weight)
    assert not q.weight.requires_grad
    dense = dequantize_linear(q)
    assert dense.shape == weight.shape
    assert snr_db(weight, dense) >= {"nf4": 18, "fp4": 17.5, "int8": 35}[fmt]
    x = torch.randn(3, 256)
    torch.testing.assert_close(
        q(x), nn.functional.linear(x, dense.float(), linear.bias), rtol=0.05, atol=0.05
    )


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_load_state_dict_after_a_forward_is_bitwise(fmt: str) -> None:
    torch.manual_seed(0)
    source = quantize_linear(nn.Linear(256, 64).requires_grad_(False), fmt).eval()
    target = quantize_linear(nn.Linear(256, 64).requires_grad_(False), fmt).eval()
    x = torch.randn(5, 256)
    with torch.no_grad():  # eval + no grad: 4-bit weights get repacked for the CPU kernel
        expected = source(x)
        target(x)
    state = source.state_dict()
    assert str(target.load_state_dict(state)) == "<All keys matched successfully>"
    with torch.no_grad():
        assert torch.equal(target(x), expected)
    assert torch.equal(dequantize_linear(target), dequantize_linear(source))


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format='int4' is not a bitsandbytes linear format"):
        quantize_linear(nn.Linear(4, 4), "int4")


def test_cpu_inference_repacking_is_off_so_weights_survive_state_dict() -> None:
    # bitsandbytes 0.50.2 on avx512-bf16 CPUs: an eval/no-grad forward repacks the weight and
    # state_dict() then leaves its scales transposed (the layer's SNR falls to about -3 dB).
    q = quantize_linear(nn.Linear(256, 64).requires_grad_(False), "nf4").eval()
    before = dequantize_linear(q)
    with torch.no_grad():
        q(torch.randn(2, 256))
    q.state_dict()
    assert torch.equal(dequantize_linear(q), before)
