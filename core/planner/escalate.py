"""The planner's escalation order: what to change, step by step, when a step does not fit.

Each step changes one field on top of the previous ones, in this order:

1. more compression of what a step holds (lossy within the codecs' stated tolerances):
   ``loss='chunked'``, then ``activations`` ``'int8'``, then ``'int4'``;
2. more checkpointing (lossless): every 2nd decoder block, then every block (``'full'``);
3. activations offloaded to host memory (lossless);
4. then, outside the config, the batch split into micro-batches with gradient accumulation
   (:func:`micro_batch_counts`).

Fields the escalation never changes, and why: ``weights`` (re-quantizing the frozen base
changes the model being trained), ``optimizer``, ``step_in_backward`` and
``offload={'optimizer'}`` (``handle.update`` defers them to ``build_optimizer``: they cannot
change under a live optimizer), ``budget``. A step the config already meets (``int4`` is
requested, checkpointing is already ``'full'``) is left out, and a config that asks for more
than a step offers is never made less so (``int2`` stays ``int2``).

Example:
    >>> from ciuic import CiuicConfig
    >>> from ciuic.planner import escalations
    >>> steps = escalations(CiuicConfig(loss="chunked", activations="int4"))
    >>> [(c.to_dict()["checkpointing"], c.to_dict()["offload"]) for c in steps]
    [(2, []), ('full', []), ('full', ['activations'])]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ciuic.config import CiuicConfig

CODEC_ORDER = ("none", "fp8", "int8", "int4", "int2")
"""Activation codecs from least to most compressed (fp8 and int8 both store one byte)."""


def _loss(config: CiuicConfig) -> CiuicConfig | None:
    if config.loss.kind == "chunked":
        return None
    return config.replace(loss=dataclasses.replace(config.loss, kind="chunked"))


def _codec(codec: str) -> Callable[[CiuicConfig], CiuicConfig | None]:
    def step(config: CiuicConfig) -> CiuicConfig | None:
        if CODEC_ORDER.index(config.activations.codec) >= CODEC_ORDER.index(codec):
            return None
        return config.replace(activations=dataclasses.replace(config.activations, codec=codec))

    return step


def _every(n: int) -> Callable[[CiuicConfig], CiuicConfig | None]:
    def step(config: CiuicConfig) -> CiuicConfig | None:
        current = config.checkpointing
        if current == "full" or (isinstance(current, int) and current <= n):
            return None
        return config.replace(checkpointing="full" if n == 1 else n)

    return step


def _offload_activations(config: CiuicConfig) -> CiuicConfig | None:
    if "activations" in config.offload:
        return None
    return config.replace(offload=config.offload | {"activations"})


STEPS: tuple[Callable[[CiuicConfig], CiuicConfig | None], ...] = (
    _loss,
    _codec("int8"),
    _codec("int4"),
    _every(2),
    _every(1),
    _offload_activations,
)
"""The config steps of the escalation, in order (each returns ``None`` when already met)."""


def escalations(config: CiuicConfig) -> list[CiuicConfig]:
    """The configs to try after ``config``, in order, each one step beyond the one before.

    Args:
        config: The config of the step that did not fit.

    Returns:
        The escalated configs (possibly empty: ``config`` is already at the end of the order);
        after the last, split the batch (:func:`micro_batch_counts`).

    Example:
        >>> from ciuic import CiuicConfig
        >>> [c.to_dict()["checkpointing"] for c in escalations(CiuicConfig(checkpointing="full"))]
        ['full', 'full', 'full', 'full']
    """
    steps: list[CiuicConfig] = []
    current = config
    for step in STEPS:
        following = step(current)
        if following is not None:
            steps.append(following)
            current = following
    return steps


def micro_batch_counts(batch: int) -> list[int]:
    """Micro-batch counts to try after the last config step: doubling, ending at ``batch``.

    A batch of ``batch`` samples split into ``k`` micro-batches of ``ceil(batch / k)`` or fewer
    samples, their gradients accumulated so that the effective batch and the loss normalization
    stay the same (the caller normalizes by the whole batch's token count).

    >>> micro_batch_counts(8)
    [2, 4, 8]
    >>> micro_batch_counts(6)
    [2, 4, 6]
    >>> micro_batch_counts(1)
    []
    """
    counts: list[int] = []
    k = 2
    while k < batch:
        counts.append(k)
        k *= 2
    return [*counts, batch] if batch > 1 else []
