"""Everything ``CiuicCallback`` does to the ``Trainer`` object itself, in one place.

A ``TrainerCallback`` receives the arguments, the state and the model, never the ``Trainer``,
and no callback event surrounds a micro-batch's forward *and* backward (``on_step_begin`` /
``on_step_end`` span a whole accumulation window and the optimizer step, and are skipped when a
step raises). So in ``on_init_end``, which the ``Trainer`` constructor calls, the callback finds
that ``Trainer`` on the call stack (:func:`calling_trainer`) and :class:`TrainerHooks` sets, on
that instance only (the class is untouched):

- ``optimizer_cls_and_kwargs``, the constructor's own argument, when the user gave neither it
  nor ``optimizers`` (see :mod:`ciuic_hf.optimizer`);
- ``training_step``: the ``Trainer``'s (or the subclass's) bound method wrapped in the model's
  ``ciuic`` step scope, so forward and backward of each micro-batch run inside it; with a
  ``budget`` in the config, also retried on out-of-memory errors
  (:class:`ciuic_hf.recovery.RecoveringTrainingStep`);
- ``train``: wrapped to note the checkpoint it resumes from (``on_train_begin`` restores the
  technique states saved beside it) and to run the memory meter around the run when asked.

``TrainerHooks.remove()`` takes the three back.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

from ciuic import CiuicHandle
from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError

from .optimizer import CiuicOptimizer, asks_for_ciuic_optimizer, optimizer_cls_and_kwargs
from .recovery import RecoveringTrainingStep

_STACK_DEPTH = 16
"""How many frames above the callback to look for the ``Trainer`` whose constructor runs."""


def calling_trainer() -> Any | None:
    """The ``transformers.Trainer`` whose ``__init__`` is running on this thread, or ``None``."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(_STACK_DEPTH):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if frame.f_code.co_name == "__init__" and isinstance(candidate, Trainer):
                return candidate
        return None
    finally:
        del frame


class ScopedTrainingStep:
    """``trainer.training_step`` run inside the model's step scope (forward and backward)."""

    def __init__(self, training_step: Any, handle: CiuicHandle) -> None:
        self.training_step = training_step
        self.handle = handle

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")  # training_step(model, inputs, ...)
        with self.handle.step_scope(inputs):
            return self.training_step(*args, **kwargs)


class NotingTrain:
    """``trainer.train`` that notes the checkpoint it resumes from and runs in ``context``."""

    def __init__(self, train: Any, hooks: TrainerHooks) -> None:
        self.train = train
        self.hooks = hooks
        self.signature = inspect.signature(train)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        self.hooks.resume_dir = _checkpoint_dir(bound.arguments.get("resume_from_checkpoint"), self.hooks)
        with self.hooks.context():
            return self.train(*args, **kwargs)


def _checkpoint_dir(resume: Any, hooks: TrainerHooks) -> str | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        last: str | None = get_last_checkpoint(hooks.trainer.args.output_dir)  # type: ignore[no-untyped-call]
        return last  # None: the Trainer raises its own error
    return str(os.fspath(resume))


def _check_given_route(given: Any, config: CiuicConfig) -> None:
    """Refuse a ``Trainer(optimizer_cls_and_kwargs=...)`` that builds another optimizer than ``config``'s."""
    cls, kwargs = given
    if cls is CiuicOptimizer:
        if kwargs.get("config") != config:
            raise ConfigError(
                "Trainer(optimizer_cls_and_kwargs=ciuic_hf.optimizer_cls_and_kwargs(...)) got another config "
                "than CiuicCallback: give both the same one (or drop optimizer_cls_and_kwargs: the "
                "callback sets it)."
            )
        return
    asks = asks_for_ciuic_optimizer(config)
    if asks:
        name = getattr(cls, "__name__", cls)
        raise ConfigError(
            f"Trainer(optimizer_cls_and_kwargs=({name}, ...)) builds another optimizer than the config "
            f"asks for ({', '.join(asks)}): drop it (CiuicCallback sets the route), or set "
            f"optimizer='adamw', step_in_backward=False and no 'optimizer' offload."
        )


def _check_recoverable(args: Any) -> None:
    if args.world_size > 1:
        raise ConfigError(
            f"budget= turns on OOM recovery, which escalates each process on its own: with "
            f"world_size={args.world_size} the processes would train under different configs (and "
            f"wait on each other's gradients). Run one process, or budget=None."
        )


class TrainerHooks:
    """What the callback set on one ``Trainer`` instance (see the module docstring)."""

    def __init__(self, trainer: Any, handle: CiuicHandle, context: Any) -> None:
        self.trainer = trainer
        self.handle = handle
        self.context = context
        self.resume_dir: str | None = None
        self.set_optimizer = False

    def install(self) -> TrainerHooks:
        """Set the optimizer route, the step scope and the ``train`` wrapper on the trainer."""
        trainer = self.trainer
        config = self.handle.config
        given = trainer.optimizer_cls_and_kwargs
        if given is not None:
            _check_given_route(given, config)
        elif trainer.optimizer is None and asks_for_ciuic_optimizer(config):
            trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(config, trainer.args)
            self.set_optimizer = True
        if config.budget is not None:
            _check_recoverable(trainer.args)
            trainer.training_step = RecoveringTrainingStep(trainer.training_step, self.handle, trainer)
        else:
            trainer.training_step = ScopedTrainingStep(trainer.training_step, self.handle)
        trainer.train = NotingTrain(trainer.train, self)
        return self

    def remove(self) -> None:
        """Give the trainer back its own ``training_step``, ``train`` and optimizer argument."""
        kinds = (("training_step", (ScopedTrainingStep, RecoveringTrainingStep)), ("train", NotingTrain))
        for name, kind in kinds:
            if isinstance(self.trainer.__dict__.get(name), kind):
                del self.trainer.__dict__[name]
        if self.set_optimizer:
            self.trainer.optimizer_cls_and_kwargs = None
            self.set_optimizer = False

    @property
    def recovery(self) -> Any:
        """The run's :class:`ciuic.recovery.Recovery` (with a ``budget``), else ``None``."""
        step = self.trainer.__dict__.get("training_step")
        return step.recovery if isinstance(step, RecoveringTrainingStep) else None

    def first(self, callback: Any) -> None:
        """Move ``callback`` first among the trainer's callbacks, so that what it adds to the logs
        in ``on_log`` reaches the ``report_to`` loggers and the progress bar too."""
        callbacks = self.trainer.callback_handler.callbacks
        with contextlib.suppress(ValueError):
            callbacks.remove(callback)
            callbacks.insert(0, callback)

    def show_on_progress_bar(self, text: str) -> None:
        """Show ``text`` after the step counter of the ``Trainer``'s progress bar (if it has one)."""
        for callback in self.trainer.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None and hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(text)
