"""The optimizer route: how the Hugging Face ``Trainer`` builds the optimizer a config asks for.

The ``Trainer`` builds its optimizer in ``create_optimizer`` from ``args.optim`` (a closed enum)
unless the constructor got ``optimizers=(optimizer, scheduler)`` or
``optimizer_cls_and_kwargs=(cls, kwargs)``; a callback has no say. So the route is the
constructor's own ``optimizer_cls_and_kwargs``: :func:`optimizer_cls_and_kwargs` returns the
pair, and :class:`CiuicCallback` sets the same attribute on the ``Trainer`` that is being built
when the user passed neither. Either way the ``Trainer`` calls
``cls(param_groups, **kwargs)`` with its own parameter groups (weight decay on the parameters
it decays, 0 on norms and biases), then builds its scheduler over the result, and FSDP's delayed
optimizer creation goes through the same call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

import ciuic
from ciuic.config import CiuicConfig

DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused")
"""``TrainingArguments.optim`` values that mean "plain AdamW" (the default is the fused one)."""


def as_config(config: CiuicConfig | str | Mapping[str, Any] | None = None, **fields: Any) -> CiuicConfig:
    """``config`` (a CiuicConfig, preset name or dict) with ``fields`` on top: ``ciuic.as_config``."""
    return ciuic.as_config(config, **fields)


def asks_for_ciuic_optimizer(config: CiuicConfig) -> list[str]:
    """The config fields that ``torch.optim.AdamW`` does not serve (empty: plain AdamW will do)."""
    asks: list[str] = ciuic.optimizer_requests(config)
    return asks


class CiuicOptimizer(torch.optim.Optimizer):
    """The class handed to the ``Trainer`` in ``optimizer_cls_and_kwargs``.

    Calling it builds the optimizer ``config`` asks for through ``ciuic.build_optimizer`` (a
    ``ciuic.optim.CiuicAdamW`` or ``torch.optim.AdamW``) and returns that: the class is never
    instantiated itself. It is an ``Optimizer`` subclass only because the ``Trainer`` treats any
    other callable as an optimizer *factory* and would then drop its parameter groups.

    Example:
        >>> import torch, ciuic
        >>> config = ciuic.CiuicConfig(optimizer="adamw8bit")
        >>> opt = CiuicOptimizer([torch.nn.Parameter(torch.zeros(4))], config=config, lr=1e-3)
        >>> type(opt).__name__
        'CiuicAdamW'
    """

    def __new__(  # type: ignore[misc]
        cls,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        config: CiuicConfig,
        **adamw_kwargs: Any,
    ) -> torch.optim.Optimizer:
        optimizer: torch.optim.Optimizer = ciuic.build_optimizer(params, config, **adamw_kwargs)
        return optimizer


def optimizer_kwargs(config: CiuicConfig, args: Any) -> dict[str, Any]:
    """``ciuic.build_optimizer`` keywords from the ``TrainingArguments``: learning rate, betas,
    epsilon, and ``accumulation_steps`` when the optimizer steps in backward. Weight decay comes
    with the ``Trainer``'s parameter groups."""
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }
    if config.step_in_backward:
        kwargs["accumulation_steps"] = args.gradient_accumulation_steps
    return kwargs


def optimizer_cls_and_kwargs(
    config: CiuicConfig | str | Mapping[str, Any], args: Any
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The ``Trainer(optimizer_cls_and_kwargs=...)`` value that builds the optimizer ``config`` asks for.

    Only needed where :class:`CiuicCallback` cannot set it itself (a ``Trainer`` built by
    another library that hides the callback from the constructor); the callback checks, before
    the first step, that the optimizer the ``Trainer`` ended up with is the one asked for.

    Args:
        config: A ``CiuicConfig``, preset name or dict (the same one the callback gets).
        args: The ``TrainingArguments``: ``learning_rate``, ``adam_beta1``, ``adam_beta2``,
            ``adam_epsilon``, ``weight_decay`` and ``gradient_accumulation_steps`` are used;
            ``lr_scheduler_type`` applies as usual.

    Example:
        >>> import ciuic_hf
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", learning_rate=2e-4, report_to=[], use_cpu=True)
        >>> cls, kwargs = ciuic_hf.optimizer_cls_and_kwargs("max", args)
        >>> kwargs["lr"], kwargs["accumulation_steps"]
        (0.0002, 1)
    """
    config = as_config(config)
    return CiuicOptimizer, {"config": config, **optimizer_kwargs(config, args)}


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def describe(optimizer: Any) -> tuple[str, Any, Any, Any]:
    """What tells two optimizers of a config apart: class, state bits, step in backward, offload."""
    return (
        type(optimizer).__name__,
        getattr(optimizer, "state_bits", None),
        getattr(optimizer, "step_in_backward", False),
        getattr(optimizer, "offload", False),
    )


def probe(config: CiuicConfig, args: Any) -> torch.optim.Optimizer:
    """The optimizer ``config`` asks for, over one scalar parameter (to compare and check with)."""
    kwargs = optimizer_kwargs(config, args)
    optimizer: torch.optim.Optimizer = ciuic.build_optimizer(
        [torch.nn.Parameter(torch.zeros(1))], config, **kwargs
    )
    return optimizer
