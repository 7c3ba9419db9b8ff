"""Block-wise state quantization and the pure update functions."""

from __future__ import annotations

import pytest
import torch

import ciuic.optim.optimizer as optimizer_module
from ciuic.optim import FORMATS, CiuicAdamW, adamw_quantized, dequantize_blockwise, quantize_blockwise
from ciuic.optim.quant import dynamic_map, nearest_codes, pack_nibbles, unpack_nibbles
from tests.core.optim.helpers import AWKWARD_SIZES, clone, regression, same_bits, train

CPU = torch.device("cpu")
ALL_FORMATS = [(bits, moment) for bits in (8, 4) for moment in (0, 1)]


def round_trip(x: torch.Tensor, bits: int, moment: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmt = FORMATS[bits][moment]
    qmap, mid, lookup = fmt.tables(CPU)
    codes, absmax = quantize_blockwise(x, mid, block_size=fmt.block_size, bits=bits, lookup=lookup)
    back = dequantize_blockwise(codes, absmax, qmap, block_size=fmt.block_size, bits=bits, numel=x.numel())
    return codes, absmax, back


def test_8bit_maps_are_bitsandbytes_dynamic_maps() -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    for signed, fmt in zip((True, False), FORMATS[8], strict=True):
        assert torch.equal(
            torch.tensor(fmt.values), bnb_functional.create_dynamic_map(signed=signed).sort().values
        )


def test_codes_are_the_nearest_map_value_and_match_bitsandbytes_elsewhere() -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(1 << 16)
    qmap, _, _ = FORMATS[8][0].tables(CPU)
    codes, absmax, _ = round_trip(x, 8, 0)
    theirs, quant_state = bnb_functional.quantize_blockwise(x, code=qmap, blocksize=256)
    assert torch.equal(absmax, quant_state.absmax)
    scaled = (x.view(-1, 256) * (1 / absmax).unsqueeze(1)).view(-1)
    ours_error = (qmap[codes.long()] - scaled).abs()
    assert (ours_error <= (qmap[theirs.long()] - scaled).abs()).all()
    # bitsandbytes' CPU kernel picks the farther neighbour for 0.15 % of these elements
    assert (codes != theirs).float().mean() < 0.005


@pytest.mark.parametrize(("bits", "moment"), ALL_FORMATS)
@pytest.mark.parametrize("numel", AWKWARD_SIZES)
def test_round_trip_error_is_at_most_half_a_map_step(bits: int, moment: int, numel: int) -> None:
    fmt = FORMATS[bits][moment]
    x = torch.randn(numel) if moment == 0 else torch.rand(numel)
    codes, absmax, back = round_trip(x, bits, moment)
    assert codes.dtype == torch.uint8 and codes.numel() == fmt.code_bytes(numel) == (
        numel if bits == 8 else (numel + 1) // 2
    )
    assert absmax.numel() == fmt.blocks(numel) == -(-numel // fmt.block_size)
    # the farthest any value of [-1, 1] (or [0, 1]) lies from its nearest map value
    qmap = torch.tensor(fmt.values)
    lowest = -1.0 if moment == 0 else 0.0
    worst = max(float((qmap[1:] - qmap[:-1]).max()) / 2, float(qmap[0]) - lowest, 1 - float(qmap[-1]))
    scale = absmax.repeat_interleave(fmt.block_size)[:numel]
    assert ((back - x).abs() <= (worst + 1e-6) * scale).all()  # 1e-6: fp32 rounding of the product


@pytest.mark.parametrize(("bits", "moment"), ALL_FORMATS)
def test_lookup_codes_equal_a_binary_search_everywhere_it_matters(bits: int, moment: int) -> None:
    _, mid, lookup = FORMATS[bits][moment].tables(CPU)
    # each midpoint, its fp32 neighbours, the ends of [-1, 1], zeros, and a dense random sample
    edges = torch.cat([mid, mid.nextafter(torch.tensor(2.0)), mid.nextafter(torch.tensor(-2.0))])
    special = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-38, -1e-38, 1e-45, -1e-45])
    x = torch.cat([edges, special, torch.rand(1 << 16) * 2 - 1, torch.rand(1 << 12) * 1e-4]).clamp(-1, 1)
    assert torch.equal(nearest_codes(x, mid, lookup), torch.bucketize(x, mid, out_int32=True).to(torch.uint8))


def test_second_moment_4bit_map_has_no_zero() -> None:
    # Li et al. 2023 (arXiv:2309.01507) §4.2: a second moment rounded to zero makes m/sqrt(v) explode.
    x = torch.tensor([1.0] + [1e-6] * 127)
    _, _, back = round_trip(x, 4, 1)
    assert (back >= 1 / 16).all()
    assert 0.0 not in FORMATS[4][1].values


def test_zero_blocks_stay_zero() -> None:
    for bits, moment in ALL_FORMATS:
        _, absmax, back = round_trip(torch.zeros(300), bits, moment)
        assert not absmax.any() and not back.any()


def test_nibbles_pack_two_codes_per_byte() -> None:
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert torch.equal(unpack_nibbles(packed, 5), codes)


def test_4bit_first_moment_map_is_the_16_value_dynamic_map() -> None:
    values = dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    assert len(values) == 16 and values[-1] == 1.0 and 0.0 in values
    with pytest.raises(ValueError, match="max_exponent_bits=5 does not fit total_bits=4: choose 1 to 3"):
        dynamic_map(signed=True, max_exponent_bits=5, total_bits=4)


def test_update_function_traces_whole_with_torch_compile() -> None:
    fm, fv = FORMATS[8]
    kwargs = {"maps": (fm.tables(CPU), fv.tables(CPU)), "block_sizes": (256, 256), "bits": (8, 8)}
    hyper = {"step": 3, "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    p, g = torch.randn(1000), torch.randn(1000)
    m = quantize_blockwise(torch.randn(1000) * 0.1, fm.tables(CPU)[1], block_size=256, bits=8)
    v = quantize_blockwise(torch.rand(1000) * 0.01, fv.tables(CPU)[1], block_size=256, bits=8)
    eager = adamw_quantized(p, g, m, v, **kwargs, **hyper)
    compiled = torch.compile(adamw_quantized, backend="eager", fullgraph=True)(p, g, m, v, **kwargs, **hyper)
    assert torch.equal(eager[0], compiled[0])
    assert all(torch.equal(a, b) for a, b in zip(eager[1] + eager[2], compiled[1] + compiled[2], strict=True))


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_chunked_updates_change_no_bit(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, loss = regression()
    twin = clone(model)
    kwargs = {} if bits == 32 else {"state_bits": bits, "min_quantized_numel": 1}
    train(model, loss, CiuicAdamW(model.parameters(), **kwargs), range(3))
    monkeypatch.setattr(optimizer_module, "CHUNK_NUMEL", 512)  # 8192-element weights in 16 chunks
    train(twin, loss, CiuicAdamW(twin.parameters(), **kwargs), range(3))
    assert same_bits(model, twin)
