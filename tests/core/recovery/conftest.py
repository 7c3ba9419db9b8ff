"""The recovery tests train the tiny LoRA model for a few steps on a shared CPU: one intra-op
thread each (``tests.models.one_thread``)."""

from tests.models import one_thread

__all__ = ["one_thread"]
