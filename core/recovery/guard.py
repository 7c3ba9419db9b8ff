"""Where the budget is enforced during a step: the memory meter on CPU, the allocator on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ciuic.memory import MemoryMeter


@contextlib.contextmanager
def budget_guard(
    budget: int | None, device: torch.device, track: tuple[object, ...] = ()
) -> Iterator[MemoryMeter | None]:
    """Run the block so that going over ``budget`` device bytes raises ``torch.OutOfMemoryError``.

    - No budget: nothing is done (a real out-of-memory error is still one).
    - CUDA: the caching allocator is capped at the budget
      (``torch.cuda.set_per_process_memory_fraction``), so it raises its own error, at no cost
      per op; the cap is lifted on exit.
    - Elsewhere (CPU): a :class:`ciuic.MemoryMeter` with ``budget`` tracks ``track`` (the model
      and optimizer) and raises :class:`ciuic.errors.BudgetExceededError`. The meter sees every
      op, so the step runs slower.

    Yields:
        The meter on CPU (its ``peak_bytes`` is the step's peak), else ``None``.

    Example:
        >>> import torch
        >>> with budget_guard(None, torch.device("cpu")) as meter:
        ...     pass
        >>> meter is None
        True
    """
    if budget is None:
        yield None
    elif device.type == "cuda" and torch.cuda.is_available():
        with _cuda_cap(budget, device):
            yield None
    else:
        with MemoryMeter(device=device, track=track, budget=budget) as meter:
            yield meter


@contextlib.contextmanager
def _cuda_cap(budget: int, device: torch.device) -> Iterator[None]:
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
