"""The verbs: ``apply_`` changes a model in place, ``remove_`` undoes it, ``build_optimizer``
builds the optimizer a config asks for, ``step_scope`` wraps a training step.

The :class:`CiuicHandle` that ``apply_`` returns is stored on the model object itself (the
attribute ``_ciuic_handle``), so it travels with the model through ``copy.deepcopy``, pickling
and ``torch.save``, and :func:`handle_of` finds it through the usual wrappers (PEFT, DDP/FSDP,
``torch.compile``, a module holding the model). The applied config is also written into the
model's ``state_dict`` metadata (:func:`saved_config` reads it back), with the state of the
techniques that keep one (the rounding generators of compressed activations), so a checkpoint
saved from an applied model resumes exactly once ``apply_`` and ``load_state_dict`` run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import CiuicConfig
from .errors import ApplyError, ConfigError, TechniqueUnavailableError
from .registry import (
    BUILD_OPTIMIZER,
    Applied,
    Technique,
    deferred_reason,
    optimizer_factory,
    registered_techniques,
    request_keys,
    requested_techniques,
    unserved_requests,
)

HANDLE_ATTR = "_ciuic_handle"
"""Attribute of the model that holds its :class:`CiuicHandle`."""

METADATA_KEY = "ciuic"
"""Key of the entry ``apply_`` adds to the model's ``state_dict`` metadata."""

_WRAPPED = ("module", "_orig_mod", "_fsdp_wrapped_module", "base_model", "model")
"""Attributes under which the usual wrappers keep the model they wrap (DDP/FSDP/DataParallel,
``torch.compile``, FSDP1, PEFT, a LightningModule or any module holding a model)."""


