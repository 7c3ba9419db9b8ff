"""Codecs, bit packing and view layouts: exact round trips where lossless, error bounds where not."""

from __future__ import annotations

import pytest
import torch

from ciuic.activations.codecs import (
    INT_BITS,
    CodecSpec,
    decode,
    encode,
    pack_bits,
    pack_mask,
    unpack_bits,
    unpack_mask,
)
from ciuic.activations.layout import flatten
from ciuic.errors import ConfigError

SIZES = (1, 7, 64, 4097)  # one element, a partial group, one group, awkward


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


@pytest.mark.parametrize("numel", SIZES)
def test_mask_is_one_bit_per_element(numel: int) -> None:
    mask = torch.rand(numel) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_mask(packed, numel), mask)


# Worst-case error of one element, in units of its group's range (max - min) or absmax:
# half a step to nearest, one step stochastic; e4m3 has 3 mantissa bits (2**-4 relative).
@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int_codec_error_bound(codec: str, stochastic: bool, numel: int, dtype: torch.dtype) -> None:
    x = (torch.randn(numel) * 3 + 1).to(dtype)
    spec = CodecSpec(codec, group_size=64, stochastic=stochastic)
    enc = encode(x, spec)
    y = decode(enc)
    assert y.dtype == dtype and y.shape == x.shape
    assert enc.nbytes == spec.bytes_for(numel)
    groups = torch.nn.functional.pad(x.float(), (0, -numel % 64), value=float(x[-1])).view(-1, 64)
    low, high = enc.meta.float().unbind(1)
    # the stored range holds the group and is at most one bf16 step wider at each end
    assert bool((low <= groups.amin(1)).all() and (high >= groups.amax(1)).all())
    slack = 2**-7 * torch.maximum(groups.amin(1).abs(), groups.amax(1).abs())
    assert bool((high - low <= groups.amax(1) - groups.amin(1) + 2 * slack).all())
    step = ((high - low) / (2 ** INT_BITS[codec] - 1)).repeat_interleave(64)[:numel]
    err = (y.float() - x.float()).abs()
    # half a step to nearest, under one step stochastic; plus the rounding back to a 16-bit dtype
    limit = step * (1.0 if stochastic else 0.5) * 1.0001 + x.float().abs() * 2**-7 * (dtype != torch.float32)
    assert bool((err <= limit + 1e-6).all())


def test_fp8_error_bound() -> None:
    x = torch.randn(4097) * 10
    enc = encode(x, CodecSpec("fp8", group_size=64))
    assert enc.nbytes == 65 * 64 + 65 * 2  # 65 groups (the last padded), one bf16 scale each
    rel = ((decode(enc) - x).abs() / x.abs().clamp_min(1e-3)).quantile(0.99)
    assert rel <= 2**-4


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.linspace(-1, 1, 64)
    spec = CodecSpec("int2", group_size=64, stochastic=True)
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([decode(encode(x, spec, gen)) for _ in range(4000)]).mean(0)
    step = 2 / 3  # the group's range over 3 steps
    # standard error of a mean of 4000 draws of at most one step: step / (2 * sqrt(4000)) ~ 0.005
    assert (mean - x).abs().max() < 0.03 * step * 3
    assert (decode(encode(x, CodecSpec("int2", group_size=64))) - x).abs().max() > 0.1  # nearest is biased


def test_constant_and_zero_groups_are_exact() -> None:
    for x in (torch.zeros(128), torch.full((128,), 3.5)):
        for codec in ("int8", "int4", "int2", "fp8"):
            assert torch.equal(decode(encode(x, CodecSpec(codec))), x)


@pytest.mark.parametrize("bad", [0, 7, 12, 2**17, True, "64"])
def test_group_size_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="group_size"):
        CodecSpec("int8", group_size=bad)  # type: ignore[arg-type]


def test_unknown_codec_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="'fp8', 'int8', 'int4', 'int2'"):
        CodecSpec("int3")


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.t(),
        lambda x: x[:, 1:5],
        lambda x: x[2],
        lambda x: x.unsqueeze(0).expand(3, 6, 8),
        lambda x: x[:, :1].expand(6, 8),
        lambda x: x.permute(1, 0)[::2],
    ],
    ids=["contiguous", "transpose", "slice", "row", "expand", "broadcast-column", "strided"],
)
def test_layout_restores_shape_strides_and_values(make: object) -> None:
    base = torch.randn(6, 8)
    view = make(base)  # type: ignore[operator]
    flat_layout = flatten(view)
    assert flat_layout is not None
    flat, layout = flat_layout
    restored = layout.restore(flat.clone())
    assert restored.shape == view.shape and restored.stride() == view.stride()
    assert torch.equal(restored, view)


def test_views_of_one_dense_block_share_a_region() -> None:
    x = torch.randn(4, 6)
    (_, a), (_, b) = flatten(x), flatten(x.t())  # type: ignore[misc]
    assert a.region is not None and a.region == b.region
    (_, c) = flatten(x[1:])  # type: ignore[misc]
    assert c.region != a.region
