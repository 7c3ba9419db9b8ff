"""Fake-tensor helpers and kernel scratch that a dispatch mode cannot see."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ciuic import MemoryMeter
from ciuic.memory.fake import fake_mode_active, is_fake, storage_key
from ciuic.weights.linear import quantize_linear

FP32 = 4


def test_storage_key_tells_fake_storages_apart_and_joins_views() -> None:
    with FakeTensorMode():
        a, b = torch.empty(8), torch.empty(8)
        assert fake_mode_active()
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == 0
        assert storage_key(a.untyped_storage()) != storage_key(b.untyped_storage())
        assert storage_key(a[2:].untyped_storage()) == storage_key(a.untyped_storage())
        assert is_fake(a)
    assert not fake_mode_active() and not is_fake(torch.empty(1))


def _nf4_forward(fake: bool) -> MemoryMeter:
    mode = FakeTensorMode() if fake else torch.autograd.grad_mode.no_grad()
    with mode:
        q = quantize_linear(torch.nn.Linear(1024, 512), "nf4")
        x = torch.empty(4, 1024)
        with torch.no_grad(), MemoryMeter(device="cpu") as meter:
            q(x)
    return meter


def test_gemm_4bit_counts_the_dense_weight_it_makes_inside() -> None:
    """bitsandbytes' gemm_4bit dequantizes the whole weight inside its kernel: counted as
    scratch beside the output, the same on real and fake tensors."""
    real, fake = _nf4_forward(fake=False), _nf4_forward(fake=True)
    output = 4 * 512 * FP32
    assert real.peak_bytes == output + 512 * 1024 * FP32
    assert real.peak_by_category["temporary"] == real.peak_bytes
    assert fake.reading() == real.reading()
    assert real.current_bytes == output  # the scratch is gone once the op returns
