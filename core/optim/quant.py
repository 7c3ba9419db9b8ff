"""Block-wise quantization of optimizer states: pure functions of tensors.

A state tensor is cut into blocks of ``block_size`` elements; each block keeps its absolute
maximum in fp32 and every element a code: the index of the nearest value of a *quantization
map* (a sorted table of values in ``[-1, 1]``) to ``element / absmax``. This is the block-wise
scheme of bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
https://arxiv.org/abs/2110.02861), in plain torch so that it runs on any device and under
``torch.compile``. The 8-bit maps are bitsandbytes' own and every code is the nearest map value;
bitsandbytes' CPU kernel picks the farther neighbour for about 0.15 % of elements, so codes
agree with ``bitsandbytes.functional.quantize_blockwise`` except there (a test checks both).

Formats (:data:`FORMATS`):

- 8 bits, blocks of 256: the *dynamic* map (a sign, a dynamic exponent, a linear fraction),
  signed for the first moment, unsigned for the second (what bitsandbytes' ``AdamW8bit`` uses).
- 4 bits, blocks of 128, two codes per byte: a 4-bit signed dynamic map for the first moment and,
  for the second moment, the linear map ``{1/16, 2/16, ..., 1}`` *without zero* (Li et al. 2023,
  "Memory Efficient Optimizers with 4-bit States", https://arxiv.org/abs/2309.01507, §4.2: a
  second moment rounded to zero turns ``m / (sqrt(v) + eps)`` into a huge step; torchao's 4-bit
  AdamW makes the same choice).

Every operation is exact or a single IEEE-754 rounding (multiply, reciprocal, compare, gather), so
the same inputs give the same codes on CPU and CUDA.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch.utils._python_dispatch import _disable_current_modes

MIN_QUANTIZED_NUMEL = 4096
"""Tensors with fewer elements keep fp32 states (bitsandbytes' ``min_8bit_size``): their states
are a negligible share of the memory, and biases and norms are the most sensitive to rounding."""


def dynamic_map(*, signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """The values of the dynamic quantization map (Dettmers 2015, https://arxiv.org/abs/1511.04561).

    Same construction as ``bitsandbytes.functional.create_dynamic_map`` (whose 8-bit tables
    this reproduces exactly), without its padding to 256 entries for narrower maps.

    Args:
        signed: Whether the map covers ``[-1, 1]`` (first moment) or ``[0, 1]`` (second).
        max_exponent_bits: Bits of the dynamic exponent.
        total_bits: Bits per code: the map has ``2 ** total_bits`` values.

    Returns:
        The sorted values, as Python floats (each exactly representable in fp32).

    Example:
        >>> len(dynamic_map(signed=True)), dynamic_map(signed=True)[-1]
        (256, 1.0)
    """
    non_sign_bits = total_bits - 1
    if not 1 <= max_exponent_bits <= non_sign_bits:
        raise ValueError(
            f"max_exponent_bits={max_exponent_bits} does not fit total_bits={total_bits}: choose 1 to "
            f"{non_sign_bits} (one bit of {total_bits} is the sign)."
        )
    values: list[float] = []
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        values += _means(2**shift + 1, 10.0 ** (-(max_exponent_bits - 1) + i), signed)
    if additional_items > 0:
        values += _means(additional_items + 1, 1.0, signed)  # scale 10 ** 0, as bitsandbytes
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"max_exponent_bits={max_exponent_bits} does not fit total_bits={total_bits}: the map has "
            f"{len(values)} values, not {2**total_bits}."
        )
    return sorted(values)


def _means(items: int, scale: float, signed: bool) -> list[float]:
    with _disable_current_modes():  # Python floats: real tensors even under FakeTensorMode
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        out: list[float] = (scale * means).tolist()
        if signed:
            out += (-scale * means).tolist()
    return out


def linear_map_without_zero(bits: int) -> list[float]:
    """``{1/2**bits, 2/2**bits, ..., 1}``: the 4-bit second-moment map (no zero, see module doc).

    Example:
        >>> linear_map_without_zero(4)[:2]
        [0.0625, 0.125]
    """
    with _disable_current_modes():  # Python floats: real tensors even under FakeTensorMode
        values: list[float] = torch.linspace(0, 1, 2**bits + 1, dtype=torch.float32)[1:].tolist()
    return values


@dataclass(frozen=True)
class StateFormat:
    """How one optimizer state is quantized.

    Attributes:
        bits: Bits per code (8: one code per byte; 4: two codes per byte, first in the high nibble).
        block_size: Elements per block (one fp32 absmax each).
        values: The quantization map, sorted.
    """

    bits: int
    block_size: int
    values: tuple[float, ...]

    def code_bytes(self, numel: int) -> int:
        """Bytes of codes for a tensor of ``numel`` elements."""
        return numel if self.bits == 8 else (numel + 1) // 2

    def blocks(self, numel: int) -> int:
        """Blocks (absmax values) for a tensor of ``numel`` elements."""
        return -(-numel // self.block_size)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(map, midpoints, lookup)`` on ``device``: what the kernels take (built once per device).

        ``lookup`` finds codes without a search (see :func:`nearest_codes`).
        """
        return _tables(self.values, torch.device(device))


Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_FAKE_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[float, ...], torch.device], Tables]] = (
    weakref.WeakKeyDictionary()
)


