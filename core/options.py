"""`TechniqueOptions`: the base of the options dataclass a technique composes into `CiuicConfig`.

A technique with more than one knob (``weights``, ``activations``, ``loss``) owns a frozen,
keyword-only options dataclass deriving from :class:`TechniqueOptions`. The config field takes
three spellings, all normalized to that dataclass:

- the string shorthand that sets one field (``weights="nf4"`` is ``WeightOptions(format="nf4")``);
- a mapping of its fields, as YAML and JSON give it (``weights={"format": "nf4", "prune": "2:4"}``);
- the dataclass itself (``weights=WeightOptions(format="nf4", double_quant=True)``).

``to_value`` writes the shorthand back when the other fields are at their defaults, and a dict
otherwise, so files stay short. An options object also compares equal to its shorthand
(``config.weights == "nf4"``), which keeps simple checks simple.

Example:
    >>> from ciuic.weights import WeightOptions
    >>> WeightOptions.from_value("weights", {"format": "nf4", "double_quant": True}).double_quant
    True
    >>> WeightOptions.from_value("weights", "int8") == "int8"
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .config import Invalid
from .errors import ConfigError

T = TypeVar("T", bound="TechniqueOptions")


class TechniqueOptions:
    """Mixin for a technique's frozen options dataclass (see the module docstring).

    Subclasses set ``SHORTHAND`` (the field a string value sets) and ``OFF`` (the shorthand
    meaning "technique off"), and may override :meth:`_field_from_plain` /
    :meth:`_field_to_plain` for fields that are not plain JSON values.
    """

    SHORTHAND: ClassVar[str]
    OFF: ClassVar[str] = "none"

    @classmethod
    def from_value(cls: type[T], field: str, value: object) -> T:
        """Normalize a config value (shorthand, mapping or instance) for config field ``field``.

        Raises:
            ConfigError: naming ``field`` (and the key, for a mapping) with what is allowed.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls._build(field, {cls.SHORTHAND: value}, shorthand=value)
        if isinstance(value, Mapping):
            return cls._build(field, dict(value))
        raise Invalid(f"give a string, a mapping of {cls.__name__} fields or a {cls.__name__}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _build(cls: type[T], field: str, data: dict[str, Any], shorthand: str | None = None) -> T:
        known = cls.field_names()
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ConfigError(
                f"{field}.{unknown[0]} is not a {cls.__name__} field: known fields are {', '.join(known)}."
            )
        try:
            values = {key: cls._field_from_plain(key, item) for key, item in data.items()}
            return cls(**values)
        except ConfigError as error:
            if shorthand is not None:  # "weights='nf5' is not allowed. Allowed: ..., or a mapping ..."
                message = str(error).split(" is not allowed", 1)[-1].rstrip(".")
                raise ConfigError(
                    f"{field}={shorthand!r} is not allowed{message}, or a mapping of {cls.__name__} fields."
                ) from None
            raise ConfigError(f"{field}.{error}") from None

    @classmethod
    def _field_from_plain(cls, name: str, value: Any) -> Any:
        """Turn a JSON/YAML value of field ``name`` into what the dataclass takes."""
        return tuple(value) if isinstance(value, list) else value

    def _field_to_plain(self, name: str, value: Any) -> Any:
        """Turn field ``name``'s value into a JSON/YAML value (inverse of ``_field_from_plain``)."""
        return list(value) if isinstance(value, tuple) else value

    def to_value(self) -> str | dict[str, Any]:
        """The shortest plain form: the shorthand string, or a dict of the non-default fields."""
        default = type(self)(**{self.SHORTHAND: getattr(self, self.SHORTHAND)})
        changed = {
            f.name: self._field_to_plain(f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name == self.SHORTHAND or getattr(self, f.name) != getattr(default, f.name)
        }
        if len(changed) == 1:
            return str(changed[self.SHORTHAND])
        return changed

    @classmethod
    def field(cls, name: str, doc: str, *, order: int, presets: dict[str, Any], allowed: str) -> Any:
        """The :class:`ciuic.config.FieldSpec` of a config field holding these options.

        Args:
            name: The field name (``"weights"``).
            doc: What the field does (CLI help).
            order: Its place in ``to_dict``, the help and reports.
            presets: Its value per preset where not off.
            allowed: The shorthands allowed, as the error message says them.
        """
        from .config import FieldSpec

        where = f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"
        return FieldSpec(
            name=name,
            doc=f"{doc} A mapping sets more options: {{{', '.join(cls.field_names())}}} (see {where}).",
            allowed=f"{allowed}, or a mapping of {cls.__name__} fields",
            default=cls(**{cls.SHORTHAND: cls.OFF}),
            normalize=cls.from_value,
            to_plain=_to_value,
            order=order,
            presets=presets,
        )

    @property
    def enabled(self) -> bool:
        """Whether these options ask the technique to do anything."""
        return bool(getattr(self, self.SHORTHAND) != self.OFF)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                return self == type(self).from_value(type(self).__name__, other)
            except ConfigError:
                return False
        if type(other) is not type(self):
            return NotImplemented
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]


def _to_value(options: TechniqueOptions) -> str | dict[str, Any]:
    return options.to_value()
