"""`CiuicConfig`: the one configuration object that ``apply_``, the Lightning strategy and the
Hugging Face callback share.

The fields are not listed here: each technique package registers the fields it owns with
:func:`register_field` (and the offload targets it serves with :func:`register_offload_target`)
from its own ``__init__.py``, so adding a technique edits no central list. This module owns only
the fields every technique shares: ``offload`` and ``budget``. Every field is described once,
in its :class:`FieldSpec`; the CLI help and the error messages read it from there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .units import parse_bytes

CONFIG_VERSION = 1
"""Version written into every serialized config (key ``"version"``)."""

PRESET_NAMES = ("off", "balanced", "max")
"""The named presets; each field says its value in each (``FieldSpec.presets``)."""


class Invalid(Exception):
    """Raised by a normalizer; ``CiuicConfig`` turns it into a ConfigError naming the field."""


@dataclass(frozen=True)
class FieldSpec:
    """How one config field is documented, validated, serialized and used by the presets.

    Attributes:
        name: The keyword, YAML/JSON key and attribute name.
        doc: One-paragraph description (CLI help, docs).
        allowed: What values are allowed, as the error message says it.
        default: The default value (already normalized).
        normalize: ``normalize(field, value) -> value``; raises :class:`Invalid` (or a
            ``ConfigError`` that already names the field).
        to_plain: The JSON/YAML form of a normalized value.
        order: Position in ``to_dict``, the help and reports.
        presets: The field's value in each named preset where it is not the default.
        deferred: Why ``apply_`` leaves this field to another entry point (e.g. the optimizer's
            fields to ``build_optimizer``); ``None`` when ``apply_`` serves it.
    """

    name: str
    doc: str
    allowed: str
    default: Any
    normalize: Callable[[str, object], object]
    to_plain: Callable[[Any], Any] = lambda value: value
    order: int = 100
    presets: Mapping[str, Any] = field(default_factory=dict)
    deferred: str | None = None


@dataclass(frozen=True)
class OffloadTarget:
    """A member of ``offload`` and who serves it (``deferred`` as in :class:`FieldSpec`)."""

    name: str
    doc: str
    deferred: str | None = None


AUTO = "auto"
"""A field left to the planner: ``CiuicConfig(budget=..., weights="auto")`` (see :data:`PLANNED`)."""

PLANNED: dict[str, str] = {}
"""Fields that take :data:`AUTO`, each with what the planner does with it (filled by
``ciuic.planner``): ``apply_`` applies the field's default, and the first step
(``step_scope(inputs=batch)``) sets what ``ciuic.plan`` picks for the live model and that batch's
shape within ``budget``."""

FIELDS: dict[str, FieldSpec] = {}
"""Every registered field by name (filled by the technique packages when ``ciuic`` is imported)."""

OFFLOAD_TARGETS: dict[str, OffloadTarget] = {}
"""Every registered offload target by name."""


def register_field(spec: FieldSpec) -> FieldSpec:
    """Add a config field (called by the technique package that owns it)."""
    FIELDS[spec.name] = spec
    return spec


def register_offload_target(target: OffloadTarget) -> OffloadTarget:
    """Allow ``target.name`` in ``offload`` (called by the technique that serves it)."""
    OFFLOAD_TARGETS[target.name] = target
    allowed = "a set drawn from " + ", ".join(map(repr, sorted(OFFLOAD_TARGETS)))
    FIELDS["offload"] = dataclasses.replace(FIELDS["offload"], allowed=allowed)
    return target


def fields() -> list[FieldSpec]:
    """The registered fields in their documented order."""
    _discover()
    return sorted(FIELDS.values(), key=lambda spec: (spec.order, spec.name))


def _discover() -> None:
    from .registry import discover

    discover()


# -- normalizers shared by the techniques ----------------------------------------------------
def choice(*values: str) -> Callable[[str, object], object]:
    """A normalizer accepting exactly one of ``values``."""

    def normalize(field: str, value: object) -> object:
        if not isinstance(value, str) or value not in values:
            raise Invalid("")
        return value

    return normalize


def flag(field: str, value: object) -> object:
    """A normalizer accepting ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise Invalid("")
    return value


