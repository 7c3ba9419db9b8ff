"""Options of the activation technique: codec, per-module codec rules, group size, threshold.

The config field ``activations`` takes a codec string (``activations="int4"`` is
``ActivationOptions(codec="int4")``), a mapping of these fields (``activations={"codec":
"int4", "group_size": 32, "rules": [{"codec": "int8", "types": ["*Attention"]}]}``) or an
``ActivationOptions``.

A :class:`CodecRule` is an opt-out: where it matches, a saved tensor gets *at least* the
precision of the rule's codec (``'none'``: never compressed). The defaults spend more bits where
the error reaches the LoRA gradients most per byte saved, as GACT (Liu et al., 2022) does with
its per-tensor bit allocation. They were chosen by measuring, on the tiny DeepSeek-V3 + LoRA of
the tests (bf16 autocast, 2 x 256 tokens), how much each saved tensor alone at 2 bits lowers
the cosine of the LoRA gradient with the exact one:

- normalisation layers, int8 (their input and statistics feed the gradient of everything
  before them; the final norm costs 0.003 of cosine at 2 bits);
- the LM head and the loss, int8 (the log-softmax of the logits starts the backward pass);
- the routed experts of a mixture of experts, int4 (their gathered inputs and activations cost
  0.015 to 0.05 each at 2 bits: all at 2 bits take the cosine from 0.99 to 0.90);
- the low-rank path of LoRA (``lora_B``'s input, rank r: r / hidden of a hidden state's
  bytes), int8: 0.002 to 0.006 each at 2 bits, at under 3% of the saved bytes;
- copies of weights (``ActivationOptions.weight_copies``), int8: autocast's bf16 copy of a
  frozen weight is what backward multiplies every gradient by (the LM head's costs 0.16).

Attention follows the config's codec: its softmax probabilities, the largest saved tensors of
an eager attention, cost under 0.0001 each at 2 bits on that model. A model whose attention
rows are sharply peaked may want ``CodecRule("int4", types=("*Attention",))``; the bench
(``python bench/activations.py``) prints the bytes and cosine of that choice.

Example:
    >>> from ciuic.activations import ActivationOptions, CodecRule
    >>> opts = ActivationOptions(rules=(CodecRule("none", modules=("*.mlp.gate",)),))
    >>> opts.codec_for("model.layers.1.mlp.gate", type(None), "int4")
    'none'
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ciuic.errors import ConfigError
from ciuic.options import TechniqueOptions

from .codecs import CODECS, check_group_size, more_precise


@dataclass(frozen=True)
class CodecRule:
    """Where saved tensors keep at least ``codec``'s precision.

    Attributes:
        codec: ``'none'`` (exact), ``'fp8'``, ``'int8'``, ``'int4'`` or ``'int2'``.
        modules: ``fnmatch`` patterns on the qualified module name (``"model.layers.*.mlp"``);
            ``""`` is the root module.
        types: ``fnmatch`` patterns on the class names in the module type's MRO
            (``"*RMSNorm"``, ``"Linear"``).
        subtree: Whether the rule also covers the submodules (``False``: only the tensors the
            module saves itself, e.g. the loss computed in a ``*ForCausalLM`` forward).
    """

    codec: str
    modules: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    subtree: bool = True

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(
                f"CodecRule.codec={self.codec!r} is not allowed. Allowed: {', '.join(map(repr, CODECS))}."
            )
        for name in ("modules", "types"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"CodecRule.{name}={value!r} is not allowed: give a tuple of fnmatch patterns, "
                    f"e.g. {name}=('{'*Norm' if name == 'types' else 'model.layers.*'}',)."
                )
            object.__setattr__(self, name, tuple(value))
        if not self.modules and not self.types:
            raise ConfigError("CodecRule needs modules=(...) or types=(...): a rule that matches nothing.")

    def matches(self, name: str, module_type: type) -> bool:
        """Whether the rule applies to the module ``name`` of type ``module_type``."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.modules):
            return True
        classes = [cls.__name__ for cls in module_type.__mro__]
        return any(fnmatch.fnmatchcase(c, p) for p in self.types for c in classes)


