"""The planner: what a config costs in memory, found by running the training step on fake
tensors (:func:`price`)."""

from .build import build_model, fake_model, materialize_
from .pricing import Pricing, price

__all__ = ["Pricing", "build_model", "fake_model", "materialize_", "price"]
