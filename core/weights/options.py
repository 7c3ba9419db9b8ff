"""`WeightOptions`: what ``weights=`` does to the frozen weights of a model.

The config field ``weights`` takes a format string (``weights="nf4"`` is
``WeightOptions(format="nf4")``), a mapping of these fields (``weights={"format": "nf4",
"prune": "2:4"}``, as YAML writes it) or a ``WeightOptions``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ciuic.errors import ConfigError
from ciuic.options import TechniqueOptions

FORMATS = ("none", "int8", "nf4", "fp4")
"""Storage formats: ``'none'`` (dense, e.g. for pruning alone), LLM.int8, and the two 4-bit ones."""

TABLE_FORMATS = ("none", "int8", "nf4")
"""Storage formats of ``head`` and ``embeddings``: dense, block-wise 8-bit, block-wise NF4."""

PRUNE_PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True, kw_only=True, eq=False)
class WeightOptions(TechniqueOptions):
    """Options of the frozen-weight conversion, validated at construction.

    Args:
        format: ``'nf4'`` or ``'fp4'`` (4-bit, QLoRA), ``'int8'`` (LLM.int8 for linears,
            block-wise 8-bit for fused experts) or ``'none'`` (keep dense; only with ``prune``).
        double_quant: Quantize the 4-bit block scales again (QLoRA's double quantization),
            for ``nn.Linear`` layers; saves about 0.37 bit per weight.
        quantize_head: Deprecated alias of ``head='int8'`` (kept so existing calls work;
            ``True`` with another ``head`` is refused).
        head: Storage of a frozen ``lm_head``: ``'none'`` (dense, the default: the head sees
            every token's logits and is the layer most sensitive to quantization noise),
            ``'int8'`` (block-wise 8-bit, 8.125 bits per weight) or ``'nf4'`` (4.5 bits). See
            :class:`ciuic.weights.tables.QuantizedHead`.
        embeddings: Storage of the frozen input embeddings, same values as ``head``; a lookup
            dequantizes only the looked-up rows. A head tied to the embeddings
            (``tie_word_embeddings``) is converted only when both are set to the same format,
            and then shares one stored table.
        freeze: Module-name prefixes whose parameters are frozen (``requires_grad=False``)
            before converting, which is what lets a full-fine-tuning model be quantized.
        skip: Module-name prefixes left dense in any case.
        prune: ``None``; an ``'N:M'`` pattern such as ``'2:4'`` (keep the N largest-magnitude
            weights of every M consecutive inputs); or a float in ``(0, 1)``, the fraction of each
            weight to zero by magnitude. Pruned weights are stored as packed kept values plus a
            bit mask (the values quantized too when ``format`` is 4-bit or int8).

    ``format='none'`` with ``prune=None`` is the technique switched off (the config's default).

    Example:
        >>> from ciuic.weights import WeightOptions
        >>> WeightOptions(format="nf4", prune="2:4").prune
        '2:4'
        >>> WeightOptions(format="nf4", prune="2:4").to_value()
        {'format': 'nf4', 'prune': '2:4'}
    """

    SHORTHAND: ClassVar[str] = "format"

    format: str = "nf4"
    double_quant: bool = False
    quantize_head: bool = False
    head: str = "none"
    embeddings: str = "none"
    freeze: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    prune: str | float | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            allowed = ", ".join(map(repr, FORMATS))
            raise ConfigError(f"format={self.format!r} is not allowed. Allowed: {allowed}.")
        for name in ("double_quant", "quantize_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed. Allowed: True or False.")
        for name in ("freeze", "skip"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(item, str) for item in value):
                raise ConfigError(
                    f"{name}={value!r} is not allowed. Allowed: a tuple of module-name prefixes, "
                    f"e.g. ('model.layers',)."
                )
            object.__setattr__(self, name, tuple(value))
        self._check_tables()
        self._check_prune()

    def _check_tables(self) -> None:
        allowed = ", ".join(map(repr, TABLE_FORMATS))
        for name in ("head", "embeddings"):
            if getattr(self, name) not in TABLE_FORMATS:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed. Allowed: {allowed}.")
        if self.quantize_head and self.head == "none":
            object.__setattr__(self, "head", "int8")
        elif self.quantize_head and self.head != "int8":
            raise ConfigError(
                f"quantize_head=True (an alias of head='int8') contradicts head={self.head!r}. "
                f"Allowed: head={self.head!r} alone (quantize_head is deprecated)."
            )

    def _check_prune(self) -> None:
        prune = self.prune
        if prune is None:
            return
        if isinstance(prune, str):
            match = PRUNE_PATTERN.match(prune)
            if match and 0 < int(match[1]) < int(match[2]) <= 32:
                return
        elif isinstance(prune, float) and 0.0 < prune < 1.0:
            return
        raise ConfigError(
            f"prune={prune!r} is not allowed. Allowed: None, an 'N:M' pattern with 0 < N < M <= 32 "
            f"(e.g. '2:4'), or a float sparsity in (0, 1) (e.g. 0.5)."
        )

    @property
    def enabled(self) -> bool:
        """Whether anything is converted (a format, pruning, or the head/embedding tables)."""
        tables = self.head != "none" or self.embeddings != "none"
        return self.format != "none" or self.prune is not None or tables

    @property
    def quantized(self) -> bool:
        """Whether weights are stored in a bitsandbytes format (not only pruned)."""
        return self.format != "none"
