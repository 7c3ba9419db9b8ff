"""The planner: will a fine-tuning step fit, and with which config?

``ciuic.plan(model_or_shape, seq_len=, batch=, budget=, lora=)`` prices candidate configs by
running the training step of the full-size model on fake tensors (:func:`price`) and returns
the cheapest one, in expected step time (:mod:`ciuic.planner.cost`), whose peak fits the
budget less a margin (:mod:`ciuic.planner.margin`), with the forward under 16-bit autocast by
default (:mod:`ciuic.planner.precision`). :func:`escalations` is the order the OOM recovery
follows; :mod:`ciuic.planner.runtime` plans the fields a run leaves to ``"auto"`` at its first
step.
"""

from ciuic.config import PLANNED

from .build import build_model, fake_model, materialize_
from .escalate import escalations, micro_batch_counts
from .margin import margin_bytes
from .plan_result import Candidate, Plan
from .pricing import Pricing, price
from .recipes import qlora_recipe
from .search import plan
from .shapes import SHAPES, count_parameters, empty_model, load_shape

PLANNED.update(
    weights="the planner picks 'none', 'nf4' or NF4 with 8-bit head and embeddings",
    activations="the planner picks 'none', 'int8' or 'int4'",
    loss="the planner picks 'standard' or 'chunked'",
)

__all__ = [
    "SHAPES",
    "Candidate",
    "Plan",
    "Pricing",
    "build_model",
    "count_parameters",
    "empty_model",
    "escalations",
    "fake_model",
    "load_shape",
    "margin_bytes",
    "materialize_",
    "micro_batch_counts",
    "plan",
    "price",
    "qlora_recipe",
]
