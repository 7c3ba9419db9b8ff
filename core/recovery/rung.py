"""`Rung`: one step of the recovery's ladder, a config and a micro-batch count.

The order is the planner's (:func:`ciuic.planner.escalate.escalations`, then
:func:`ciuic.planner.escalate.micro_batch_counts`); :func:`default_ladder` only pairs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError
from ciuic.planner.escalate import escalations, micro_batch_counts


@dataclass(frozen=True)
class Rung:
    """A config, and into how many micro-batches each batch is split.

    Example:
        >>> from ciuic import CiuicConfig
        >>> str(Rung(CiuicConfig(checkpointing="full"), micro_batches=2))
        "checkpointing='full', micro_batches=2"
    """

    config: CiuicConfig
    micro_batches: int = 1

    def __post_init__(self) -> None:
        count = self.micro_batches
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"Rung.micro_batches={count!r} is not allowed: give an int >= 1.")

    def __str__(self) -> str:
        fields = [f"{k}={_plain(v)!r}" for k, v in self.config.requested().items() if k != "budget"]
        if self.micro_batches > 1:
            fields.append(f"micro_batches={self.micro_batches}")
        return ", ".join(fields) or "all techniques off"


def default_ladder(config: CiuicConfig, rows: int) -> list[Rung]:
    """The rungs after ``config`` for a batch of ``rows``: the planner's configs, then its
    micro-batch counts on the last of them.

    Example:
        >>> from ciuic import CiuicConfig
        >>> last = CiuicConfig(loss="chunked", activations="int4", checkpointing="full",
        ...                    offload={"activations"})
        >>> [str(rung).split(", ")[-1] for rung in default_ladder(last, 4)]
        ['micro_batches=2', 'micro_batches=4']
    """
    configs = escalations(config)
    last = configs[-1] if configs else config
    return [*map(Rung, configs), *(Rung(last, k) for k in micro_batch_counts(rows))]


def _plain(value: object) -> object:
    to_value = getattr(value, "to_value", None)
    if callable(to_value):
        return to_value()
    return sorted(value) if isinstance(value, frozenset) else value