def _offload(field: str, value: object) -> object:
    if value is None or value == "none":
        return frozenset()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Collection) or isinstance(items, Mapping):
        raise Invalid("give a set or list, e.g. offload={'activations'}")
    bad = [item for item in items if not isinstance(item, str) or item not in OFFLOAD_TARGETS]
    if bad:
        raise Invalid(f"{bad[0]!r} cannot be offloaded")
    return frozenset(items)


def _budget(field: str, value: object) -> object:
    if value is None:
        return None
    try:
        return parse_bytes(value, field=field)
    except ConfigError as error:
        raise Invalid(str(error).split(": ", 1)[-1].rstrip(".")) from None


register_field(
    FieldSpec(
        name="offload",
        doc="What to keep in host memory instead of the accelerator: a set of the registered "
        "targets (activations, optimizer states, ...); empty: nothing.",
        allowed="a set drawn from the registered targets",
        default=frozenset(),
        normalize=_offload,
        to_plain=sorted,
        order=30,
        presets={"max": frozenset({"activations", "optimizer"})},
    )
)
register_field(
    FieldSpec(
        name="budget",
        doc="Accelerator memory the run may use, in bytes or as a string like '24GiB' (None: the "
        "whole device). Stored as an int number of bytes. With a budget, weights, activations and "
        "loss also take 'auto': ciuic.plan picks them at the first step for the live model and "
        "that batch's shape.",
        allowed="None, an int >= 1, or a string like '24GiB'",
        default=None,
        normalize=_budget,
        order=80,
        deferred="read by the techniques that size themselves ('auto' modes)",
    )
)


