"""Undoing what a failed step left behind, so that its retry starts from the same state.

A step that runs out of memory may have run part of its backward: some gradients are partly
accumulated, and with ``step_in_backward`` some parameters have already stepped. Before the
step, :class:`GradSnapshot` keeps the gradients that exist (those of earlier micro-batches of a
gradient-accumulation window; none at a window's start, the usual case, which costs nothing;
kept in host memory, so on a GPU they take no device memory);
after a failure :func:`release` puts them back, rolls a ``CiuicAdamW`` back to before the
backward, and frees the memory the failed step held.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch

from ciuic.optim import CiuicAdamW


class GradSnapshot:
    """The gradients of ``params`` at one moment; :meth:`restore` puts them back.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> snapshot = GradSnapshot([p])
        >>> (p * 3).sum().backward()
        >>> snapshot.restore()
        >>> p.grad is None
        True
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.grads = {id(p): p.grad.detach().to("cpu", copy=True) for p in self.params if p.grad is not None}

    def restore(self) -> None:
        """Set every gradient back to its value (or ``None``) at the snapshot."""
        for param in self.params:
            saved = self.grads.get(id(param))
            param.grad = None if saved is None else saved.to(param.device, copy=True)


def innermost_optimizer(optimizer: object) -> object:
    """The optimizer a wrapper holds (accelerate's ``AcceleratedOptimizer``, Lightning's)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def release(snapshot: GradSnapshot, optimizer: object | None, device: torch.device) -> None:
    """Undo a failed step: optimizer rollback, gradients as before it, memory returned."""
    inner = innermost_optimizer(optimizer)
    if isinstance(inner, CiuicAdamW):
        inner.rollback()  # parameters and states stepped in the dead backward, bitwise back
    snapshot.restore()
    gc.collect()  # the failed step's graph may sit in reference cycles (traceback frames)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
