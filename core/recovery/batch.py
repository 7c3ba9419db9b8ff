"""Splitting a batch into micro-batches whose losses add up to the whole batch's loss.

A causal-LM loss is a mean over the batch's valid tokens (labels other than ``-100``, after the
one-position shift), so the mean of micro-batch means is *not* the batch's loss when micro-batches
hold different numbers of valid tokens. Each :class:`MicroBatch` therefore carries

- ``weight``: its share of the batch's valid tokens, to multiply a loss that is a per-token
  mean over the micro-batch (``sum_i w_i * mean_i = sum of token losses / total tokens``);
- ``num_items``: the valid tokens of the *whole* batch, for a loss that divides a sum by a count
  it is given (``transformers``' ``num_items_in_batch``); such a loss takes no weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
"""The label of a token that does not count (PyTorch's ``cross_entropy`` default)."""


@dataclass(frozen=True)
class MicroBatch:
    """One part of a batch.

    Attributes:
        batch: The part, in the batch's own structure (dict, tuple, list or tensor).
        index: Its position, from 0.
        count: How many parts the batch was split into.
        weight: Its share of the batch's valid tokens (rows when the batch has no ``labels``).
        num_items: The batch's valid tokens (rows when it has no ``labels``).
    """

    batch: Any
    index: int
    count: int
    weight: float
    num_items: int


def split_batch(batch: Any, parts: int) -> list[MicroBatch]:
    """``batch`` split along its first dimension into ``parts`` micro-batches, in order.

    Every tensor whose first dimension is the batch size is split (``torch.tensor_split``:
    sizes differ by at most one row); everything else is shared by all parts.

    Raises:
        ValueError: ``parts`` is more than the batch's rows, or the batch holds no tensor.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[1, 2, 3], [1, 2, -100]])  # 2 and 1 valid after the shift
        >>> [(m.weight, m.num_items) for m in split_batch({"labels": labels}, 2)]
        [(0.6666666666666666, 3), (0.3333333333333333, 3)]
    """
    rows = batch_size(batch)
    if parts > rows:
        raise ValueError(f"cannot split a batch of {rows} row(s) into {parts} micro-batches.")
    total = _items(batch)
    if parts == 1:
        return [MicroBatch(batch, 0, 1, 1.0, total)]
    micro = []
    for index in range(parts):
        piece = _take(batch, rows, index, parts)
        weight = _items(piece) / total if total else 1 / parts
        micro.append(MicroBatch(piece, index, parts, weight, total))
    return micro


def batch_size(batch: Any) -> int:
    """Rows of the first tensor in ``batch`` (a tensor, or one inside a dict, tuple or list)."""
    for leaf in _leaves(batch):
        if leaf.dim() >= 1:
            return int(leaf.shape[0])
    raise ValueError(f"a batch of type {type(batch).__name__} holds no tensor to split along its rows.")


def _take(batch: Any, rows: int, index: int, parts: int) -> Any:
    if isinstance(batch, torch.Tensor):
        split = batch.dim() >= 1 and batch.shape[0] == rows
        return torch.tensor_split(batch, parts)[index] if split else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _take(v, rows, index, parts) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, rows, index, parts) for v in batch)
    return batch


def _items(batch: Any) -> int:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if isinstance(labels, torch.Tensor) and labels.dim() >= 2:
        return int(labels[..., 1:].ne(IGNORE_INDEX).sum())
    return batch_size(batch)


def _leaves(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    values = batch if isinstance(batch, (tuple, list)) else ()
    return [leaf for value in values for leaf in _leaves(value)]
