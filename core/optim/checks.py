"""Trainer settings that are silently wrong with ``CiuicAdamW(step_in_backward=True)``.

Each parameter is updated inside backward and its gradient freed there, so whatever a trainer
does to the gradients between ``backward()`` and ``optimizer.step()`` finds none: clipping by
the global norm clips nothing, an fp16 ``GradScaler`` cannot unscale or skip a step, and
accumulating micro-batches in the trainer steps the parameters at every micro-batch. Adapters
call :func:`check_trainer_settings` before training so that these fail at once, by name.
"""

from __future__ import annotations

from typing import Any

import torch

from ciuic.errors import ConfigError

from .optimizer import CiuicAdamW


def check_trainer_settings(
    optimizer: torch.optim.Optimizer,
    *,
    clip_grad_norm: float | None = None,
    grad_scaler: Any = False,
    accumulation_steps: int = 1,
) -> None:
    """Refuse trainer settings that the optimizer would silently defeat.

    Args:
        optimizer: The optimizer the trainer steps (any; only ``CiuicAdamW`` with
            ``step_in_backward`` restricts anything).
        clip_grad_norm: The trainer's global-norm gradient clipping (``None`` or 0: off), e.g.
            Hugging Face ``max_grad_norm`` or Lightning ``gradient_clip_val``.
        grad_scaler: Whether the trainer scales the loss for fp16 (a bool, or the
            ``torch.amp.GradScaler`` itself, whose ``is_enabled()`` is used).
        accumulation_steps: Micro-batches per optimizer step in the trainer (Hugging Face
            ``gradient_accumulation_steps``, Lightning ``accumulate_grad_batches``).

    Raises:
        ConfigError: a value is invalid, or a setting is defeated by ``step_in_backward``; the
            message names the setting, its value and the fix.

    Example:
        >>> import torch
        >>> from ciuic.optim import CiuicAdamW, check_trainer_settings
        >>> opt = CiuicAdamW(torch.nn.Linear(2, 2).parameters(), step_in_backward=True)
        >>> check_trainer_settings(opt, clip_grad_norm=None, accumulation_steps=1)
        >>> check_trainer_settings(opt, clip_grad_norm=1.0)
        Traceback (most recent call last):
        ...
        ciuic.errors.ConfigError: clip_grad_norm=1.0 ...
    """
    clipping = _clipping(clip_grad_norm)
    scaling = _scaling(grad_scaler)
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or accumulation_steps < 1
    ):
        raise ConfigError(f"accumulation_steps={accumulation_steps!r} is invalid: give an int >= 1.")
    if not isinstance(optimizer, CiuicAdamW) or not optimizer.step_in_backward:
        return
    if clipping:
        raise ConfigError(
            f"clip_grad_norm={clip_grad_norm!r} clips nothing with step_in_backward=True: each parameter "
            f"steps and frees its gradient inside backward, before the trainer clips. Turn the trainer's "
            f"clipping off (Hugging Face max_grad_norm=0, Lightning gradient_clip_val=None) or set "
            f"step_in_backward=False to clip by the global norm."
        )
    if scaling:
        raise ConfigError(
            f"grad_scaler={grad_scaler!r}: an fp16 GradScaler cannot unscale gradients or skip inf/NaN "
            f"steps with step_in_backward=True (parameters step inside backward with the scaled "
            f"gradient). Train in bf16 without a scaler (Lightning precision='bf16-mixed', Hugging "
            f"Face bf16=True) or set step_in_backward=False."
        )
    if accumulation_steps != optimizer.accumulation_steps:
        raise ConfigError(
            f"accumulation_steps={accumulation_steps} in the trainer, but CiuicAdamW(step_in_backward=True) "
            f"has accumulation_steps={optimizer.accumulation_steps} and steps inside the backward that "
            f"completes its own window, whatever the trainer does: build the optimizer with "
            f"accumulation_steps={accumulation_steps} (build_optimizer(..., "
            f"accumulation_steps={accumulation_steps}))."
        )


def _clipping(clip_grad_norm: Any) -> bool:
    if clip_grad_norm is None:
        return False
    valid = isinstance(clip_grad_norm, (int, float)) and not isinstance(clip_grad_norm, bool)
    if not valid or not clip_grad_norm >= 0:
        raise ConfigError(
            f"clip_grad_norm={clip_grad_norm!r} is invalid: give None or a float >= 0 (0 means no clipping)."
        )
    return bool(clip_grad_norm > 0)


def _scaling(grad_scaler: Any) -> bool:
    if isinstance(grad_scaler, bool):
        return grad_scaler
    if hasattr(grad_scaler, "is_enabled"):
        return bool(grad_scaler.is_enabled())
    raise ConfigError(
        f"grad_scaler={grad_scaler!r} is invalid: give True/False or the torch.amp.GradScaler itself."
    )
