"""Exceptions raised by Ciuic.

Each subclass also inherits the builtin it stands in for, so ``except ValueError`` in a user's
script keeps working (the same choice PEFT makes).
"""

from __future__ import annotations

import torch


class CiuicError(Exception):
    """Base class of every error Ciuic raises on purpose."""


class ConfigError(CiuicError, ValueError):
    """A configuration value is invalid: the message names the field, the value and what is allowed."""


class UnknownTechniqueError(CiuicError, LookupError):
    """A technique name is not registered: the message lists the registered ones."""


class TechniqueUnavailableError(CiuicError, NotImplementedError):
    """The configuration asks for something this installation cannot do (missing package, device)."""


class ApplyError(CiuicError, RuntimeError):
    """``apply_``/``remove_`` was called in a state that does not allow it (e.g. applied twice)."""


class InertTechniqueError(CiuicError, RuntimeError):
    """A requested technique did nothing in a step (e.g. its hooks were never entered): the
    message says why and how to make it act."""


class BudgetExceededError(CiuicError, torch.OutOfMemoryError):
    """A :class:`ciuic.MemoryMeter` with a ``budget`` saw live device bytes go over it.

    It is a ``torch.OutOfMemoryError``, so code that recovers from a real out-of-memory error
    (``ciuic.recovery.Recovery``) treats both alike, by type. ``peak_bytes`` is the live total
    the allocation that crossed the budget reached; ``budget`` the limit.
    """

    def __init__(self, message: str, *, peak_bytes: int, budget: int) -> None:
        super().__init__(message)
        self.peak_bytes = peak_bytes
        self.budget = budget


class NothingFitsError(CiuicError, RuntimeError):
    """A training step ran out of memory at every config of the escalation ladder: the message
    lists the configs tried, the peak seen and what to change."""
