"""``TrainingArguments`` that cannot work with a config, refused before the first step.

Each message names the ``TrainingArguments`` field, its value, and the fix. The optimizer's own
rules (clipping, fp16 scaling and accumulation with ``step_in_backward``) are the core's
:func:`ciuic.optim.check_trainer_settings`; this module adds what only the ``Trainer`` has.
"""

from __future__ import annotations

from typing import Any

from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError
from ciuic.optim import check_trainer_settings

from .optimizer import DEFAULT_OPTIMS, asks_for_ciuic_optimizer, describe, probe, unwrap_optimizer


def checkpointing_field(args: Any) -> str:
    """The ``TrainingArguments`` field that turns the ``Trainer``'s activation checkpointing on:
    ``activation_checkpointing`` (transformers >= 5.x) or ``gradient_checkpointing`` (older)."""
    return (
        "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    )


def check_training_args(config: CiuicConfig, args: Any) -> None:
    """Refuse the ``TrainingArguments`` that ``config`` cannot work with.

    Raises:
        ConfigError: naming the argument, its value and the fix.
    """
    _check_optimizer_args(config, args)
    _check_distributed(config, args)
    _check_checkpointing(config, args)
    _check_compile(config, args)
    _check_trainer_settings(probe(config, args), args, "CiuicConfig(step_in_backward=True)")


def check_trainer_optimizer(config: CiuicConfig, args: Any, optimizer: Any) -> None:
    """Refuse an optimizer the ``Trainer`` ended up with that is not the one ``config`` asks for,
    or that the ``TrainingArguments`` would defeat (checked in ``on_train_begin``)."""
    inner = unwrap_optimizer(optimizer)
    wanted = probe(config, args)
    if asks_for_ciuic_optimizer(config) and describe(inner) != describe(wanted):
        raise ConfigError(
            f"the Trainer's optimizer is {_describe(inner)}, but the config asks for {_describe(wanted)} "
            f"({', '.join(asks_for_ciuic_optimizer(config))}): pass callbacks=[CiuicCallback(...)] to the "
            f"Trainer constructor (it then builds the right one), or "
            f"Trainer(optimizer_cls_and_kwargs=ciuic_hf.optimizer_cls_and_kwargs(config, args)), or "
            f"Trainer(optimizers=(ciuic.build_optimizer(params, config, ...), None))."
        )
    _check_trainer_settings(inner, args, f"the Trainer's {type(inner).__name__}(step_in_backward=True)")


def _check_trainer_settings(optimizer: Any, args: Any, what: str) -> None:
    """The core's rules, one ``TrainingArguments`` field at a time, so the message can name it."""
    neutral = {
        "clip_grad_norm": 0.0,
        "grad_scaler": False,
        "accumulation_steps": getattr(optimizer, "accumulation_steps", 1),
    }
    fields = (
        ("max_grad_norm", "clip_grad_norm", float(args.max_grad_norm or 0.0)),
        ("fp16", "grad_scaler", bool(args.fp16)),
        ("gradient_accumulation_steps", "accumulation_steps", args.gradient_accumulation_steps),
    )
    for field, setting, value in fields:
        try:
            check_trainer_settings(optimizer, **{**neutral, setting: value})
        except ConfigError as error:
            raise ConfigError(
                f"TrainingArguments({field}={getattr(args, field)!r}) cannot work with {what}: {error}"
            ) from None


def _check_optimizer_args(config: CiuicConfig, args: Any) -> None:
    asks = asks_for_ciuic_optimizer(config)
    optim = str(getattr(args.optim, "value", args.optim))
    if asks and optim not in DEFAULT_OPTIMS:
        raise ConfigError(
            f"TrainingArguments(optim={optim!r}) conflicts with the config's optimizer "
            f"({', '.join(f'{key}' for key in asks)}), which the Trainer builds instead: remove optim= "
            f"(or use {DEFAULT_OPTIMS[0]!r}), or keep it and set optimizer='adamw', "
            f"step_in_backward=False and no 'optimizer' offload in the CiuicConfig."
        )
    if asks and getattr(args, "deepspeed", None):
        raise ConfigError(
            f"TrainingArguments(deepspeed=...) builds DeepSpeed's own optimizer, not the one the config "
            f"asks for ({', '.join(asks)}): drop deepspeed=, or set optimizer='adamw', "
            f"step_in_backward=False and no 'optimizer' offload in the CiuicConfig."
        )


def _check_distributed(config: CiuicConfig, args: Any) -> None:
    world_size = int(getattr(args, "world_size", 1) or 1)
    if config.step_in_backward and world_size > 1:
        raise ConfigError(
            f"CiuicConfig(step_in_backward=True) cannot work with {world_size} processes "
            f"(TrainingArguments.world_size={world_size}): each parameter would step with its own "
            f"process's gradient, freed before DDP/FSDP averages it across processes. Set "
            f"step_in_backward=False (the other fields work distributed), or train on one process."
        )


def _check_checkpointing(config: CiuicConfig, args: Any) -> None:
    name = checkpointing_field(args)
    if config.checkpointing != "none" and getattr(args, name, False):
        raise ConfigError(
            f"TrainingArguments({name}=True) and CiuicConfig(checkpointing={config.checkpointing!r}) would "
            f"checkpoint the same blocks twice: set {name}=False (ciuic checkpoints them) or "
            f"checkpointing='none'."
        )


def _check_compile(config: CiuicConfig, args: Any) -> None:
    if not getattr(args, "torch_compile", False):
        return
    hooked = [
        f"{key}={_plain(value)!r}"
        for key, value in (("activations", config.activations), ("checkpointing", config.checkpointing))
        if value != "none"
    ]
    if "activations" in config.offload:
        hooked.append("offload={'activations'}")
    if hooked:
        raise ConfigError(
            f"TrainingArguments(torch_compile=True) cannot work with {', '.join(hooked)}: these act through "
            f"saved-tensor and module hooks that a compiled model does not run as written. Set "
            f"torch_compile=False, or turn those fields off in the CiuicConfig."
        )


def _plain(value: Any) -> Any:
    to_value = getattr(value, "to_value", None)
    return to_value() if callable(to_value) else value


def _describe(optimizer: Any) -> str:
    name, bits, in_backward, offload = describe(optimizer)
    if bits is None:
        return name
    return f"{name}(state_bits={bits}, step_in_backward={in_backward}, offload={offload})"