def _tables(values: tuple[float, ...], device: torch.device) -> Tables:
    fake_mode = detect_fake_mode()
    if fake_mode is None:
        return _device_tables(values, device)
    # Under FakeTensorMode: fake copies of the real tables, made once per fake mode and device
    # as on a real device (never cached globally: a fake tensor must not outlive its mode).
    per_mode = _FAKE_TABLES.setdefault(fake_mode, {})
    if (values, device) not in per_mode:
        cpu = _cpu_tables(values)
        per_mode[values, device] = tuple(fake_mode.from_tensor(t).to(device) for t in cpu)  # type: ignore[assignment]
    return per_mode[values, device]


@functools.cache
def _device_tables(values: tuple[float, ...], device: torch.device) -> Tables:
    qmap, midpoints, lookup = _cpu_tables(values)
    return qmap.to(device), midpoints.to(device), lookup.to(device)


@functools.cache
def _cpu_tables(values: tuple[float, ...]) -> Tables:
    # Built outside every dispatch mode: the lookup's construction is data-dependent (a boolean
    # mask, a check), which FakeTensorMode cannot run, and the tables are constants, not memory
    # a training step allocates.
    with _disable_current_modes():
        qmap = torch.tensor(values, dtype=torch.float32)
        midpoints = (qmap[:-1] + qmap[1:]) / 2
        return qmap, midpoints, _lookup_table(midpoints)


def _lookup_table(midpoints: torch.Tensor) -> torch.Tensor:
    """For each of the 65,536 values of an fp32's top 16 bits, the code of the lowest fp32 with
    those bits: ``bucketize(lowest, midpoints)``. Every such bucket spans at most one midpoint of
    these maps (checked here), so one comparison with that midpoint finishes the search."""
    top = torch.arange(65536, dtype=torch.int32) << 16
    ends = torch.stack((top, top | 0xFFFF)).view(torch.float32)
    low, high = ends.min(dim=0).values, ends.max(dim=0).values
    finite = low.isfinite() & high.isfinite()
    codes = torch.bucketize(low.nan_to_num(0.0), midpoints, out_int32=True)
    spanned = torch.bucketize(high.nan_to_num(0.0), midpoints, out_int32=True, right=True) - codes
    if (spanned[finite] > 1).any():
        raise ValueError("map values too close for the lookup table: two midpoints share a bucket.")
    return codes.to(torch.uint8)


