"""Technique registry: each technique package registers itself from its own ``__init__.py``.

A technique declares the config fields it serves and an ``apply`` function that changes a model
in place and returns an :class:`Applied` record whose ``undo`` reverses exactly that change.
``ciuic.apply_`` imports every subpackage of ``ciuic`` once (so registering needs no edit to a
central list) and runs the registered techniques whose fields the config sets, by ``order``.

Example (what a technique package's ``__init__.py`` does)::

    from ciuic.registry import Applied, Technique, register_technique

    def _apply(model, config):
        handles = [...]                     # install hooks/patches
        return Applied("my_technique", changed=["model.layers.0"], undo=lambda: ...)

    register_technique(Technique(
        name="my_technique", fields=("activations",), order=30,
        is_requested=lambda cfg: cfg.activations != "none", apply=_apply,
    ))
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UnknownTechniqueError

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from .config import CiuicConfig


@dataclass
class Applied:
    """What one technique changed on one model, and how to undo it.

    Attributes:
        technique: The registered technique name.
        changed: Human-readable names of what was changed (usually module paths).
        skipped: ``(what, reason)`` pairs for things deliberately left alone.
        undo: Callable that reverses the change; called once by ``remove_``.
        details: Technique-specific facts for the report (counts, bytes, options).
    """

    technique: str
    changed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    undo: Callable[[], None] = lambda: None
    details: dict[str, Any] = field(default_factory=dict)
    scope: Callable[[], ContextManager[None]] | None = None


@dataclass(frozen=True)
class Technique:
    """A registered memory technique.

    Attributes:
        name: Unique name, e.g. ``"activations"``.
        fields: The request keys this technique serves (see :func:`request_keys`), e.g.
            ``("activations", "offload.activations", "checkpointing")``.
        order: Application order, lowest first (weights before activation hooks, say).
        is_requested: Whether a config asks for this technique.
        apply: ``apply(model, config) -> Applied``, changing ``model`` in place.
    """

    name: str
    fields: tuple[str, ...]
    order: int
    is_requested: Callable[[CiuicConfig], bool]
    apply: Callable[[nn.Module, CiuicConfig], Applied]


OptimizerFactory = Callable[..., "Optimizer"]
"""``factory(params, config, **adamw_kwargs) -> Optimizer``: serves ``config.optimizer`` and
``step_in_backward``/``offload={'optimizer'}``."""

_TECHNIQUES: dict[str, Technique] = {}
_OPTIMIZER_FACTORY: list[OptimizerFactory] = []
_DISCOVERED = False


def register_technique(technique: Technique) -> Technique:
    """Add ``technique`` to the registry (re-registering the same name replaces it)."""
    _TECHNIQUES[technique.name] = technique
    return technique


def register_optimizer_factory(factory: OptimizerFactory) -> OptimizerFactory:
    """Install the factory ``ciuic.build_optimizer`` uses for anything beyond plain AdamW."""
    _OPTIMIZER_FACTORY[:] = [factory]
    return factory


def optimizer_factory() -> OptimizerFactory | None:
    """The registered optimizer factory, or ``None`` if no optimizer package is installed."""
    discover()
    return _OPTIMIZER_FACTORY[0] if _OPTIMIZER_FACTORY else None


def discover() -> None:
    """Import every subpackage of ``ciuic`` once, so that each technique registers itself."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import ciuic

    for module in pkgutil.iter_modules(ciuic.__path__):
        if module.ispkg:
            importlib.import_module(f"ciuic.{module.name}")


def registered_techniques() -> dict[str, Technique]:
    """All registered techniques by name, in application order."""
    discover()
    return dict(sorted(_TECHNIQUES.items(), key=lambda item: (item[1].order, item[0])))


def get_technique(name: str) -> Technique:
    """Look a technique up by name; an unknown name lists the registered ones."""
    techniques = registered_techniques()
    if name not in techniques:
        raise UnknownTechniqueError(
            f"technique {name!r} is not registered: registered techniques are "
            f"{', '.join(techniques) or '(none)'}."
        )
    return techniques[name]


def requested_techniques(config: CiuicConfig) -> list[Technique]:
    """The registered techniques ``config`` asks for, in application order."""
    return [t for t in registered_techniques().values() if t.is_requested(config)]


def request_keys(config: CiuicConfig) -> list[str]:
    """What ``config`` asks for, one key per request: the name of each field set to a
    non-default value, except ``offload``, which gives one key per member
    (``"offload.activations"``, ``"offload.optimizer"``). ``Technique.fields`` uses these keys."""
    keys: list[str] = []
    for name, value in config.requested().items():
        if name == "offload":
            assert isinstance(value, frozenset)  # normalized by CiuicConfig
            keys.extend(f"offload.{member}" for member in sorted(value))
        else:
            keys.append(name)
    return keys


def unserved_requests(config: CiuicConfig, served: Iterable[str]) -> list[str]:
    """Request keys of ``config`` that none of the techniques named in ``served`` covers."""
    covered = {key for name in served for key in _TECHNIQUES[name].fields}
    return [key for key in request_keys(config) if key not in covered]
