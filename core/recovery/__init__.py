"""Out-of-memory recovery: retry a training step under an escalated config, losing no sample.

- :class:`Recovery`: what the adapters host (``Recovery(handle).run(step, batch)``);
- :func:`split_batch`, :class:`MicroBatch`: micro-batches whose losses add up to the batch's;
- :func:`budget_guard`: how ``CiuicConfig(budget=...)`` is enforced during a step.
"""

from .batch import MicroBatch, batch_size, split_batch
from .guard import budget_guard
from .recovery import Escalation, Recovery
from .release import GradSnapshot, release
from .rung import Rung, default_ladder

__all__ = [
    "Escalation",
    "GradSnapshot",
    "MicroBatch",
    "Recovery",
    "Rung",
    "batch_size",
    "budget_guard",
    "default_ladder",
    "release",
    "split_batch",
]
