"""Replace the optimizers a ``LightningModule`` configured with the one a Ciuic config names.

Lightning builds the user's optimizers in ``Strategy.setup_optimizers`` (from
``configure_optimizers``); :func:`translate` then rebuilds each with
``ciuic.build_optimizer`` over the same parameter groups and hyperparameters, and points the
LR schedulers at the new optimizer. No technique logic lives here: the optimizer is core's.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import torch

import ciuic

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
"""The hyperparameters a Ciuic optimizer takes, per parameter group."""

_SCHEDULE_KEYS = ("initial_lr",)
"""Group entries an LR scheduler wrote into the user's groups; copied onto the new groups."""


def names_ciuic_optimizer(config: ciuic.CiuicConfig) -> bool:
    """Whether ``build_optimizer`` gives something other than ``torch.optim.AdamW`` for ``config``."""
    probe = [torch.nn.Parameter(torch.zeros(1))]
    return type(ciuic.build_optimizer(probe, config)) is not torch.optim.AdamW


def untranslatable(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot become a Ciuic AdamW, or ``None`` if it can."""
    if isinstance(optimizer, ciuic.optim.CiuicAdamW):
        return "it already is a ciuic CiuicAdamW"
    name = type(optimizer).__name__
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
        return f"{name} is not torch.optim.AdamW or Adam (ciuic's optimizer is an AdamW)"
    for index, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                return f"{name} param group {index} sets {flag}=True, which ciuic's AdamW does not do"
        if type(optimizer) is torch.optim.Adam and group.get("weight_decay", 0) != 0:
            return (
                f"Adam param group {index} has weight_decay={group['weight_decay']} (L2 added to the "
                f"gradient), which AdamW's decoupled decay would change; use weight_decay=0 or AdamW"
            )
    return None


def rebuild(
    optimizer: torch.optim.Optimizer, config: ciuic.CiuicConfig, accumulation_steps: int
) -> torch.optim.Optimizer:
    """The Ciuic optimizer over ``optimizer``'s parameter groups, with their hyperparameters."""
    groups = [{"params": group["params"], **_hyper(group)} for group in optimizer.param_groups]
    kwargs: dict[str, Any] = {}
    if config.step_in_backward:
        kwargs["accumulation_steps"] = accumulation_steps
    new = ciuic.build_optimizer(groups, config, **kwargs)
    for old_group, new_group in zip(optimizer.param_groups, new.param_groups, strict=True):
        new_group.update({k: old_group[k] for k in _SCHEDULE_KEYS if k in old_group})
    return new


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    hyper = {key: group[key] for key in ADAMW_KEYS if key in group}
    if isinstance(hyper.get("lr"), torch.Tensor):
        hyper["lr"] = float(hyper["lr"])
    return hyper


def _track_steps(optimizer: torch.optim.Optimizer) -> None:
    """What an LR scheduler does to its optimizer at construction (``torch.optim.lr_scheduler``
    marks ``optimizer.step`` to check the call order); done again for the new optimizer."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    owner = weakref.ref(optimizer)
    step = type(optimizer).step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = owner()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def translate(
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[Any],
    config: ciuic.CiuicConfig,
    accumulation_steps: int,
) -> list[torch.optim.Optimizer]:
    """Each of ``optimizers`` rebuilt as ``config`` asks, schedulers re-pointed (in place).

    Args:
        optimizers: What the LightningModule's ``configure_optimizers`` returned.
        schedulers: Lightning's ``LRSchedulerConfig`` list (``.scheduler`` is re-pointed).
        config: The strategy's Ciuic config.
        accumulation_steps: ``Trainer(accumulate_grad_batches=...)``, for step-in-backward.

    Returns:
        The optimizers to use; one that cannot be translated is kept, with a warning.
    """
    result = []
    for optimizer in optimizers:
        reason = untranslatable(optimizer)
        if reason is not None:
            warnings.warn(
                f"CiuicStrategy kept your {type(optimizer).__name__}: {reason}. The config's "
                f"optimizer fields (optimizer={config.optimizer!r}, step_in_backward="
                f"{config.step_in_backward}) do not apply to it; return torch.optim.AdamW from "
                f"configure_optimizers to get them.",
                UserWarning,
                stacklevel=2,
            )
            result.append(optimizer)
            continue
        new = rebuild(optimizer, config, accumulation_steps)
        for scheduler_config in schedulers:
            if getattr(scheduler_config.scheduler, "optimizer", None) is optimizer:
                scheduler_config.scheduler.optimizer = new
                _track_steps(new)
        result.append(new)
    return result
