"""Block-wise codecs over flat tensors, the frozen-weight linear, and the fidelity measure.

Fused MoE experts and pruned values are stored with bitsandbytes' own block-wise kernels:
NF4/FP4 (``quantize_4bit``, 64-element blocks, one fp32 absmax per block: 4.5 bits per
weight) and 8-bit (``quantize_blockwise`` with the dynamic map, 256-element blocks: 8.125 bits
per weight). Blocks never straddle two experts when an expert's size is a multiple of the block
size, so one expert is dequantized by slicing its rows of the packed data and of the scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

BLOCKSIZE = {"nf4": 64, "fp4": 64, "int8": 256}
"""Block size per format (elements sharing one fp32 absmax)."""


@dataclass(frozen=True)
class Codec:
    """A block-wise storage format of bitsandbytes for flat tensors.

    Attributes:
        format: ``'nf4'``, ``'fp4'`` or ``'int8'``.
        block: Elements per block when not the format's default (:data:`BLOCKSIZE`); a power
            of two >= 64, as bitsandbytes takes.
    """

    format: str
    block: int | None = None

    @property
    def blocksize(self) -> int:
        """Elements per block (one fp32 scale each)."""
        return self.block or BLOCKSIZE[self.format]

    def packed_numel(self, numel: int) -> int:
        """Bytes of packed data for ``numel`` values (4-bit formats hold two per byte)."""
        return (numel + 1) // 2 if self.format != "int8" else numel

    def encode(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed uint8 data, fp32 absmax per block)`` of a 1-D tensor."""
        flat = flat.detach().contiguous().reshape(-1)
        if is_fake(flat):
            return self._fake_encode(flat)
        import bitsandbytes.functional as bnbf

        if self.format == "int8":
            data, state = bnbf.quantize_blockwise(flat, blocksize=self.blocksize)
        else:
            data, state = bnbf.quantize_4bit(flat, blocksize=self.blocksize, quant_type=self.format)
        return data.reshape(-1), state.absmax

    def _fake_encode(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # bitsandbytes cannot run on fake tensors: the shapes it would return, uncomputed
        blocks = -(-flat.numel() // self.blocksize)
        data = torch.empty(self.packed_numel(flat.numel()), dtype=torch.uint8, device=flat.device)
        return data, torch.empty(blocks, dtype=torch.float32, device=flat.device)

    def decode(
        self, data: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        """The dense tensor of ``shape`` and ``dtype`` that ``encode`` stored in ``data``/``absmax``
        (under fake tensors: an uncomputed tensor of that shape and dtype)."""
        if is_fake(data):
            return torch.empty(shape, dtype=dtype, device=data.device)
        import bitsandbytes.functional as bnbf

        absmax = absmax.float()
        if self.format == "int8":
            code = _dynamic_map(data.device)
            flat = bnbf.dequantize_blockwise(data, absmax=absmax, code=code, blocksize=self.blocksize)
            return flat[: shape.numel()].reshape(shape).to(dtype)
        state = bnbf.QuantState(
            absmax=absmax,
            shape=torch.Size([shape.numel()]),
            code=bnbf.get_4bit_type(self.format, data.device),
            blocksize=self.blocksize,
            quant_type=self.format,
            dtype=dtype,
        )
        return bnbf.dequantize_4bit(data.reshape(-1, 1), state).reshape(shape)


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``FakeTensor`` (shapes and dtypes only, no data)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


_MAPS: dict[torch.device, torch.Tensor] = {}


def _dynamic_map(device: torch.device) -> torch.Tensor:
    # The 256-entry code of quantize_blockwise is the same for every tensor: kept once per
    # device instead of once per tensor (1 KiB each).
    if device not in _MAPS:
        import bitsandbytes.functional as bnbf

        _MAPS[device] = bnbf.create_dynamic_map().to(device)
    return _MAPS[device]


class _FrozenLinear(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` rebuilt by ``weight_fn`` in forward and again in backward.

    The weight is frozen, so backward needs only ``grad @ W``; saving nothing and rebuilding
    ``W`` keeps the dense copy alive for one matmul instead of the whole step (the same trade
    bitsandbytes' ``matmul_4bit`` makes).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.weight_fn = weight_fn
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        with torch.no_grad():
            return F.linear(x, weight_fn(), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = grad @ ctx.weight_fn().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_needs_grad else None
        return grad_x, None, grad_b


def frozen_linear(
    x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight_fn(), bias)`` for a frozen weight that is stored compressed.

    Example:
        >>> import torch
        >>> w = torch.randn(3, 4)
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> torch.equal(frozen_linear(x, lambda: w), torch.nn.functional.linear(x, w))
        True
    """
    out: torch.Tensor = _FrozenLinear.apply(x, weight_fn, bias)
    return out


def snr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approximation`` against ``reference``, in decibels.

    Example:
        >>> import torch
        >>> round(snr_db(torch.ones(4), torch.full((4,), 1.1)), 1)
        20.0
    """
    ref = reference.detach().double()
    noise = (approximation.detach().double() - ref).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def storage_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what the memory really holds)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            # fake tensors have no data pointer: their storage object is the identity then
            key = storage._cdata if is_fake(tensor) else storage.data_ptr()
            seen[key] = storage.nbytes()
    return sum(seen.values())
