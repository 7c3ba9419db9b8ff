"""One intra-op thread for the pricing tests (``tests.models.one_thread``): the tiny models gain
nothing from more, and the real and fake runs then reduce in the same order."""

from tests.models import one_thread

__all__ = ["one_thread"]
