"""OOM recovery for the Hugging Face ``Trainer`` (hosted by ``CiuicCallback`` with a ``budget``).

``Trainer.training_step(model, inputs, num_items_in_batch)`` runs forward and backward of one
batch; :class:`RecoveringTrainingStep` (set on the ``Trainer`` instance in place of it) runs
it through :class:`ciuic.recovery.Recovery`: the same ``inputs`` again after an out-of-memory
error and, at a micro-batch rung, once per part of ``inputs`` with the *same*
``num_items_in_batch``, so that each part's loss is its token losses' sum over the batch's (or
the accumulation window's) valid tokens and the parts' gradients add up to the batch's. The
returned loss is the parts' sum, the batch's loss. The ``Trainer`` then steps the optimizer once
per accumulation window, as without recovery.
"""

from __future__ import annotations

from typing import Any

import torch

from ciuic import CiuicHandle
from ciuic.errors import ConfigError
from ciuic.recovery import MicroBatch, Recovery


class RecoveringTrainingStep:
    """``trainer.training_step`` in the model's step scope, retried on OOM (module docstring)."""

    def __init__(self, training_step: Any, handle: CiuicHandle, trainer: Any) -> None:
        self.training_step = training_step
        self.handle = handle
        self.trainer = trainer
        self.recovery = Recovery(handle)

    def __call__(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        def step(micro: MicroBatch) -> torch.Tensor:
            if micro.count > 1 and num_items_in_batch is None:
                raise ConfigError(_NO_NUM_ITEMS)
            with self.handle.step_scope(micro.batch):
                loss: torch.Tensor = self.training_step(model, micro.batch, num_items_in_batch)
                return loss

        losses = self.recovery.run(step, inputs, optimizer=self.trainer.optimizer)
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


_NO_NUM_ITEMS = (
    "OOM recovery cannot split this batch into micro-batches: the Trainer passed no "
    "num_items_in_batch, so each part's loss would be a mean over the part and the batch's loss "
    "would change. Use a model whose forward takes **kwargs (transformers' causal LMs do) or a "
    "compute_loss that takes num_items_in_batch, or budget=None to turn recovery off."
)
