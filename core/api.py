"""The verbs: ``apply_`` changes a model in place, ``remove_`` undoes it, ``build_optimizer``
builds the optimizer a config asks for."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import CiuicConfig
from .errors import ApplyError, ConfigError, TechniqueUnavailableError
from .registry import Applied, optimizer_factory, request_keys, requested_techniques, unserved_requests

OPTIMIZER_REQUESTS = ("optimizer", "step_in_backward", "offload.optimizer")
"""Request keys served by :func:`build_optimizer` rather than by ``apply_``."""

_HANDLES: weakref.WeakKeyDictionary[nn.Module, CiuicHandle] = weakref.WeakKeyDictionary()


@dataclass
class CiuicHandle:
    """What ``apply_`` did to one model.

    Attributes:
        config: The config that was applied.
        applied: One :class:`ciuic.registry.Applied` per technique that changed the model.
        skipped: ``(request, reason)`` for each request of the config that ``apply_`` did not
            carry out, e.g. ``("weights", "no technique ... is installed")``.
        deferred: Requests served elsewhere (the optimizer's, by ``build_optimizer``).
    """

    config: CiuicConfig
    model_name: str
    applied: list[Applied] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> str:
        """A readable summary: what each technique changed, what was skipped and why."""
        lines = [f"ciuic applied to {self.model_name}: {_describe(self.config)}"]
        for record in self.applied:
            detail = ", ".join(f"{k}={v}" for k, v in record.details.items())
            lines.append(
                f"  applied  {record.technique}: {len(record.changed)} changed"
                + (f" ({detail})" if detail else "")
            )
            lines.extend(f"    skipped {what}: {why}" for what, why in record.skipped)
        lines.extend(f"  deferred {what}: {why}" for what, why in self.deferred)
        lines.extend(f"  skipped  {what}: {why}" for what, why in self.skipped)
        if len(lines) == 1:
            lines.append("  nothing requested: the model is unchanged")
        return "\n".join(lines)


def _describe(config: CiuicConfig) -> str:
    requested = config.requested()
    if not requested:
        return "all techniques off"
    return ", ".join(f"{k}={sorted(v) if isinstance(v, frozenset) else v!r}" for k, v in requested.items())


def _as_config(config: CiuicConfig | str | Mapping[str, Any]) -> CiuicConfig:
    if isinstance(config, CiuicConfig):
        return config
    if isinstance(config, str):
        return CiuicConfig.preset(config)
    if isinstance(config, Mapping):
        return CiuicConfig.from_dict(config)
    raise ConfigError(
        f"config={config!r} is not a CiuicConfig: pass CiuicConfig(...), a preset name "
        f"({', '.join(CiuicConfig.PRESETS)}) or a dict of fields."
    )


def apply_(model: nn.Module, config: CiuicConfig | str | Mapping[str, Any]) -> CiuicHandle:
    """Apply the memory techniques ``config`` asks for to ``model``, in place.

    Techniques run in their registered order. If one fails, those already applied are undone
    before the error propagates, so the model is never left half-changed. Requests that no
    installed technique serves are recorded in ``handle.skipped`` and warned about, never
    dropped silently.

    Args:
        model: Any ``nn.Module`` (a Hugging Face or PEFT model included).
        config: A :class:`CiuicConfig`, a preset name, or a dict accepted by ``from_dict``.

    Returns:
        A :class:`CiuicHandle`; ``print(handle.report())`` shows what changed.

    Example:
        >>> import torch, ciuic
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> handle = ciuic.apply_(model, ciuic.CiuicConfig())
        >>> ciuic.remove_(model)
    """
    config = _as_config(config)
    if not isinstance(model, nn.Module):
        raise ApplyError(f"model={type(model).__name__} is not a torch.nn.Module.")
    if model in _HANDLES:
        raise ApplyError(
            f"ciuic is already applied to this {type(model).__name__}: call ciuic.remove_(model) "
            f"before applying another config."
        )
    handle = CiuicHandle(config=config, model_name=type(model).__name__)
    techniques = requested_techniques(config)
    try:
        for technique in techniques:
            handle.applied.append(technique.apply(model, config))
    except BaseException:
        _undo(handle)
        raise
    _record_unserved(handle, config, [t.name for t in techniques])
    _HANDLES[model] = handle
    return handle


def _record_unserved(handle: CiuicHandle, config: CiuicConfig, served: list[str]) -> None:
    values = {key: _request_value(config, key) for key in request_keys(config)}
    for key in unserved_requests(config, served):
        if key in OPTIMIZER_REQUESTS:
            handle.deferred.append((key, "served by ciuic.build_optimizer(model.parameters(), config)"))
        elif key == "budget":
            handle.deferred.append((key, "read by the techniques that size themselves ('auto' modes)"))
        else:
            reason = f"no installed technique serves {key}={values[key]!r} in this version of ciuic"
            handle.skipped.append((key, reason))
            warnings.warn(f"ciuic.apply_: {key} skipped: {reason}", UserWarning, stacklevel=3)


def _request_value(config: CiuicConfig, key: str) -> object:
    return True if key.startswith("offload.") else getattr(config, key)


def _undo(handle: CiuicHandle) -> None:
    for record in reversed(handle.applied):
        record.undo()
    handle.applied.clear()


def remove_(model: nn.Module) -> CiuicConfig:
    """Undo everything ``apply_`` did to ``model`` (in reverse order); returns the config.

    Raises:
        ApplyError: if ciuic was not applied to ``model``.
    """
    handle = _HANDLES.pop(model, None)
    if handle is None:
        raise ApplyError(f"ciuic is not applied to this {type(model).__name__}: nothing to remove.")
    _undo(handle)
    return handle.config


def handle_of(model: nn.Module) -> CiuicHandle | None:
    """The handle of the config applied to ``model``, or ``None``."""
    return _HANDLES.get(model)


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    config: CiuicConfig | str | Mapping[str, Any],
    **adamw_kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``config`` asks for, over ``params``.

    ``optimizer='adamw'`` with no step-in-backward and no optimizer offload gives
    ``torch.optim.AdamW``; anything else needs an installed optimizer technique.
    ``adamw_kwargs`` are AdamW's (``lr``, ``betas``, ``eps``, ``weight_decay``).
    """
    config = _as_config(config)
    asks = [key for key in request_keys(config) if key in OPTIMIZER_REQUESTS]
    if not asks:
        return torch.optim.AdamW(params, **adamw_kwargs)
    factory = optimizer_factory()
    if factory is None:
        raise TechniqueUnavailableError(
            f"{asks[0]}={_request_value(config, asks[0])!r} needs the ciuic optimizer, which this "
            f"installation does not have: use optimizer='adamw', step_in_backward=False and no "
            f"'optimizer' in offload."
        )
    return factory(params, config, **adamw_kwargs)
