"""The planner's search space: one rank per technique, higher is more compressed.

A :class:`Knobs` is a point of the grid the planner searches; :meth:`Knobs.config` turns it
into the :class:`ciuic.CiuicConfig` a user passes to ``apply_``. Ranks make *dominance*
simple: a config that compresses at least as much in every technique (``a <= b``) should not
peak higher, so when ``b`` does not fit, neither does ``a``.

>>> Knobs(weights=1, checkpointing=1).config().to_dict()["checkpointing"]
'full'
>>> Knobs().dominated_by(Knobs(loss=1))
True
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ciuic.config import CiuicConfig

WEIGHTS: tuple[Any, ...] = ("none", "nf4", {"format": "nf4", "head": "int8", "embeddings": "int8"})
LOSS = ("standard", "chunked")
CODECS = ("none", "int8", "int4")
CHECKPOINTING: tuple[Any, ...] = ("none", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")

LEVELS = {
    "weights": len(WEIGHTS),
    "loss": len(LOSS),
    "codec": len(CODECS),
    "checkpointing": len(CHECKPOINTING),
    "offload_activations": 2,
    "optimizer": len(OPTIMIZERS),
    "step_in_backward": 2,
    "offload_optimizer": 2,
}
"""How many values each knob takes."""

FIELD_KNOBS: dict[str, tuple[str, ...]] = {
    "weights": ("weights",),
    "activations": ("codec",),
    "loss": ("loss",),
}
"""The knobs of each config field a run can leave to the planner (``"auto"``)."""


@dataclass(frozen=True)
class Knobs:
    """A candidate as ranks: 0 is the technique off, higher is more compressed."""

    weights: int = 0
    loss: int = 0
    codec: int = 0
    checkpointing: int = 0
    offload_activations: int = 0
    optimizer: int = 0
    step_in_backward: int = 0
    offload_optimizer: int = 0

    def ranks(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)

    def dominated_by(self, other: Knobs) -> bool:
        """Whether ``other`` compresses at least as much as ``self`` in every technique."""
        return all(a <= b for a, b in zip(self.ranks(), other.ranks(), strict=True))

    def config(self, **extra: Any) -> CiuicConfig:
        """The config of these ranks (``extra``: other fields, e.g. ``budget``)."""
        offload = {"activations"} if self.offload_activations else set()
        if self.offload_optimizer:
            offload.add("optimizer")
        return CiuicConfig(
            weights=WEIGHTS[self.weights],
            loss=LOSS[self.loss],
            activations=CODECS[self.codec],
            checkpointing=CHECKPOINTING[self.checkpointing],
            offload=offload,
            optimizer=OPTIMIZERS[self.optimizer],
            step_in_backward=bool(self.step_in_backward),
            **extra,
        )

    def label(self) -> str:
        """A short name for tables: the techniques that are on (``'off'`` for none)."""
        parts = [
            ("nf4", "nf4+tables8")[self.weights - 1] if self.weights else "",
            "chunked" if self.loss else "",
            CODECS[self.codec] if self.codec else "",
            f"ckpt={CHECKPOINTING[self.checkpointing]}" if self.checkpointing else "",
            "offload-act" if self.offload_activations else "",
            f"opt{OPTIMIZERS[self.optimizer].removeprefix('adamw')}" if self.optimizer else "",
            "sib" if self.step_in_backward else "",
            "offload-opt" if self.offload_optimizer else "",
        ]
        return " ".join(p for p in parts if p) or "off"


def grid(*, quantize_weights: bool) -> Iterator[Knobs]:
    """Every point of the search space (``quantize_weights=False``: weights stay as they are,
    e.g. for full fine-tuning, where no weight is frozen)."""
    levels = dict(LEVELS, weights=LEVELS["weights"] if quantize_weights else 1)
    for ranks in itertools.product(*(range(n) for n in levels.values())):
        yield Knobs(*ranks)


def knobs_of(config: CiuicConfig) -> Knobs:
    """The grid point nearest to ``config``, for its cost (options the grid lacks map to the rank
    whose cost is alike: ``fp8`` to ``int8``, ``int2`` to ``int4``, any weight format to NF4,
    checkpointing every N-th block or ``'auto'`` to every block: an upper bound of their cost)."""
    weights = config.weights
    tables = weights.head != "none" or weights.embeddings != "none" or weights.quantize_head
    codec = config.activations.codec
    every = config.checkpointing
    return Knobs(
        weights=(2 if tables else 1) if weights.enabled else 0,
        loss=int(config.loss.kind == "chunked"),
        codec={"none": 0, "fp8": 1, "int8": 1}.get(codec, 2),
        checkpointing=0 if every == "none" else 1,
        offload_activations=int("activations" in config.offload),
        optimizer=OPTIMIZERS.index(config.optimizer),
        step_in_backward=int(config.step_in_backward),
        offload_optimizer=int("optimizer" in config.offload),
    )