DEFAULT_RULES = (
    CodecRule("int8", types=("*RMSNorm", "*LayerNorm", "LayerNorm", "GroupNorm", "*Norm")),
    CodecRule("int8", modules=("lm_head", "*.lm_head")),
    CodecRule("int8", types=("*ForCausalLM",), subtree=False),
    CodecRule("int4", modules=("*.experts",), types=("*Experts",)),
    CodecRule("int8", modules=("*.lora_B", "*.lora_B.*")),
)
"""The rules of :class:`ActivationOptions` by default (see the module docstring)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ActivationOptions(TechniqueOptions):
    """How saved tensors are compressed.

    Attributes:
        codec: ``'none'`` (exact; the default), ``'fp8'``, ``'int8'``, ``'int4'`` or ``'int2'``.
        rules: Opt-outs, first match wins, checked from the innermost module outwards.
        group_size: Elements sharing one scale (a power of two, 8 to 65536).
        min_numel: Floating-point tensors with fewer elements are kept as they are.
        weight_copies: Least precise codec for a saved tensor shaped like a weight of the
            module saving it (the autocast copy of a frozen weight, PEFT's merged weight of a
            LoRA on a parameter); ``'none'`` keeps it exact.
        seed: Seed of the generator that drives stochastic rounding (the caller's RNG stream
            is left alone, so a run with compression draws the same dropout masks).
        check_finite: Keep tensors holding inf or NaN exact (their group scales would be
            meaningless). It reads one flag per tensor (from the scales) back from the device,
            which on CUDA waits for the tensor to be encoded; ``False`` skips the check (a
            non-finite value then decodes to NaN, which a ``GradScaler`` reports as it would an
            overflow).
    """

    SHORTHAND: ClassVar[str] = "codec"

    codec: str = "none"
    rules: tuple[CodecRule, ...] = field(default=DEFAULT_RULES)
    group_size: int = 64
    min_numel: int = 1024
    weight_copies: str = "int8"
    seed: int = 0
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(
                f"codec={self.codec!r} is not allowed. Allowed: {', '.join(map(repr, CODECS))}."
            )
        if not isinstance(self.rules, tuple) or not all(isinstance(r, CodecRule) for r in self.rules):
            raise ConfigError(
                f"ActivationOptions.rules={self.rules!r} is not allowed: give a tuple of CodecRule."
            )
        check_group_size(self.group_size, "ActivationOptions.group_size")
        if not isinstance(self.min_numel, int) or isinstance(self.min_numel, bool) or self.min_numel < 0:
            raise ConfigError(
                f"ActivationOptions.min_numel={self.min_numel!r} is not allowed: give an int >= 0."
            )
        if self.weight_copies not in CODECS:
            raise ConfigError(
                f"ActivationOptions.weight_copies={self.weight_copies!r} is not allowed. "
                f"Allowed: {', '.join(map(repr, CODECS))}."
            )

    @classmethod
    def _field_from_plain(cls, name: str, value: Any) -> Any:
        if name == "rules" and isinstance(value, (list, tuple)):
            return tuple(CodecRule(**r) if isinstance(r, Mapping) else r for r in value)
        return super()._field_from_plain(name, value)

    def _field_to_plain(self, name: str, value: Any) -> Any:
        if name == "rules":
            return [
                {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(rule).items()}
                for rule in value
            ]
        return super()._field_to_plain(name, value)

    def rule_for(self, name: str, module_type: type) -> CodecRule | None:
        """The first rule matching module ``name`` of type ``module_type``, or ``None``."""
        return next((r for r in self.rules if r.matches(name, module_type)), None)

    def codec_for(self, name: str, module_type: type, codec: str) -> str:
        """The codec for tensors saved in module ``name`` when the config asks for ``codec``."""
        rule = self.rule_for(name, module_type)
        return codec if rule is None else more_precise(codec, rule.codec)
