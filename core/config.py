"""`CiuicConfig`: the one configuration object that ``apply_``, the Lightning strategy and the
Hugging Face callback share.

Every field is described once, in ``FIELDS`` below; the docstring table, the CLI help and the
error messages all read it from there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .units import parse_bytes

CONFIG_VERSION = 1
"""Version written into every serialized config (key ``"version"``)."""


@dataclass(frozen=True)
class FieldSpec:
    """How one config field is documented and validated."""

    name: str
    doc: str
    allowed: str
    normalize: Callable[[str, object], object]


class _Invalid(Exception):
    """Raised by a normalizer; ``CiuicConfig`` turns it into a ConfigError naming the field."""


def _choice(*values: str) -> Callable[[str, object], object]:
    def normalize(field: str, value: object) -> object:
        if not isinstance(value, str) or value not in values:
            raise _Invalid("")
        return value

    return normalize


OFFLOAD_TARGETS = ("activations", "optimizer")


def _offload(field: str, value: object) -> object:
    if value is None or value == "none":
        return frozenset()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Collection) or isinstance(items, Mapping):
        raise _Invalid("give a set or list, e.g. offload={'activations'}")
    bad = [item for item in items if not isinstance(item, str) or item not in OFFLOAD_TARGETS]
    if bad:
        raise _Invalid(f"{bad[0]!r} cannot be offloaded")
    return frozenset(items)


def _checkpointing(field: str, value: object) -> object:
    if isinstance(value, str) and value in ("none", "auto", "full"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _Invalid("an int N checkpoints every N-th decoder block")


def _flag(field: str, value: object) -> object:
    if not isinstance(value, bool):
        raise _Invalid("")
    return value


def _budget(field: str, value: object) -> object:
    if value is None:
        return None
    try:
        return parse_bytes(value, field=field)
    except ConfigError as error:
        raise _Invalid(str(error).split(": ", 1)[-1].rstrip(".")) from None


FIELDS: dict[str, FieldSpec] = {
    spec.name: spec
    for spec in (
        FieldSpec(
            "weights",
            "Storage of frozen base weights: 'none' keeps them as loaded; 'int8' (LLM.int8), "
            "'nf4' or 'fp4' (4-bit, QLoRA) quantize them in place with bitsandbytes.",
            "'none', 'int8', 'nf4', 'fp4'",
            _choice("none", "int8", "nf4", "fp4"),
        ),
        FieldSpec(
            "activations",
            "Codec for tensors saved for backward: 'none' keeps them exact; 'fp8', 'int8', "
            "'int4', 'int2' compress them (the forward pass stays exact).",
            "'none', 'fp8', 'int8', 'int4', 'int2'",
            _choice("none", "fp8", "int8", "int4", "int2"),
        ),
        FieldSpec(
            "offload",
            "What to keep in host memory instead of the accelerator: a set drawn from "
            "'activations' and 'optimizer' (empty: nothing).",
            "a set drawn from 'activations', 'optimizer'",
            _offload,
        ),
        FieldSpec(
            "checkpointing",
            "Recompute decoder blocks in backward instead of saving their activations: 'none', "
            "'full' (every block), an int N (every N-th block) or 'auto' (the fewest blocks that "
            "fit `budget`).",
            "'none', 'auto', 'full', or an int >= 1",
            _checkpointing,
        ),
        FieldSpec(
            "optimizer",
            "Optimizer built by `ciuic.build_optimizer`: 'adamw' (fp32 states), 'adamw8bit' or "
            "'adamw4bit' (block-wise quantized states).",
            "'adamw', 'adamw8bit', 'adamw4bit'",
            _choice("adamw", "adamw8bit", "adamw4bit"),
        ),
        FieldSpec(
            "step_in_backward",
            "Update each parameter as soon as its gradient is ready and free that gradient, so "
            "the gradients of the whole model never coexist.",
            "True or False",
            _flag,
        ),
        FieldSpec(
            "loss",
            "Causal-LM loss: 'standard' (the model's own) or 'chunked' (linear + cross-entropy "
            "in chunks, never holding the full logits).",
            "'standard', 'chunked'",
            _choice("standard", "chunked"),
        ),
        FieldSpec(
            "budget",
            "Accelerator memory the run may use, in bytes or as a string like '24GiB' "
            "(None: the whole device). Stored as an int number of bytes.",
            "None, an int >= 1, or a string like '24GiB'",
            _budget,
        ),
    )
}

_PRESETS: dict[str, dict[str, Any]] = {
    "off": {},
    "balanced": {
        "weights": "nf4",
        "activations": "int8",
        "optimizer": "adamw8bit",
        "loss": "chunked",
    },
    "max": {
        "weights": "nf4",
        "activations": "int4",
        "offload": frozenset(OFFLOAD_TARGETS),
        "checkpointing": "full",
        "optimizer": "adamw4bit",
        "step_in_backward": True,
        "loss": "chunked",
    },
}


@dataclass(frozen=True, kw_only=True)
class CiuicConfig:
    """Which memory techniques to apply, validated at construction.

    Construct it with keywords, from a preset, or from a dict/JSON/YAML file; an invalid value
    raises :class:`ciuic.ConfigError` (a ``ValueError``) naming the field, the value and what is
    allowed. See ``ciuic.config.FIELDS`` (or ``ciuic --help``) for what each field does.

    Example:
        >>> from ciuic import CiuicConfig
        >>> cfg = CiuicConfig(activations="int8", offload={"activations"}, budget="24GiB")
        >>> cfg.budget
        25769803776
        >>> CiuicConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    weights: str = "none"
    activations: str = "none"
    offload: Collection[str] | str = frozenset()
    checkpointing: str | int = "none"
    optimizer: str = "adamw"
    step_in_backward: bool = False
    loss: str = "standard"
    budget: int | str | None = None

    PRESETS: ClassVar[tuple[str, ...]] = tuple(_PRESETS)

    def __post_init__(self) -> None:
        for name, spec in FIELDS.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, spec.normalize(name, value))
            except _Invalid as invalid:
                reason = f": {invalid}" if str(invalid) else ""
                raise ConfigError(
                    f"{name}={value!r} is not allowed{reason}. Allowed: {spec.allowed}."
                ) from None

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CiuicConfig:
        """A named starting point: ``'off'`` (nothing), ``'balanced'``, ``'max'`` (everything).

        Keyword overrides replace preset fields:
        ``CiuicConfig.preset("balanced", budget="24GiB")``.
        """
        if name not in _PRESETS:
            raise ConfigError(f"preset={name!r} is unknown: choose one of {', '.join(map(repr, _PRESETS))}.")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CiuicConfig:
        """Build from a mapping as written by :meth:`to_dict` (``version`` may be omitted)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config={data!r} is not a mapping of field names to values.")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION or isinstance(version, bool):
            raise ConfigError(
                f"version={version!r} is not supported: this Ciuic reads config version {CONFIG_VERSION}."
            )
        unknown = [key for key in data if key not in FIELDS]
        if unknown:
            raise ConfigError(
                f"config field {unknown[0]!r} is unknown: known fields are {', '.join(FIELDS)}."
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> CiuicConfig:
        """Read a ``.json``, ``.yaml`` or ``.yml`` file written by :meth:`to_file` (or by hand)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_dict(json.loads(text))
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(text) or {})
        raise ConfigError(f"config file {str(path)!r} has suffix {path.suffix!r}: use .json, .yaml or .yml.")

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict with a ``version`` key; ``from_dict`` inverts it."""
        data: dict[str, Any] = {"version": CONFIG_VERSION}
        for name in FIELDS:
            value = getattr(self, name)
            data[name] = sorted(value) if name == "offload" else value
        return data

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
        return dataclasses.replace(self, **changes)

    def requested(self) -> dict[str, object]:
        """The fields whose value differs from the default, i.e. what this config asks for."""
        default = CiuicConfig()
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) != getattr(default, name)}
