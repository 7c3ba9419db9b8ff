"""Frozen ``lm_head`` and input embeddings stored block-wise in 8 or 4 bits.

A 7B model's embedding table and head are two ``(vocab, hidden)`` matrices that LoRA leaves
frozen but that stay bf16 under bitsandbytes (``BitsAndBytesConfig`` skips both): about 2 GiB.
:class:`QuantizedEmbedding` keeps the table as block-wise codes (one row of codes and one row
of fp32 scales per token, :class:`~ciuic.weights.functional.Codec`) and dequantizes only the
rows a batch looks up. :class:`QuantizedHead` keeps the head the same way and dequantizes the
whole weight for its matmul (and again in backward, see
:func:`~ciuic.weights.functional.frozen_linear`); :meth:`QuantizedHead.ciuic_dense_weight`
gives that transient dense weight to a loss that computes the logits itself (the chunked
loss). When the head is tied to the embeddings (``tie_word_embeddings``) both modules hold the
same code and scale tensors, so the table is stored once, as it was dense.

Storage per weight: 8.125 bits for ``'int8'`` (256-element blocks), 4.5 for ``'nf4'`` (64); a
row shorter than a block, or not a multiple of one, takes the largest power-of-two block from 64
up that divides it (int8 with rows of 64: 8.5 bits).
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import Codec, frozen_linear

MIN_BLOCK = 64
"""The smallest block bitsandbytes' block-wise quantization takes."""


def table_codec(weight: torch.Tensor, format: str) -> Codec:
    """The codec of a ``(rows, cols)`` table: the format's block size, or the largest smaller
    power of two (down to :data:`MIN_BLOCK`) that divides a row, so blocks never span rows."""
    block = Codec(format).blocksize
    while block > MIN_BLOCK and weight.shape[-1] % block:
        block //= 2
    return Codec(format) if block == Codec(format).blocksize else Codec(format, block)


def table_layout_problem(weight: torch.Tensor, format: str) -> str | None:
    """Why a ``(rows, cols)`` table cannot be stored row by row in ``format``, or None."""
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    block = table_codec(weight, format).blocksize
    if weight.shape[1] % block:
        return f"rows of {weight.shape[1]} weights are not a multiple of the smallest {format} block {block}"
    return None


def embedding_layout_problem(embedding: nn.Module) -> str | None:
    """Why ``embedding`` is not a plain lookup :class:`QuantizedEmbedding` can replace, or None."""
    if not isinstance(embedding, nn.Embedding):
        return f"{type(embedding).__name__} is not an nn.Embedding"
    if type(embedding).forward is not nn.Embedding.forward:
        return f"{type(embedding).__name__} overrides nn.Embedding.forward (e.g. scales the rows)"
    if embedding.max_norm is not None:
        return "max_norm renormalizes looked-up rows in place, which codes cannot store"
    return None


class _QuantizedTable(nn.Module):
    """Codes and scales of a ``(rows, cols)`` weight, one row of each per row of the weight.

    Buffers (in ``state_dict``): ``weight_data`` (uint8 codes, ``(rows, cols)`` for int8,
    ``(rows, cols / 2)`` for nf4) and ``weight_absmax`` (fp32, ``(rows, cols / blocksize)``).
    """

    weight_data: torch.Tensor
    weight_absmax: torch.Tensor

    def __init__(self, weight: torch.Tensor, format: str, shared: _QuantizedTable | None = None) -> None:
        super().__init__()
        problem = table_layout_problem(weight, format)
        if problem is not None:
            raise ValueError(f"cannot store this weight in {format!r}: {problem}.")
        self.codec = table_codec(weight, format)
        self.shape = weight.shape
        self.dtype = weight.dtype
        if shared is not None:
            data, absmax = shared.weight_data, shared.weight_absmax
        else:
            data, absmax = self.codec.encode(weight)
            data, absmax = data.view(self.shape[0], -1), absmax.view(self.shape[0], -1)
        self.register_buffer("weight_data", data)
        self.register_buffer("weight_absmax", absmax)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The dequantized rows ``index`` (any shape), shaped ``(*index.shape, cols)``."""
        flat = index.reshape(-1)
        data = self.weight_data[flat].reshape(-1)
        absmax = self.weight_absmax[flat].reshape(-1)
        out = self.codec.decode(data, absmax, torch.Size([flat.numel(), self.shape[1]]), self.dtype)
        return out.reshape(*index.shape, self.shape[1])

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """The dequantized rows ``start:stop`` (a range: no index tensor, no gather)."""
        data, absmax = self.weight_data[start:stop].reshape(-1), self.weight_absmax[start:stop].reshape(-1)
        return self.codec.decode(data, absmax, torch.Size([stop - start, self.shape[1]]), self.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The whole dequantized ``(rows, cols)`` weight, in the dtype it was stored from."""
        data, absmax = self.weight_data.reshape(-1), self.weight_absmax.reshape(-1)
        return self.codec.decode(data, absmax, self.shape, self.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the codes and scales."""
        return self.weight_data.untyped_storage().nbytes() + self.weight_absmax.untyped_storage().nbytes()


class QuantizedEmbedding(_QuantizedTable):
    """A frozen ``nn.Embedding`` stored block-wise; a lookup dequantizes the looked-up rows only.

    Args:
        embedding: The dense embedding (read, not changed).
        format: ``'int8'`` or ``'nf4'``.

    Example:
        >>> import torch
        >>> table = torch.nn.Embedding(10, 256)
        >>> q = QuantizedEmbedding(table, "int8")
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> (q(ids) - table(ids)).abs().max().item() < 0.05
        True
    """

    def __init__(self, embedding: nn.Embedding, format: str) -> None:
        problem = embedding_layout_problem(embedding)
        if problem is not None:
            raise ValueError(f"embedding={type(embedding).__name__} cannot be quantized: {problem}.")
        super().__init__(embedding.weight.detach(), format)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, built on each access (for code that reads ``.weight``)."""
        return self.dense_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The rows ``input`` looks up, dequantized now."""
        return self.rows(input)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.codec.format}"


class QuantizedHead(_QuantizedTable):
    """A frozen output projection (``lm_head``) stored block-wise.

    ``forward(x)`` is ``F.linear(x, W, bias)`` with ``W`` dequantized for that matmul and
    again in backward (nothing dense is kept between them).

    Args:
        linear: The dense head (its bias is shared, its weight read).
        format: ``'int8'`` or ``'nf4'``.
        shared: A :class:`QuantizedEmbedding` of the same tied weight, whose codes and scales
            this head then shares (``tie_word_embeddings``).

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(64, 10, bias=False)
        >>> q = QuantizedHead(head, "nf4")
        >>> weight, bias = q.ciuic_dense_weight()
        >>> weight.shape, bias
        (torch.Size([10, 64]), None)
    """

    def __init__(self, linear: nn.Linear, format: str, shared: QuantizedEmbedding | None = None) -> None:
        super().__init__(linear.weight.detach(), format, shared)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, built on each access (for code that reads ``.weight``)."""
        return self.dense_weight()

    def ciuic_dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dense weight, bias)``: a transient dense weight for a loss that computes the
        logits itself, chunk by chunk (drop it after use)."""
        return self.dense_weight(), self.bias

    def ciuic_dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the dense weight: the chunked loss reads the head a block of
        rows at a time through this, so the whole dense weight is never built."""
        return self.dense_rows(start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, W, bias)`` with ``W`` dequantized for this matmul only."""
        return frozen_linear(x, self.dense_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.codec.format}"
