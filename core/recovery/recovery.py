"""`Recovery`: run a training step, and when it runs out of memory, escalate and run it again.

The adapters host one :class:`Recovery` per run and hand it each batch with the function that
runs forward and backward on (a part of) it; the logic lives here, framework-free:

1. the step runs under the current rung (config and micro-batch count) of the escalation
   ladder (the planner's order: :func:`ciuic.recovery.rung.default_ladder`), inside the
   budget guard (the meter on CPU, the capped allocator on CUDA: :func:`budget_guard`);
2. ``torch.OutOfMemoryError`` is caught by type (a real one, or the meter's
   :class:`ciuic.errors.BudgetExceededError`), never by its message;
3. what the failed step held is released (:func:`release`: gradients put back as they were
   before the step, a step-in-backward ``CiuicAdamW`` rolled back, the graph collected, the
   CUDA cache emptied), the handle is updated to the next rung (``handle.update``), one line
   is logged, and the *same* batch runs again;
4. past the last rung, :class:`ciuic.errors.NothingFitsError` says what was tried and what
   would fit.

The optimizer is not stepped here: the host steps it once per batch, as it would without
recovery. Later batches keep the rung that fitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ciuic.api import CiuicHandle
from ciuic.errors import ApplyError, BudgetExceededError, NothingFitsError
from ciuic.optim import CiuicAdamW
from ciuic.units import format_bytes

from .batch import MicroBatch, batch_size, split_batch
from .guard import budget_guard
from .release import GradSnapshot, innermost_optimizer, release
from .rung import Rung, default_ladder

logger = logging.getLogger("ciuic.recovery")

Step = Callable[[MicroBatch], Any]
"""Runs forward and backward on one micro-batch (scaling its loss by ``weight``, or normalizing
it by ``num_items``) and returns what the host needs (its detached loss...)."""


@dataclass(frozen=True)
class Escalation:
    """One escalation: the rung that ran out of memory, the one tried next, and why."""

    failed: Rung
    next: Rung
    reason: str
    peak_bytes: int | None


@dataclass(frozen=True)
class _Failure:
    reason: str  # the error's first line
    peak_bytes: int | None


class Recovery:
    """Out-of-memory recovery for one training run (see the module docstring).

    Args:
        handle: The handle of the applied model (``ciuic.apply_``); its config is the first rung
            and its ``budget`` is enforced during each step.
        ladder: The rungs to escalate through, in order; default the planner's order
            (:func:`ciuic.recovery.rung.default_ladder`: its configs after ``handle.config``,
            then micro-batch counts up to the batch's rows).
        device: The device whose memory the budget caps; default the model's.

    Attributes:
        rung: The rung steps now run under.
        tried: Every rung a step ran under, in order (the first is ``handle.config``).
        escalations: What happened at each escalation.
        steps: Batches completed.

    Example:
        >>> import torch, ciuic
        >>> from ciuic.recovery import Recovery
        >>> model = torch.nn.Linear(8, 1)
        >>> recovery = Recovery(ciuic.apply_(model, ciuic.CiuicConfig()))
        >>> out = recovery.run(lambda m: (model(m.batch).sum() * m.weight).backward(), torch.ones(4, 8))
        >>> recovery.steps, str(recovery.rung)
        (1, 'all techniques off')
    """

    def __init__(
        self, handle: CiuicHandle, ladder: Sequence[Rung] | None = None, *, device: torch.device | None = None
    ) -> None:
        if handle.model is None:
            raise ApplyError("Recovery needs the handle returned by ciuic.apply_ (this one has no model).")
        self.handle = handle
        self.ladder = None if ladder is None else list(ladder)
        self.device = device if device is not None else _device_of(handle.model)
        self.rung = Rung(handle.config)
        self.tried: list[Rung] = [self.rung]
        self.escalations: list[Escalation] = []
        self.steps = 0
        self._next = 0

    def run(self, step: Step, batch: Any, *, optimizer: object | None = None) -> list[Any]:
        """Run ``step`` on each micro-batch of ``batch`` at the current rung, escalating on OOM.

        Args:
            step: Forward and backward of one :class:`MicroBatch`.
            batch: The batch (a tensor, or a dict, tuple or list holding tensors).
            optimizer: The optimizer the host steps after this (rolled back on failure when it
                is a step-in-backward ``CiuicAdamW``, and counted against the budget).

        Returns:
            ``step``'s results, one per micro-batch.

        Raises:
            NothingFitsError: the step ran out of memory at the last rung too.
        """
        while True:
            snapshot = GradSnapshot(self.handle.model.parameters())
            outputs, failure = self._attempt(step, batch, optimizer)
            self._follow_plan()
            if failure is None:
                self.steps += 1
                return outputs
            release(snapshot, optimizer, self.device)  # outside the except: its frames are gone
            self._escalate(failure, batch, optimizer)

    def report(self) -> str:
        """The rung the run ends with, and each escalation that led there."""
        lines = [f"ciuic OOM recovery: {len(self.escalations)} escalation(s); running with {self.rung}"]
        lines += [f"  {e.failed} -> {e.next}: {e.reason}" for e in self.escalations]
        return "\n".join([*lines, self.handle.report()])

    def _follow_plan(self) -> None:
        """Fields left to ``"auto"`` are planned inside the first attempt (``step_scope``): the
        rung it ran, and the ladder escalated from, is the planned config."""
        if not self.escalations and self.handle.config != self.rung.config:
            self.rung = dataclasses.replace(self.rung, config=self.handle.config)
            self.tried[-1] = self.rung

    # -- one attempt ----------------------------------------------------------------------------
    def _attempt(self, step: Step, batch: Any, optimizer: object | None) -> tuple[list[Any], _Failure | None]:
        parts = split_batch(batch, self.rung.micro_batches)
        inner = innermost_optimizer(optimizer)
        track = (self.handle.model, *([inner] if isinstance(inner, torch.optim.Optimizer) else []))
        try:
            guard = budget_guard(self.handle.config.budget, self.device, track)
            with _accumulating(inner, len(parts)), guard:
                return [step(part) for part in parts], None
        except torch.OutOfMemoryError as error:
            return [], _Failure(_first_line(error), self._peak(error))

    def _peak(self, error: torch.OutOfMemoryError) -> int | None:
        if isinstance(error, BudgetExceededError):
            return int(error.peak_bytes)
        if self.device.type == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    # -- escalation -----------------------------------------------------------------------------
    def _escalate(self, failure: _Failure, batch: Any, optimizer: object | None) -> None:
        failed, reason, peak = self.rung, failure.reason, failure.peak_bytes
        ladder = self.ladder
        if ladder is None:
            ladder = default_ladder(self.tried[0].config, batch_size(batch))
        while self._next < len(ladder):
            rung = ladder[self._next]
            self._next += 1
            why_not = _cannot_split(rung, batch, optimizer)
            if why_not:
                logger.warning("ciuic: skipping rung %s: %s", rung, why_not)
                continue
            self.handle.update(rung.config)
            self.rung = rung
            self.tried.append(rung)
            self.escalations.append(Escalation(failed, rung, reason, peak))
            logger.warning(
                "ciuic: out of memory under %s (peak %s); retrying the same batch under %s",
                failed,
                _bytes(peak),
                rung,
            )
            return
        raise NothingFitsError(self._nothing_fits(reason, peak))

    def _nothing_fits(self, reason: str, peak: int | None) -> str:
        budget = self.handle.config.budget
        tried = " -> ".join(f"[{rung}]" for rung in self.tried)
        limit = f" over the budget of {format_bytes(budget)}" if budget is not None else ""
        return (
            f"the training step runs out of memory under every config of the escalation ladder; tried "
            f"{tried}. The last one still needed more than {_bytes(peak)}{limit} ({reason}). Nothing in "
            f"the ladder fits: give a budget above {_bytes(peak)}, or lower what every rung holds (shorter "
            f"sequences, quantized weights with weights='nf4', optimizer states offloaded with "
            f"offload={{'optimizer'}})."
        )


def _cannot_split(rung: Rung, batch: Any, optimizer: object | None) -> str:
    """Why ``rung``'s micro-batches cannot run for this batch ('' when they can)."""
    if rung.micro_batches == 1:
        return ""
    rows = batch_size(batch)
    if rung.micro_batches > rows:
        return f"the batch has {rows} row(s), fewer than {rung.micro_batches} micro-batches"
    inner = innermost_optimizer(optimizer)
    if isinstance(inner, CiuicAdamW) and inner.step_in_backward and inner.accumulation_steps != 1:
        return (
            f"CiuicAdamW(step_in_backward=True) already accumulates over {inner.accumulation_steps} "
            f"backward passes: its window cannot be split further"
        )
    return ""


@contextlib.contextmanager
def _accumulating(optimizer: object, parts: int) -> Iterator[None]:
    """A step-in-backward ``CiuicAdamW`` steps after the last of ``parts`` backward passes."""
    if parts == 1 or not (isinstance(optimizer, CiuicAdamW) and optimizer.step_in_backward):
        yield
        return
    optimizer.accumulation_steps = parts
    try:
        yield
    finally:
        optimizer.accumulation_steps = 1


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _bytes(value: int | None) -> str:
    return "an unknown amount" if value is None else format_bytes(value)