@dataclass
class CiuicHandle:
    """What ``apply_`` did to one model.

    Attributes:
        config: The config that was applied.
        model_name: The class name of the model it was applied to.
        applied: One :class:`ciuic.registry.Applied` per technique that changed the model.
        skipped: ``(request, reason)`` for each request of the config that ``apply_`` did not
            carry out, e.g. ``("weights", "no technique ... is installed")``.
        deferred: Requests served elsewhere (the optimizer's, by ``build_optimizer``).
        model: The model it was applied to.
        requested: The config ``apply_`` was given: it differs from ``config`` when fields are
            left to the planner (``"auto"``), until the first ``step_scope(inputs=batch)`` sets
            them (:mod:`ciuic.planner.runtime`).
        plan: That first step's :class:`ciuic.Plan` (``None`` before it, or with no ``"auto"``).
    """

    config: CiuicConfig
    model_name: str
    applied: list[Applied] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[tuple[str, str]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)
    requested: CiuicConfig | None = field(default=None, repr=False)
    plan: Any = field(default=None, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def planning(self) -> bool:
        """Whether fields left to ``"auto"`` still wait for the first step's plan."""
        return self.requested is not None and bool(self.requested.planned()) and self.plan is None

    def report(self) -> str:
        """A readable summary: what each technique changed, what was skipped and why."""
        lines = [f"ciuic applied to {self.model_name}: {_describe(self.config)}"]
        for record in self.applied:
            detail = ", ".join(f"{k}={v}" for k, v in record.details.items() if _reportable(v))
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

    def record(self, technique: str) -> Applied | None:
        """The record of ``technique``, or ``None`` if it was not applied."""
        return next((r for r in self.applied if r.technique == technique), None)

    def step_scope(self, inputs: Any = None) -> contextlib.AbstractContextManager[Any]:
        """A context manager to wrap around one training step (forward and backward).

        ``inputs``: the step's batch. With fields left to ``"auto"``, the first call plans them
        for this batch's shape and sets them before the step (:mod:`ciuic.planner.runtime`);
        otherwise it is not used.

        Inside it the techniques act whichever module the step calls: a ``LightningModule``
        whose ``training_step`` calls ``self.model(...)``, a loss computed outside the model.
        Outside it they act only through the forward of the model ``apply_`` was given; a
        backward that ran with a requested technique doing nothing raises
        :class:`ciuic.errors.InertTechniqueError`. A null context when no applied technique
        needs a scope, so call sites never branch.

        Example:
            >>> import torch, ciuic
            >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
            >>> handle = ciuic.apply_(model, ciuic.CiuicConfig(activations="int8"))
            >>> with handle.step_scope():
            ...     model(torch.randn(8, 64)).sum().backward()
            >>> _ = ciuic.remove_(model)
        """
        if self.planning:
            self._plan_first_step(inputs)
        scopes = [record.scope for record in self.applied if record.scope is not None]
        if not scopes:
            return contextlib.nullcontext()
        return _entered(scopes)

    def _plan_first_step(self, inputs: Any) -> None:
        from .planner.runtime import plan_first_step

        assert self.requested is not None
        if inputs is None:
            raise ConfigError(
                f"{', '.join(self.requested.planned())}='auto' is planned for the first batch's shape: "
                f"pass it, step_scope(inputs=batch) (the Lightning strategy and the HF callback do)."
            )
        self.plan = plan_first_step(self, self.requested, inputs)

    def update(self, config: CiuicConfig | str | Mapping[str, Any]) -> list[str]:
        """Change the running config in place: re-apply only the techniques that must change.

        A technique is re-applied when one of its fields changed, and so is every technique
        applied after it (they hooked the modules it may have replaced); the others, and the
        optimizer, are left as they are. Fields served by ``build_optimizer`` are recorded in
        ``deferred`` with what to do. If re-applying fails, the previous config is restored.

        Returns:
            The names of the techniques that were re-applied (or removed), in order.
        """
        new = _as_config(config)
        if self.model is None:
            raise ApplyError("this handle has no model (it was not returned by ciuic.apply_).")
        if new.planned():
            name = new.planned()[0]
            raise ConfigError(
                f"{name}='auto' is not allowed in update(): the planner sets 'auto' fields at the first "
                f"step of a config given to apply_. Allowed: a value for {name} (ciuic.plan(..., "
                f"config=...) gives the planner's pick to pass here)."
            )
        changed = set(self.config.differs(new))
        first = _first_changed(self, new, changed)
        if first is None:
            self._set_config(new, changed)
            return []
        kept, redo = self.applied[:first], self.applied[first:]
        for record in reversed(redo):
            record.undo()
        old_config = self.config
        try:
            names = self._reapply(new, {r.technique for r in kept}, kept)
        except BaseException:
            self._reapply(old_config, {r.technique for r in kept}, kept)
            raise
        self._set_config(new, changed)
        return names

    def _reapply(self, config: CiuicConfig, keep: set[str], kept: list[Applied]) -> list[str]:
        assert self.model is not None
        self.applied = list(kept)
        names = []
        for technique in requested_techniques(config):
            if technique.name not in keep:
                self.applied.append(technique.apply(self.model, config))
                names.append(technique.name)
        return names

    def _set_config(self, config: CiuicConfig, changed: set[str]) -> None:
        self.config = config
        self.skipped, self.deferred = [], []
        _record_unserved(self, config, [r.technique for r in self.applied])
        optimizer_fields = [key for key in changed if deferred_reason(key) == BUILD_OPTIMIZER]
        if optimizer_fields:
            self.deferred.append(
                (
                    ", ".join(sorted(optimizer_fields)),
                    "changed by update(); the optimizer was left as it is: build a new one with "
                    "ciuic.build_optimizer to use the new settings",
                )
            )

    # -- state saved with the model ------------------------------------------------------
    def technique_states(self) -> dict[str, Any]:
        """``{technique: state}`` of the applied techniques that keep one (the rounding
        generators of compressed activations); what ``state_dict`` metadata carries."""
        return {r.technique: r.stateful.state_dict() for r in self.applied if r.stateful is not None}

    def load_technique_states(self, states: Mapping[str, Any]) -> None:
        """Restore what :meth:`technique_states` returned (techniques not in it are left alone)."""
        for record in self.applied:
            state = states.get(record.technique)
            if record.stateful is not None and state is not None:
                record.stateful.load_state_dict(state)

    def _install_state_hooks(self, model: nn.Module) -> None:
        self._hooks = [
            model.register_state_dict_post_hook(_MetadataWriter(self)),
            model.register_load_state_dict_pre_hook(_MetadataReader(self)),
        ]

    def _remove_state_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class _MetadataWriter:
    """State-dict post-hook: the applied config and technique states into the metadata."""

    def __init__(self, handle: CiuicHandle) -> None:
        self.handle = handle

    def __call__(self, module: nn.Module, state_dict: Any, prefix: str, local_metadata: Any) -> None:
        states = self.handle.technique_states()
        local_metadata[METADATA_KEY] = {"config": self.handle.config.to_dict(), "state": states}


class _MetadataReader:
    """Load-state-dict pre-hook: restores the technique states saved by :class:`_MetadataWriter`."""

    def __init__(self, handle: CiuicHandle) -> None:
        self.handle = handle

    def __call__(
        self, module: nn.Module, state_dict: Any, prefix: str, local_metadata: Any, *rest: Any
    ) -> None:
        saved = (local_metadata or {}).get(METADATA_KEY)
        if saved is not None:
            self.handle.load_technique_states(saved.get("state", {}))


@contextlib.contextmanager
def _entered(scopes: list[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(scope())
        yield


def _first_changed(handle: CiuicHandle, new: CiuicConfig, changed: set[str]) -> int | None:
    """Index in ``handle.applied`` of the first technique to undo for ``new``, or ``None``."""
    techniques = registered_techniques()
    applied = [r.technique for r in handle.applied]
    wanted = {t.name for t in requested_techniques(new)}
    for index, name in enumerate(applied):
        if name not in wanted or _serves(techniques[name], changed):
            return index
    newcomers = [t for t in requested_techniques(new) if t.name not in applied]
    if not newcomers:
        return None
    first = min(t.order for t in newcomers)
    later = [i for i, name in enumerate(applied) if techniques[name].order > first]
    return later[0] if later else len(applied)


def _serves(technique: Technique, changed: set[str]) -> bool:
    return any(key.partition(".")[0] in changed for key in technique.fields)


def _reportable(value: object) -> bool:
    return isinstance(value, (str, int, float, bool, list, tuple, dict)) or value is None


def _describe(config: CiuicConfig) -> str:
    requested = config.requested()
    if not requested:
        return "all techniques off"
    return ", ".join(f"{k}={_plain(v)!r}" for k, v in requested.items())


def _plain(value: object) -> object:
    if isinstance(value, frozenset):
        return sorted(value)
    to_value = getattr(value, "to_value", None)
    return to_value() if callable(to_value) else value


def as_config(config: CiuicConfig | str | Mapping[str, Any] | None = None, **fields: Any) -> CiuicConfig:
    """``config`` (a CiuicConfig, preset name, dict of fields or ``None``) with ``fields`` on top.

    The one way every entry point (``apply_``, the adapters' constructors) reads a config.

    Raises:
        ConfigError: ``config`` is none of those, or a field or preset is invalid.

    Example:
        >>> import ciuic
        >>> ciuic.as_config("balanced", activations="int4").activations.codec
        'int4'
    """
    if isinstance(config, CiuicConfig):
        return config.replace(**fields) if fields else config
    if isinstance(config, str):
        return CiuicConfig.preset(config, **fields)
    if isinstance(config, Mapping):
        return CiuicConfig.from_dict({**config, **fields})
    if config is None:
        return CiuicConfig(**fields)
    raise ConfigError(
        f"config={config!r} is not a CiuicConfig: pass CiuicConfig(...), a preset name "
        f"({', '.join(CiuicConfig.PRESETS)}), a dict of fields, or the fields as keywords."
    )


def _as_config(config: CiuicConfig | str | Mapping[str, Any]) -> CiuicConfig:
    return as_config(config)


def apply_(model: nn.Module, config: CiuicConfig | str | Mapping[str, Any]) -> CiuicHandle:
    """Apply the memory techniques ``config`` asks for to ``model``, in place.

    Techniques run in their registered order. If one fails, those already applied are undone
    before the error propagates, so the model is never left half-changed. Requests that no
    installed technique serves are recorded in ``handle.skipped`` and warned about, never
    dropped silently. Applying twice is refused, also through a wrapper of an applied model or
    to a module that holds one.

    Args:
        model: Any ``nn.Module`` (a Hugging Face or PEFT model, or a module holding one).
        config: A :class:`CiuicConfig`, a preset name, or a dict accepted by ``from_dict``.

    Returns:
        A :class:`CiuicHandle`; ``print(handle.report())`` shows what changed.

    Example:
        >>> import torch, ciuic
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> handle = ciuic.apply_(model, ciuic.CiuicConfig())
        >>> ciuic.remove_(model)
        CiuicConfig(...)
    """
    requested = _as_config(config)
    config = requested.without_auto()
    if not isinstance(model, nn.Module):
        raise ApplyError(f"model={type(model).__name__} is not a torch.nn.Module.")
    _refuse_applied(model)
    handle = CiuicHandle(config=config, model_name=type(model).__name__, model=model, requested=requested)
    techniques = requested_techniques(config)
    try:
        for technique in techniques:
            handle.applied.append(technique.apply(model, config))
    except BaseException:
        _undo(handle)
        raise
    _record_unserved(handle, config, [t.name for t in techniques])
    model.__dict__[HANDLE_ATTR] = handle
    for module in model.modules():
        module.__dict__[_INSIDE] = True
    handle._install_state_hooks(model)
    if handle.planning:
        handle._hooks.append(model.register_forward_pre_hook(_PlanFirst(handle)))
    return handle


class _PlanFirst:
    """Forward pre-hook while ``"auto"`` fields wait: a training forward before the plan is
    refused (the fields would silently stay at their defaults)."""

    def __init__(self, handle: CiuicHandle) -> None:
        self.handle = handle

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.handle.planning and module.training and torch.is_grad_enabled():
            self.handle._plan_first_step(None)


_INSIDE = "_ciuic_inside"
"""Marks every module of an applied model, so applying to one of them is refused too."""


def _refuse_applied(model: nn.Module) -> None:
    if model.__dict__.get(_INSIDE) and _find_handle(model) is None:
        raise ApplyError(
            f"ciuic is already applied to a model that holds this {type(model).__name__}: call "
            f"ciuic.remove_ on that model before applying another config to a part of it."
        )
    found = _find_handle(model)
    if found is None:
        for module in model.modules():
            if HANDLE_ATTR in module.__dict__:
                found = module.__dict__[HANDLE_ATTR]
                break
    if found is not None:
        inner = "" if found.model is model else f" (to the {found.model_name} it holds)"
        raise ApplyError(
            f"ciuic is already applied to this {type(model).__name__}{inner}: call "
            f"ciuic.remove_(model) before applying another config, or handle.update(config) to change it."
        )


def _record_unserved(handle: CiuicHandle, config: CiuicConfig, served: list[str]) -> None:
    for key in unserved_requests(config, served):
        reason = deferred_reason(key)
        if reason is not None:
            handle.deferred.append((key, reason))
            continue
        value = True if key.startswith("offload.") else _plain(getattr(config, key))
        reason = f"no installed technique serves {key}={value!r} in this version of ciuic"
        handle.skipped.append((key, reason))
        warnings.warn(f"ciuic.apply_: {key} skipped: {reason}", UserWarning, stacklevel=3)


def _undo(handle: CiuicHandle) -> None:
    for record in reversed(handle.applied):
        record.undo()
    handle.applied.clear()


def remove_(model: nn.Module) -> CiuicConfig:
    """Undo everything ``apply_`` did to ``model`` (in reverse order); returns the config.

    ``model`` may be the applied model or a wrapper of it (see :func:`handle_of`).

    Raises:
        ApplyError: if ciuic was not applied to ``model``.
    """
    handle = handle_of(model)
    if handle is None or handle.model is None:
        raise ApplyError(f"ciuic is not applied to this {type(model).__name__}: nothing to remove.")
    _undo(handle)
    handle._remove_state_hooks()
    handle.model.__dict__.pop(HANDLE_ATTR, None)
    for module in handle.model.modules():
        module.__dict__.pop(_INSIDE, None)
    return handle.config


def handle_of(model: nn.Module) -> CiuicHandle | None:
    """The handle of the config applied to ``model`` or to the model it wraps, or ``None``.

    Looks through the usual wrappers: ``DistributedDataParallel``/``DataParallel``/FSDP
    (``.module``), ``torch.compile`` (``._orig_mod``), PEFT (``.base_model``), and modules that
    hold the model (``.model``).
    """
    return _find_handle(model)


def _find_handle(model: nn.Module, depth: int = 0) -> CiuicHandle | None:
    handle = model.__dict__.get(HANDLE_ATTR)
    if handle is not None or depth > 8:
        return handle
    for attr in _WRAPPED:
        inner = model._modules.get(attr) if attr in model._modules else model.__dict__.get(attr)
        if isinstance(inner, nn.Module) and inner is not model:
            found = _find_handle(inner, depth + 1)
            if found is not None:
                return found
    return None


def step_scope(model: nn.Module, inputs: Any = None) -> contextlib.AbstractContextManager[Any]:
    """``handle_of(model).step_scope(inputs)``, or a null context when ciuic is not applied.

    Example:
        >>> import torch, ciuic
        >>> model = torch.nn.Linear(4, 1)
        >>> with ciuic.step_scope(model):
        ...     model(torch.randn(2, 4)).sum().backward()
    """
    handle = handle_of(model)
    return contextlib.nullcontext() if handle is None else handle.step_scope(inputs)


def saved_config(state_dict: Mapping[str, Any], prefix: str = "") -> CiuicConfig | None:
    """The config that was applied to the model a ``state_dict`` was taken from, or ``None``.

    Args:
        state_dict: What ``model.state_dict()`` returned (and ``torch.save``/``torch.load`` kept).
        prefix: The model's prefix in it (``"module."`` for a DDP-wrapped model...).
    """
    metadata = getattr(state_dict, "_metadata", None) or {}
    saved = metadata.get(prefix[:-1] if prefix.endswith(".") else prefix, {}).get(METADATA_KEY)
    return None if saved is None else CiuicConfig.from_dict(saved["config"])


def optimizer_requests(config: CiuicConfig) -> list[str]:
    """The requests of ``config`` that need the ciuic optimizer (empty: torch's AdamW serves it)."""
    return [key for key in request_keys(config) if deferred_reason(key) == BUILD_OPTIMIZER]


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
    asks = optimizer_requests(config)
    if not asks:
        return torch.optim.AdamW(params, **adamw_kwargs)
    factory = optimizer_factory()
    if factory is None:
        value = True if asks[0].startswith("offload.") else getattr(config, asks[0])
        raise TechniqueUnavailableError(
            f"{asks[0]}={value!r} needs the ciuic optimizer, which this "
            f"installation does not have: use optimizer='adamw', step_in_backward=False and no "
            f"'optimizer' in offload."
        )
    return factory(params, config, **adamw_kwargs)


def apply_technique_(model: nn.Module, config: CiuicConfig, technique: str) -> Applied:
    """What the technique packages' old entry points (``ciuic.weights.quantize_``...) now do:
    ``apply_(model, config)``, returning that technique's record with ``undo`` = ``remove_``."""
    handle = apply_(model, config)
    record = handle.record(technique) or Applied(technique)
    return dataclasses.replace(record, undo=functools.partial(_remove_silently, model))


def _remove_silently(model: nn.Module) -> None:
    remove_(model)