class CiuicConfig:
    """Which memory techniques to apply, validated at construction; immutable.

    Construct it with keywords, from a preset, or from a dict/JSON/YAML file; an invalid value
    raises :class:`ciuic.ConfigError` (a ``ValueError``) naming the field, the value and what is
    allowed. The fields are those the installed techniques register (``ciuic.config.fields()``,
    ``ciuic --help``): ``weights``, ``activations``, ``offload``, ``checkpointing``,
    ``optimizer``, ``step_in_backward``, ``loss``, ``budget``. A technique with several options
    takes a string shorthand or a mapping: ``weights="nf4"`` or
    ``weights={"format": "nf4", "prune": "2:4"}``.

    Example:
        >>> from ciuic import CiuicConfig
        >>> cfg = CiuicConfig(activations="int8", offload={"activations"}, budget="24GiB")
        >>> cfg.budget
        25769803776
        >>> CiuicConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    __slots__ = ("_values",)
    _values: dict[str, Any]

    PRESETS: ClassVar[tuple[str, ...]] = PRESET_NAMES

    def __init__(self, /, **values: Any) -> None:
        specs = {spec.name: spec for spec in fields()}
        unknown = [key for key in values if key not in specs]
        if unknown:
            raise ConfigError(f"config field {unknown[0]!r} is unknown: known fields are {', '.join(specs)}.")
        normalized = {name: _normalize(spec, values.get(name, spec.default)) for name, spec in specs.items()}
        auto = [name for name, value in normalized.items() if _is_auto(name, value)]
        if auto and normalized.get("budget") is None:
            raise ConfigError(
                f"{auto[0]}='auto' is not allowed without a budget: {PLANNED[auto[0]]} to fit budget. "
                f"Allowed: set budget (e.g. budget='24GiB'), or give {auto[0]} a value."
            )
        object.__setattr__(self, "_values", normalized)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values") if name != "_values" else None
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"CiuicConfig has no field {name!r}: fields are {', '.join(values or ())}.")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}: use config.replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CiuicConfig):
            return NotImplemented
        return self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        plain = self.to_dict()
        return f"CiuicConfig({', '.join(f'{k}={plain[k]!r}' for k in self._values)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_from_plain, (self.to_dict(),))

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CiuicConfig:
        """A named starting point: ``'off'`` (nothing), ``'balanced'``, ``'max'`` (everything).

        Keyword overrides replace preset fields:
        ``CiuicConfig.preset("balanced", budget="24GiB")``.
        """
        if name not in PRESET_NAMES:
            raise ConfigError(
                f"preset={name!r} is unknown: choose one of {', '.join(map(repr, PRESET_NAMES))}."
            )
        values = {spec.name: spec.presets[name] for spec in fields() if name in spec.presets}
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CiuicConfig:
        """Build from a mapping as written by :meth:`to_dict` (``version`` may be omitted).

        A ``preset`` key starts from that preset and the other keys override it.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"config={data!r} is not a mapping of field names to values.")
        data = dict(data)
        bad = [key for key in data if not isinstance(key, str)]
        if bad:
            raise ConfigError(
                f"config field {bad[0]!r} is unknown: field names are strings ({', '.join(FIELDS)})."
            )
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION or isinstance(version, bool):
            raise ConfigError(
                f"version={version!r} is not supported: this Ciuic reads config version {CONFIG_VERSION}."
            )
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.preset(preset, **data)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> CiuicConfig:
        """Read a ``.json``, ``.yaml`` or ``.yml`` file written by :meth:`to_file` (or by hand).

        Raises:
            ConfigError: the file is missing, empty, malformed (naming the line and column) or
                holds something other than a mapping of fields.
        """
        path = Path(path)
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise ConfigError(
                f"config file {str(path)!r} has suffix {path.suffix!r}: use .json, .yaml or .yml."
            )
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {error.strerror}.") from None
        data = _parse(path, text)
        if data is None:
            raise ConfigError(
                f"config file {str(path)!r} is empty: write at least one field (e.g. 'preset: balanced' or "
                f"'weights: nf4'); `ciuic config --preset balanced` prints a complete file."
            )
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config file {str(path)!r} holds a {type(data).__name__}, not a mapping of field names to "
                f"values (e.g. 'weights: nf4')."
            )
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"config file {str(path)!r}: {error}") from None

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict with a ``version`` key; ``from_dict`` inverts it."""
        data: dict[str, Any] = {"version": CONFIG_VERSION}
        for spec in fields():
            value = self._values[spec.name]
            data[spec.name] = AUTO if _is_auto(spec.name, value) else spec.to_plain(value)
        return data

    def planned(self) -> tuple[str, ...]:
        """The fields left to the planner (set to ``"auto"``)."""
        return tuple(name for name, value in self._values.items() if _is_auto(name, value))

    def without_auto(self) -> CiuicConfig:
        """This config with each ``"auto"`` field at its default: what ``apply_`` applies
        until the first step's plan."""
        return self.replace(**{name: FIELDS[name].default for name in self.planned()})

    def to_file(self, path: str | Path) -> None:
        """Write JSON or YAML, chosen by the suffix of ``path``."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            raise ConfigError(
                f"config file {str(path)!r} has suffix {path.suffix!r}: use .json, .yaml or .yml."
            )

    def replace(self, **changes: Any) -> CiuicConfig:
        """A validated copy with some fields changed (the config itself is immutable)."""
        return CiuicConfig(**{**self._values, **changes})

    def requested(self) -> dict[str, object]:
        """The fields whose value differs from the default, i.e. what this config asks for."""
        return {
            spec.name: self._values[spec.name] for spec in fields() if self._values[spec.name] != spec.default
        }

    def differs(self, other: CiuicConfig) -> list[str]:
        """Names of the fields whose values differ between ``self`` and ``other``."""
        return [spec.name for spec in fields() if self._values[spec.name] != other._values[spec.name]]


def _is_auto(name: str, value: object) -> bool:
    return name in PLANNED and isinstance(value, str) and value == AUTO


def _normalize(spec: FieldSpec, value: object) -> object:
    if _is_auto(spec.name, value):
        return AUTO
    try:
        return spec.normalize(spec.name, value)
    except Invalid as invalid:
        reason = f": {invalid}" if str(invalid) else ""
        raise ConfigError(f"{spec.name}={value!r} is not allowed{reason}. Allowed: {spec.allowed}.") from None


def _hashable(value: object) -> object:
    return tuple(sorted(value)) if isinstance(value, frozenset) else value


def _from_plain(data: dict[str, Any]) -> CiuicConfig:
    return CiuicConfig.from_dict(data)


def _parse(path: Path, text: str) -> Any:
    """The file's data; a syntax error becomes one ConfigError naming the file, line and column."""
    if path.suffix == ".json":
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"config file {str(path)!r} is not valid JSON: {error.msg} at line {error.lineno}, "
                f"column {error.colno}."
            ) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {problem}{where}.") from None
