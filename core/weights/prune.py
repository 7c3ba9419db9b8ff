"""Magnitude pruning of frozen linear weights, stored so that memory really drops.

A pruned weight is kept as its surviving values in row-major order plus a bit mask (one bit
per weight, packed eight to a byte); with a quantization format the surviving values are
stored in it too. On CPU this is the only layout that saves memory: torch's 2:4
semi-structured sparse tensors exist only for CUDA (and are not built here), so a pattern is
stored the same packed way on every device. When the packed form would not be smaller than
the dense weight (low sparsity), the weight stays dense with zeros written in, and the
conversion report says no memory was saved.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import Codec, frozen_linear, storage_bytes
from .options import PRUNE_PATTERN

_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def magnitude_mask(weight: torch.Tensor, prune: str | float) -> torch.Tensor:
    """Boolean mask of the weights to keep: an ``'N:M'`` pattern over each row's consecutive
    inputs, or a sparsity ratio over the whole tensor (smallest magnitudes removed).

    Example:
        >>> import torch
        >>> magnitude_mask(torch.tensor([[4.0, -1.0, 3.0, 0.5]]), "2:4").tolist()
        [[True, False, True, False]]
    """
    magnitude = weight.detach().abs()
    if isinstance(prune, str):
        match = PRUNE_PATTERN.match(prune)
        if match is None or weight.shape[-1] % int(match[2]):
            raise ValueError(f"prune={prune!r} does not divide rows of {weight.shape[-1]} weights.")
        keep, group = int(match[1]), int(match[2])
        groups = magnitude.reshape(-1, group)
        top = groups.topk(keep, dim=1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
        return mask.reshape(weight.shape)
    drop = round(prune * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if drop:
        mask[magnitude.reshape(-1).topk(drop, largest=False).indices] = False
    return mask.reshape(weight.shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Eight booleans per byte (padded with False)."""
    flat = mask.reshape(-1)
    padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    bits = packed.unsqueeze(1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:numel]


class PrunedLinear(nn.Module):
    """A frozen linear layer whose pruned weight is stored as packed values plus a bit mask.

    Buffers: ``mask`` (uint8, one bit per weight), ``values`` (the kept weights, dense dtype or
    the ``format``'s packed bytes) and, when quantized, ``absmax`` (fp32 block scales).

    Args:
        linear: The dense layer (its bias is shared, its weight read).
        mask: Boolean keep-mask of the weight's shape (see :func:`magnitude_mask`).
        format: ``'none'`` (values in the weight's dtype), ``'nf4'``, ``'fp4'`` or ``'int8'``.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 4)
        >>> p = PrunedLinear(lin, magnitude_mask(lin.weight, "2:4"), "none")
        >>> int((p.dense_weight() != 0).sum())
        16
    """

    mask: torch.Tensor
    values: torch.Tensor
    absmax: torch.Tensor | None

    def __init__(self, linear: nn.Linear, mask: torch.Tensor, format: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.shape = linear.weight.shape
        self.dtype = linear.weight.dtype
        self.format = format
        self.kept = int(mask.sum())
        weight = linear.weight.detach()
        values = weight.reshape(-1)[mask.reshape(-1)]
        self.register_buffer("mask", pack_bits(mask))
        if format == "none":
            self.register_buffer("values", values.clone())
            self.register_buffer("absmax", None)
        else:
            data, absmax = Codec(format).encode(values)
            self.register_buffer("values", data)
            self.register_buffer("absmax", absmax)
        self.bias = linear.bias

    def kept_values(self) -> torch.Tensor:
        """The surviving weights (dequantized when stored quantized), in row-major order."""
        if self.absmax is None:
            return self.values
        return Codec(self.format).decode(self.values, self.absmax, torch.Size([self.kept]), self.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The pruned weight as a dense tensor (zeros where pruned)."""
        keep = unpack_bits(self.mask, self.shape.numel())
        dense = torch.zeros(self.shape.numel(), dtype=self.dtype, device=self.values.device)
        dense[keep] = self.kept_values()
        return dense.reshape(self.shape)

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: mask, values and scales (bias excluded)."""
        return storage_bytes(self.mask, self.values, self.absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with the weight rebuilt for this matmul only."""
        return frozen_linear(x, self.dense_weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kept={self.kept}/{self.shape.numel()}, format={self.format}"
        )


def packed_bytes(numel: int, kept: int, dtype: torch.dtype, format: str) -> int:
    """Bytes :class:`PrunedLinear` would hold for ``kept`` of ``numel`` weights."""
    mask = math.ceil(numel / 8)
    if format == "none":
        return mask + kept * dtype.itemsize
    codec = Codec(format)
    return mask + codec.packed_numel(kept) + 4 * math.ceil(kept / codec.blocksize)
