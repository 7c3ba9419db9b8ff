"""Exceptions raised by Ciuic.

Each subclass also inherits the builtin it stands in for, so ``except ValueError`` in a user's
script keeps working (the same choice PEFT makes).
"""

from __future__ import annotations


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
