"""The escalation ladder: from a config, the ever cheaper ones to try after an out-of-memory step.

The order follows what each rung costs in training: first more compression of the activations
saved for backward (``'none'`` -> ``'int8'`` -> ``'int4'``; lossy, but the forward pass stays
exact and the gradient error is small, see :mod:`ciuic.activations.options`), then more
activation checkpointing (every block recomputed: lossless, about one more forward pass), then
splitting each batch into 2, 4, 8 micro-batches with gradient accumulation (lossless up to the
order of summation, but the step runs that many times as many smaller kernels).

Only what :meth:`ciuic.CiuicHandle.update` can change on a live model is on the ladder: never
the weights' format (a re-quantization would change the model being trained) nor the
optimizer's fields (its states would have to be rebuilt).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError

COMPRESSION = ("none", "int8", "int4")
"""Activation codecs in escalation order; a codec not listed (``fp8``, ``int2``) is left as it is."""

MAX_MICRO_BATCHES = 8
"""The default last rung: each batch in 8 micro-batches."""


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: a config, and into how many micro-batches each batch is split.

    Example:
        >>> from ciuic import CiuicConfig
        >>> str(Rung(CiuicConfig(checkpointing="full"), micro_batches=2))
        "checkpointing='full', micro_batches=2"
    """

    config: CiuicConfig
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if not _positive_int(self.micro_batches):
            raise ConfigError(f"Rung.micro_batches={self.micro_batches!r} is not allowed: give an int >= 1.")

    def __str__(self) -> str:
        fields = [f"{k}={_plain(v)!r}" for k, v in self.config.requested().items() if k != "budget"]
        if self.micro_batches > 1:
            fields.append(f"micro_batches={self.micro_batches}")
        return ", ".join(fields) or "all techniques off"


def escalations(config: CiuicConfig, *, max_micro_batches: int = MAX_MICRO_BATCHES) -> list[Rung]:
    """The rungs to try after ``config`` ran out of memory, cheapest in training cost first.

    Args:
        config: The config the run started with (it is not in the result).
        max_micro_batches: The most micro-batches a batch is split into (a power of two).

    Example:
        >>> from ciuic import CiuicConfig
        >>> for rung in escalations(CiuicConfig(activations="int4"), max_micro_batches=2):
        ...     print(rung)
        activations='int4', checkpointing='full'
        activations='int4', checkpointing='full', micro_batches=2
    """
    if not _positive_int(max_micro_batches):
        raise ConfigError(f"max_micro_batches={max_micro_batches!r} is not allowed: give an int >= 1.")
    configs = [*_more_compression(config)]
    configs += _more_checkpointing(configs[-1] if configs else config)
    last = configs[-1] if configs else config
    rungs = [Rung(c) for c in configs]
    n = 2
    while n <= max_micro_batches:
        rungs.append(Rung(last, micro_batches=n))
        n *= 2
    return rungs


def _more_compression(config: CiuicConfig) -> list[CiuicConfig]:
    options = config.activations
    if options.codec not in COMPRESSION:
        return []
    later = COMPRESSION[COMPRESSION.index(options.codec) + 1 :]
    return [config.replace(activations=dataclasses.replace(options, codec=codec)) for codec in later]


def _more_checkpointing(config: CiuicConfig) -> list[CiuicConfig]:
    return [] if config.checkpointing == "full" else [config.replace(checkpointing="full")]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _plain(value: object) -> object:
    to_value = getattr(value, "to_value", None)
    if callable(to_value):
        return to_value()
    return sorted(value) if isinstance(value, frozenset) else value
