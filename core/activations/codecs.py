"""Codecs for tensors saved for backward: per-group integer (8/4/2 bits), fp8 e4m3, 1-bit masks.

A codec turns a flat floating-point vector into an :class:`Encoded` (packed codes plus per-group
metadata) and back. Groups are ``group_size`` consecutive elements of the vector; the hooks feed
the vector in the tensor's memory order, so a group is a run of channels of one token.

Integer codecs are asymmetric (min/max): a group is stored as its minimum and maximum in bfloat16
(rounded outwards, so every value lies inside the stored range and nothing is clipped) and one
``bits``-wide code per element, packed ``8 // bits`` to a byte. Rounding is to nearest, or
stochastic (``floor(v + u)``, ``u ~ U[0, 1)``), which is unbiased: ``E[decode(encode(x))] == x``.
ActNN (Chen et al., 2021) shows that unbiased rounding of the inputs of linear layers keeps the
weight gradient unbiased, which is why the hooks use it for those tensors.

``fp8`` stores ``x / scale`` as float8 e4m3 (round to nearest even) with one bfloat16 scale per
group, ``scale = absmax / 448`` rounded up so nothing saturates.

Every byte of an encoding is a tensor allocated by :func:`encode` (codes, metadata, padding of
the last group), so what a memory meter counts is what is stored.

Example:
    >>> import torch
    >>> from ciuic.activations.codecs import CodecSpec, decode, encode
    >>> x = torch.randn(1000)
    >>> enc = encode(x, CodecSpec("int8", group_size=64))
    >>> enc.nbytes  # 1024 one-byte codes (the last group padded) + 16 groups x 2 bf16
    1088
    >>> bool((decode(enc) - x).abs().max() < 0.05)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ciuic.errors import ConfigError

INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
"""Bits per element of the integer codecs."""
CODECS = ("none", "fp8", *INT_BITS)
"""All codec names, from exact to the smallest."""
_PRECISION = {"none": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def codec_bits(name: str) -> int:
    """Bits per element a codec stores (16 stands for 'exact').

    >>> codec_bits("int4")
    4
    """
    return _PRECISION[name]


def more_precise(a: str, b: str) -> str:
    """The more precise of two codec names (``'none'`` beats everything, int8 beats fp8).

    >>> more_precise("int2", "int8")
    'int8'
    """
    if _PRECISION[a] != _PRECISION[b]:
        return a if _PRECISION[a] > _PRECISION[b] else b
    return a if a.startswith("int") else b  # int8 keeps more mantissa than e4m3 for a group


def fp8_available() -> bool:
    """Whether this build of torch has ``float8_e4m3fn``."""
    return hasattr(torch, "float8_e4m3fn")


@dataclass(frozen=True)
class CodecSpec:
    """How to encode one tensor.

    Attributes:
        name: ``'fp8'``, ``'int8'``, ``'int4'`` or ``'int2'``.
        group_size: Elements sharing one scale (a power of two, at least 8).
        stochastic: Stochastic (unbiased) rounding instead of round-to-nearest (integer codecs).
    """

    name: str
    group_size: int = 64
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.name not in CODECS or self.name == "none":
            raise ConfigError(
                f"codec={self.name!r} is not allowed: choose one of 'fp8', 'int8', 'int4', 'int2'."
            )
        check_group_size(self.group_size)
        if self.name == "fp8" and not fp8_available():
            raise ConfigError("codec='fp8' needs torch.float8_e4m3fn (torch >= 2.1): use 'int8' instead.")

    def bytes_for(self, numel: int) -> int:
        """Bytes :func:`encode` allocates for a vector of ``numel`` elements."""
        groups = -(-numel // self.group_size)
        bits = 8 if self.name == "fp8" else INT_BITS[self.name]
        meta = 2 if self.name == "fp8" else 4
        return groups * (self.group_size * bits // 8 + meta)


def check_group_size(group_size: object, field: str = "group_size") -> int:
    """Validate a group size: a power of two between 8 and 65536."""
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size < 8
        or group_size > 65536
        or group_size & (group_size - 1)
    ):
        raise ConfigError(f"{field}={group_size!r} is not allowed: give a power of two between 8 and 65536.")
    return group_size


class Encoded:
    """A packed vector: ``codes`` (uint8), ``meta`` (bfloat16 per group), and how to read them.

    Attributes:
        codec: The codec name.
        codes: Packed codes, one uint8 row per group.
        meta: ``(groups, 2)`` min/max (integer codecs) or ``(groups, 1)`` scale (fp8), bfloat16.
        numel: Elements of the original vector (the last group may be padded).
        dtype: The original dtype, restored by :func:`decode`.
    """

    __slots__ = ("codec", "codes", "dtype", "meta", "numel")

    def __init__(self, codec: str, codes: torch.Tensor, meta: torch.Tensor, numel: int, dtype: torch.dtype):
        self.codec = codec
        self.codes = codes
        self.meta = meta
        self.numel = numel
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and metadata)."""
        return _nbytes(self.codes) + _nbytes(self.meta)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors that hold the data (what an offload moves)."""
        return (self.codes, self.meta)

    def replace_tensors(self, tensors: tuple[torch.Tensor, ...]) -> Encoded:
        """The same encoding over other tensors (e.g. host copies)."""
        return Encoded(self.codec, tensors[0], tensors[1], self.numel, self.dtype)

    def header(self) -> Encoded:
        """The same encoding without its tensors (empty ones): what to keep beside an offloaded
        copy, so that the device codes and metadata are freed (:meth:`replace_tensors` puts
        tensors back).

        >>> encode(torch.randn(100), CodecSpec("int8")).header().nbytes
        0
        """
        return Encoded(self.codec, _EMPTY, _EMPTY, self.numel, self.dtype)


_EMPTY = torch.empty(0, dtype=torch.uint8)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode(flat: torch.Tensor, spec: CodecSpec, generator: torch.Generator | None = None) -> Encoded:
    """Encode a 1-D floating-point tensor (any float dtype) with ``spec``.

    ``generator`` drives stochastic rounding (so the caller's RNG stream is left alone).
    """
    groups = _grouped(flat, spec.group_size)
    if spec.name == "fp8":
        codes, meta = _encode_fp8(groups)
    else:
        codes, meta = _encode_int(groups, INT_BITS[spec.name], spec.stochastic, generator)
    return Encoded(spec.name, codes, meta, flat.numel(), flat.dtype)


def decode(enc: Encoded) -> torch.Tensor:
    """The 1-D tensor (original dtype and length) that ``enc`` stands for."""
    if enc.codec == "fp8":
        values = enc.codes.view(torch.float8_e4m3fn).float() * enc.meta.float()
    else:
        bits = INT_BITS[enc.codec]
        codes = unpack_bits(enc.codes, bits).float()
        low, high = enc.meta.float().unbind(1)
        scale = (high - low) / (2**bits - 1)
        values = torch.addcmul(low.unsqueeze(1), codes, scale.unsqueeze(1))
    return values.view(-1)[: enc.numel].to(enc.dtype)


def _grouped(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    x = flat.float()
    pad = -x.numel() % group_size
    if pad:  # repeat the last value: the padding never widens the last group's range
        x = torch.cat([x, x[-1:].expand(pad)])
    return x.view(-1, group_size)


def _encode_int(
    groups: torch.Tensor, bits: int, stochastic: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    levels = 2**bits - 1
    low = _round_bf16(groups.amin(1), down=True)
    high = _round_bf16(groups.amax(1), down=False)
    scale = (high.float() - low.float()) / levels
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    v = (groups - low.float().unsqueeze(1)) * inv.unsqueeze(1)
    if stochastic:
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        v = v.add_(noise).floor_()
    else:
        v = v.round_()
    codes = v.clamp_(0, levels).to(torch.uint8)
    return pack_bits(codes, bits), torch.stack([low, high], dim=1)


def _encode_fp8(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _round_bf16(groups.abs().amax(1) / _FP8_MAX, down=False)
    inv = torch.where(scale > 0, scale.float().reciprocal(), torch.zeros_like(scale, dtype=torch.float32))
    scaled = (groups * inv.unsqueeze(1)).clamp_(-_FP8_MAX, _FP8_MAX)
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8), scale.unsqueeze(1)


def _round_bf16(x: torch.Tensor, *, down: bool) -> torch.Tensor:
    """``x`` (float32) as bfloat16, rounded toward -inf (``down``) or +inf."""
    y = x.to(torch.bfloat16)
    wrong = y.float() > x if down else y.float() < x
    # no `if wrong.any()`: a branch on device data would synchronize with the GPU
    target = torch.full_like(y, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(y, target), y)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes below ``2**bits`` (``bits`` in 1, 2, 4, 8), ``8 // bits`` per byte.

    The last dimension must be a multiple of ``8 // bits``; the result has it divided by that.

    >>> pack_bits(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2)
    tensor([[57]], dtype=torch.uint8)
    """
    if bits == 8:
        return codes
    per_byte = 8 // bits
    parts = codes.view(*codes.shape[:-1], -1, per_byte)
    packed = parts[..., 0].clone()
    for j in range(1, per_byte):
        packed |= parts[..., j] << (bits * j)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes: torch.Tensor = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per_byte)


def pack_mask(flat: torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor as bits, 8 to a byte (the last byte zero-padded)."""
    codes = flat.view(torch.uint8)
    pad = -codes.numel() % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    return pack_bits(codes, 1)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a 1-D bool tensor of ``numel`` elements."""
    return unpack_bits(packed, 1)[:numel].view(torch.bool)
