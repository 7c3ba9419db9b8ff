"""`CiuicCallback`: a Hugging Face ``Trainer`` fine-tuning script gains ciuic's techniques by
adding ``callbacks=[CiuicCallback("balanced")]`` to its ``Trainer(...)``.

What happens when (the ``Trainer`` events it uses):

- ``on_init_end`` (the end of ``Trainer.__init__``: the model is on its device, no optimizer
  exists, no checkpoint is loaded yet): refuses the ``TrainingArguments`` the config cannot
  work with, runs ``ciuic.apply_(model, config)`` on the model the ``Trainer`` holds (the PEFT
  model), and sets on that ``Trainer`` the optimizer route, the step scope and the ``train``
  wrapper (:mod:`ciuic_hf.trainer`);
- ``on_train_begin`` (optimizer built, checkpoint loaded): checks that the optimizer is the one
  the config asks for and that the arguments do not defeat it, and restores the technique states
  of the checkpoint it resumes from (:mod:`ciuic_hf.state`);
- ``on_save``: writes the technique states into the checkpoint folder;
- ``on_log``: adds the peak memory (and its breakdown, with ``memory="meter"``) to the logs;
- ``on_train_end``: logs the OOM recovery's escalations and the config the run ended with
  (with a ``budget``: :mod:`ciuic_hf.recovery`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.utils import logging

import ciuic
from ciuic import CiuicHandle
from ciuic.config import CiuicConfig
from ciuic.errors import ApplyError, ConfigError
from ciuic.units import format_bytes
from ciuic.weights.experts import ignore_placeholders_in_ddp

from .checks import check_trainer_optimizer, check_training_args
from .memory import PEAK_KEY, PeakMemory
from .optimizer import as_config
from .state import load_states, save_states
from .trainer import TrainerHooks, calling_trainer

logger = logging.get_logger(__name__)


class CiuicCallback(TrainerCallback):
    """Apply a ciuic config to the model a ``transformers.Trainer`` trains.

    Args:
        config: A :class:`ciuic.CiuicConfig`, a preset name (``"balanced"``, ``"max"``...) or a
            dict of fields; ``None``: the config of a model already applied with
            ``ciuic.apply_``, else the fields given as keywords.
        memory: What to add to the logs: ``"auto"`` (the CUDA peak on a GPU, nothing on CPU),
            ``"peak"``, ``"meter"`` (exact bytes per category from a ``ciuic.MemoryMeter``
            around ``train``; slows the step down) or ``"off"``.
        **fields: Config fields, on top of ``config`` (``CiuicCallback("max", budget="24GiB")``).

    The ``Trainer`` builds the optimizer the config asks for with the ``TrainingArguments``'s
    ``learning_rate``, ``weight_decay``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon`` and
    scheduler, and ``gradient_accumulation_steps`` for ``step_in_backward``. An optimizer given
    as ``Trainer(optimizers=(optimizer, scheduler))`` is kept, and checked to be the one asked for.

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> from ciuic_hf import CiuicCallback
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,  # doctest: +SKIP
        ...                   callbacks=[CiuicCallback("balanced")])
    """

    def __init__(
        self,
        config: CiuicConfig | str | Mapping[str, Any] | None = None,
        *,
        memory: str = "auto",
        **fields: Any,
    ) -> None:
        self.config: CiuicConfig | None = (
            None if config is None and not fields else as_config(config, **fields)
        )
        self.memory_mode = memory
        PeakMemory(memory, _cpu())  # validates memory= now
        self.handle: CiuicHandle | None = None
        self.applied_here = False
        self.hooks: TrainerHooks | None = None
        self.memory: PeakMemory | None = None

    # -- Trainer events ---------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Check the arguments, apply the config to ``model``, set the optimizer route."""
        if model is None:
            raise ApplyError("CiuicCallback got no model in on_init_end: pass model= to the Trainer.")
        trainer = calling_trainer()
        if trainer is not None and trainer.model_init is not None:
            raise ConfigError(
                "Trainer(model_init=...) re-creates the model in train(), after CiuicCallback converted "
                "this one: build the model and pass Trainer(model=...) instead."
            )
        config = self._resolve(model)
        existing = self._existing(model, config)
        check_training_args(config, args)
        before = _trainable(model)
        self.handle = existing if existing is not None else ciuic.apply_(model, config)
        self.applied_here = existing is None
        ignore_placeholders_in_ddp(model)  # the model accelerate wraps (also if applied before PEFT)
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            _check_holds_new_trainable(optimizer, model, before)
            check_trainer_optimizer(config, args, optimizer)
        self.memory = PeakMemory(self.memory_mode, args.device)
        if trainer is not None:
            self.hooks = TrainerHooks(trainer, self.handle, self._measuring).install()
            self.hooks.first(self)
        elif optimizer is None:
            logger.warning(
                "CiuicCallback could not find the Trainer being built: it cannot choose the optimizer or "
                "wrap the training step; pass "
                "optimizer_cls_and_kwargs=ciuic_hf.optimizer_cls_and_kwargs(config, args)."
            )
        if args.should_log:
            logger.info(self.handle.report())

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Check the optimizer the ``Trainer`` built; restore the technique states when resuming."""
        if self.handle is None:
            raise ApplyError(
                "CiuicCallback was added after the Trainer was built (trainer.add_callback?): it must "
                "convert the model before the Trainer builds the optimizer. Pass it to the constructor: "
                "Trainer(..., callbacks=[CiuicCallback(...)])."
            )
        check_trainer_optimizer(self.handle.config, args, kwargs.get("optimizer"))
        folder = self._resume_dir(args, state)
        if folder is None or load_states(self.handle, folder, args.process_index):
            return
        if self.handle.technique_states():
            warnings.warn(
                f"ciuic: the checkpoint {folder} has no ciuic technique states (saved without "
                f"CiuicCallback?): the run continues, but not bitwise as it would have.",
                UserWarning,
                stacklevel=2,
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the technique states into the checkpoint the ``Trainer`` just saved."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.handle is not None and os.path.isdir(folder):
            save_states(self.handle, folder, args.process_index)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Add the peak memory beside the training loss (logs, ``report_to`` loggers, progress bar)."""
        if self.memory is None or logs is None or not ({"loss", "train_loss"} & set(logs)):
            return
        entries = self.memory.entries()
        if not entries:
            return
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
        if self.hooks is not None:
            self.hooks.show_on_progress_bar(f"peak {format_bytes(entries[PEAK_KEY])}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Log what OOM recovery changed (with a ``budget``), and the config the run ended with."""
        recovery = self.recovery
        if recovery is not None and recovery.escalations and args.should_log:
            logger.warning(recovery.report())

    @property
    def recovery(self) -> Any:
        """The run's :class:`ciuic.recovery.Recovery` (``CiuicConfig(budget=...)``), else ``None``."""
        return None if self.hooks is None else self.hooks.recovery

    # -- helpers ----------------------------------------------------------------------------
    def detach(self) -> None:
        """Give the ``Trainer`` back its own ``training_step``, ``train`` and optimizer argument
        (the model stays converted: ``ciuic.remove_(model)`` undoes that)."""
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    def _resolve(self, model: Any) -> CiuicConfig:
        existing = ciuic.handle_of(model)
        if self.config is None:
            self.config = existing.config if existing is not None else CiuicConfig()
        return self.config

    def _existing(self, model: Any, config: CiuicConfig) -> CiuicHandle | None:
        """The handle of a model already converted with ``config``; refuses another config."""
        existing = ciuic.handle_of(model)
        if existing is not None and existing.config != config:
            raise ApplyError(
                f"the model was already converted by ciuic.apply_ with another config "
                f"({', '.join(existing.config.differs(config))} differ): give CiuicCallback the same "
                f"config (or none: CiuicCallback() uses the model's), or call ciuic.remove_(model) first."
            )
        return existing

    def _measuring(self) -> Any:
        assert self.memory is not None and self.hooks is not None
        return self.memory.measuring(self.hooks.trainer.model)

    def _resume_dir(self, args: Any, state: Any) -> str | None:
        if self.hooks is not None:
            return self.hooks.resume_dir
        if state.global_step > 0:  # no trainer found: the checkpoint's usual place
            return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return None


def _trainable(model: Any) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def _check_holds_new_trainable(optimizer: Any, model: Any, before: set[int]) -> None:
    """Refuse an optimizer built before ``apply_`` replaced some of the trainable parameters."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in before and id(p) not in held
    ]
    if missing:
        raise ConfigError(
            f"the optimizer passed as Trainer(optimizers=...) does not hold {len(missing)} trainable "
            f"parameter(s) of the converted model (first: {missing[0]}): build it after "
            f"ciuic.apply_(model, config) and pass CiuicCallback() (which then keeps the model's config), "
            f"or let the Trainer build it."
        )


def _cpu() -> Any:
    import torch

    return torch.device("cpu")
