"""Planning memory: which config to run, and in which order to escalate when a step does not fit.

- :mod:`ciuic.planner.escalation`: the escalation ladder (:func:`escalations`) that OOM
  recovery (:mod:`ciuic.recovery`) walks.
"""

from .escalation import Rung, escalations

__all__ = ["Rung", "escalations"]