def nearest_codes(scaled: torch.Tensor, midpoints: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(scaled, midpoints)`` (the index of the nearest map value, ties to the
    lower one), computed as a table lookup on the top 16 bits and one comparison: the same codes,
    several times faster on a CPU than a binary search.

    Example:
        >>> qmap, mid, lookup = FORMATS[8][0].tables(torch.device("cpu"))
        >>> x = torch.linspace(-1, 1, 1001)
        >>> searched = torch.bucketize(x, mid, out_int32=True).to(torch.uint8)
        >>> torch.equal(nearest_codes(x, mid, lookup), searched)
        True
    """
    index = (scaled.view(torch.int32) >> 16) & 0xFFFF
    low = lookup.index_select(0, index).to(torch.int32)
    padded = torch.cat((midpoints, midpoints.new_full((1,), float("inf"))))
    return (low + (scaled > padded.index_select(0, low)).to(torch.int32)).to(torch.uint8)


FORMATS: dict[int, tuple[StateFormat, StateFormat]] = {
    8: (
        StateFormat(8, 256, tuple(dynamic_map(signed=True))),
        StateFormat(8, 256, tuple(dynamic_map(signed=False))),
    ),
    4: (
        StateFormat(4, 128, tuple(dynamic_map(signed=True, max_exponent_bits=3, total_bits=4))),
        StateFormat(4, 128, tuple(linear_map_without_zero(4))),
    ),
}
"""``FORMATS[bits] = (first-moment format, second-moment format)``."""


def quantize_blockwise(
    x: torch.Tensor,
    midpoints: torch.Tensor,
    *,
    block_size: int,
    bits: int,
    lookup: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D fp32 tensor block by block.

    Args:
        x: The values, 1-D float32, any length (the last block may be partial).
        midpoints: Midpoints between consecutive map values (``StateFormat.tables``).
        block_size: Elements per block.
        bits: 8 (a code per byte) or 4 (two codes per byte, the first in the high nibble).
        lookup: The format's lookup table (``StateFormat.tables``): the same codes, faster.

    Returns:
        ``(codes, absmax)``: uint8 codes (``numel`` bytes for 8 bits, ``ceil(numel / 2)`` for 4)
        and the fp32 absolute maximum of each block.

    Example:
        >>> fmt = FORMATS[8][0]
        >>> codes, absmax = quantize_blockwise(torch.tensor([0.5, -1.0]), fmt.tables(torch.device("cpu"))[1],
        ...                                    block_size=fmt.block_size, bits=8)
        >>> codes.dtype, absmax.tolist()
        (torch.uint8, [1.0])
    """
    numel = x.numel()
    blocks = -(-numel // block_size)
    padded = F.pad(x, (0, blocks * block_size - numel)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    # x * (1 / absmax), not x / absmax: the rounding bitsandbytes' kernels use.
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    scaled = scaled.view(-1)[:numel]
    if lookup is None:
        codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    else:
        codes = nearest_codes(scaled, midpoints, lookup)
    if bits == 4:
        codes = pack_nibbles(codes)
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, *, block_size: int, bits: int, numel: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: the fp32 values, 1-D, ``numel`` long.

    Example:
        >>> fmt = FORMATS[8][0]
        >>> qmap, mid, _ = fmt.tables(torch.device("cpu"))
        >>> codes, absmax = quantize_blockwise(torch.tensor([0.5, -1.0]), mid, block_size=256, bits=8)
        >>> back = dequantize_blockwise(codes, absmax, qmap, block_size=256, bits=8, numel=2)
        >>> [round(v, 4) for v in back.tolist()]  # the nearest map values: -1 is not one
        [0.5008, -0.993]
    """
    index = unpack_nibbles(codes, numel) if bits == 4 else codes
    values = qmap.index_select(0, index.to(torch.int32))
    blocks = absmax.numel()
    padded = F.pad(values, (0, blocks * block_size - numel)).view(blocks, block_size)
    return (padded * absmax.unsqueeze(1)).view(-1)[:numel]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (odd lengths padded with 0)."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``numel`` codes."""
    return torch.stack((packed >> 4, packed & 15), dim=1).view(-1)[:numel]
