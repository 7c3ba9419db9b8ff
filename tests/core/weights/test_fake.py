"""bitsandbytes layers under FakeTensorMode: the stored tensors of the real layers, and
bitsandbytes' own forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ciuic.weights.linear import _stored_tensors, dequantize_linear, linear_storage_bytes, quantize_linear

FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)]


def _layout(q: torch.nn.Module) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in _stored_tensors(q)]


@pytest.mark.parametrize(("fmt", "double_quant"), FORMATS, ids=[f"{f}{'-dq' * d}" for f, d in FORMATS])
def test_fake_layer_stores_what_the_real_one_stores(fmt: str, double_quant: bool) -> None:
    linear = torch.nn.Linear(256, 192, bias=True, dtype=torch.bfloat16)
    real = quantize_linear(linear, fmt, double_quant=double_quant)
    with FakeTensorMode() as mode:
        fake_linear = torch.nn.Linear(256, 192, bias=True, dtype=torch.bfloat16)
        fake = quantize_linear(fake_linear, fmt, double_quant=double_quant)
        assert type(fake) is type(real)
        assert _layout(fake) == _layout(real)
        x = torch.empty(3, 256, dtype=torch.bfloat16, requires_grad=True)
        fake(x).sum().backward()  # bitsandbytes' forward and backward, on fake tensors
        assert x.grad is not None and x.grad.shape == x.shape
        assert dequantize_linear(fake).shape == (192, 256)
    assert mode is not None
    assert sum(t.untyped_storage().nbytes() for t in _stored_tensors(real)) == linear_storage_bytes(real)
