"""OOM recovery for Lightning's automatic optimization (hosted by the Ciuic strategies).

Lightning runs ``training_step`` and ``backward`` inside the closure it hands to
``optimizer.step(closure)``, which reaches ``Strategy.optimizer_step``. There the strategy
replaces the closure by :class:`RecoveringClosure`, which runs Lightning's own pieces of it
(the closure's ``zero_grad``, ``training_step`` and ``backward`` functions, in that order)
through :class:`ciuic.recovery.Recovery`: the same batch again after an out-of-memory error,
and, at a micro-batch rung, ``training_step`` once per micro-batch (the strategy hands it the
part, see ``CiuicStrategyMixin.training_step``) with each loss scaled by its share of the
batch's valid tokens before its backward. The optimizer then steps once, as without recovery.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult

from ciuic.errors import ConfigError
from ciuic.recovery import MicroBatch, Recovery


class RecoveringClosure:
    """The closure ``optimizer.step`` runs, with retries (see the module docstring)."""

    def __init__(self, closure: Any, recovery: Recovery, strategy: Any, optimizer: Any) -> None:
        self.closure = closure
        self.recovery = recovery
        self.strategy = strategy
        self.optimizer = optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = self.strategy.ciuic_batch
        if not isinstance(self.closure, Closure):  # a LightningModule.optimizer_step of its own
            return self.recovery.run(self._whole, batch, optimizer=self.optimizer)[0]
        closure = self.closure
        if closure._zero_grad_fn is not None:
            closure._zero_grad_fn()  # before the first attempt, so a retry starts from the same grads
        results = self.recovery.run(self._part, batch, optimizer=self.optimizer)
        closure._result = _combined(results)
        return closure._result.loss

    def _whole(self, micro: MicroBatch) -> Any:
        if micro.count > 1:
            raise ConfigError(
                "OOM recovery cannot split the batch into micro-batches: the LightningModule's "
                "optimizer_step passes the optimizer a closure of its own. Use Lightning's "
                "optimizer_step, or budget=None to turn recovery off."
            )
        return self.closure()

    def _part(self, micro: MicroBatch) -> tuple[ClosureResult, float]:
        closure = self.closure
        with self.strategy.ciuic_micro_batch(micro.batch if micro.count > 1 else None):
            result = closure._step_fn()
        loss = result.closure_loss
        if loss is not None and closure._backward_fn is not None:
            closure._backward_fn(loss * micro.weight if micro.count > 1 else loss)
        return result, micro.weight


def _combined(results: list[tuple[ClosureResult, float]]) -> ClosureResult:
    """One ``ClosureResult`` for the batch: the micro-batch losses weighted into the batch's."""
    if len(results) == 1:
        return results[0][0]
    losses = [r.loss * w for r, w in results if r.loss is not None]
    total = sum(losses[1:], losses[0]) if losses else None
    return ClosureResult(total, extra=results[-1][0].extra)
