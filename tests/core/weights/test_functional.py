"""Block-wise codecs and the frozen-weight linear."""

from __future__ import annotations

import pytest
import torch

from ciuic.weights import Codec, frozen_linear, snr_db, storage_bytes

# Fidelity floors on Gaussian weights, per format (dB); sizes include awkward ones.
MIN_SNR = {"nf4": 18.0, "fp4": 17.5, "int8": 35.0}


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("numel", [1, 63, 4097, 64 * 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_round_trip(fmt: str, numel: int, dtype: torch.dtype) -> None:
    torch.manual_seed(numel)
    x = (torch.randn(numel) * 0.02).to(dtype)
    codec = Codec(fmt)
    data, absmax = codec.encode(x)
    assert data.dtype == torch.uint8 and data.numel() == codec.packed_numel(numel)
    assert absmax.dtype == torch.float32 and absmax.numel() == -(-numel // codec.blocksize)
    y = codec.decode(data, absmax, torch.Size([numel]), dtype)
    assert y.dtype == dtype and y.shape == x.shape
    if numel > 1:
        assert snr_db(x, y) >= MIN_SNR[fmt]
    else:  # a single value is its own block maximum: exact
        assert torch.equal(x, y)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_codec_rows_decode_independently(fmt: str) -> None:
    w = torch.randn(3, 64, 256)
    codec = Codec(fmt)
    data, absmax = codec.encode(w)
    whole = codec.decode(data, absmax, w.shape, w.dtype)
    rows_data, rows_absmax = data.view(3, -1), absmax.view(3, -1)
    for e in range(3):
        assert torch.equal(codec.decode(rows_data[e], rows_absmax[e], w.shape[1:], w.dtype), whole[e])


def test_frozen_linear_matches_linear_and_saves_no_weight() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(16, 32), torch.randn(16, requires_grad=True)
    x = torch.randn(4, 7, 32, requires_grad=True)
    calls = []

    def weight() -> torch.Tensor:
        calls.append(1)
        return w

    out = frozen_linear(x, weight, b)
    ref_x, ref_b = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(ref_x, w, ref_b)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, ref_b.grad, rtol=1e-6, atol=1e-6)
    assert len(calls) == 2  # rebuilt in backward instead of kept alive


def test_snr_and_storage_bytes() -> None:
    x = torch.ones(4)
    assert snr_db(x, x) == float("inf")
    assert round(snr_db(x, x * 1.1), 3) == 20.0
    t = torch.zeros(10, dtype=torch.uint8)
    assert storage_bytes(t, t[2:], None, torch.empty(3, device="meta")) == 10
