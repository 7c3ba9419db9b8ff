"""Lean AdamW: ``CiuicConfig(optimizer="adamw8bit"|"adamw4bit", step_in_backward=..., offload=...)``.

:class:`CiuicAdamW` is a drop-in ``torch.optim.Optimizer``; ``ciuic.build_optimizer`` returns one
whenever the config asks for more than torch's AdamW (this package registers the factory).

Example:
    >>> import torch, ciuic
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = ciuic.build_optimizer(model.parameters(), ciuic.CiuicConfig(optimizer="adamw4bit"), lr=1e-3)
    >>> type(opt).__name__, opt.state_bits
    ('CiuicAdamW', 4)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ciuic.config import (
    CiuicConfig,
    FieldSpec,
    OffloadTarget,
    choice,
    flag,
    register_field,
    register_offload_target,
)
from ciuic.errors import ConfigError
from ciuic.registry import BUILD_OPTIMIZER, register_optimizer_factory

from .checks import check_trainer_settings
from .functional import adamw_math, adamw_quantized
from .optimizer import STATE_BITS, CiuicAdamW
from .quant import FORMATS, MIN_QUANTIZED_NUMEL, StateFormat, dequantize_blockwise, quantize_blockwise

__all__ = [
    "FORMATS",
    "MIN_QUANTIZED_NUMEL",
    "STATE_BITS",
    "CiuicAdamW",
    "StateFormat",
    "adamw_math",
    "adamw_quantized",
    "build_ciuic_adamw",
    "check_trainer_settings",
    "dequantize_blockwise",
    "quantize_blockwise",
]

BITS_OF = {"adamw": 32, "adamw8bit": 8, "adamw4bit": 4}
"""``CiuicConfig.optimizer`` -> ``CiuicAdamW(state_bits=...)``."""

_FROM_CONFIG = ("state_bits", "step_in_backward", "offload")


def build_ciuic_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], config: CiuicConfig, **kwargs: Any
) -> CiuicAdamW:
    """The registered optimizer factory: ``config`` sets ``state_bits``, ``step_in_backward`` and
    ``offload``; ``kwargs`` are the other :class:`CiuicAdamW` arguments (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``min_quantized_numel``, ``accumulation_steps``, ``fp32_states``,
    ``recoverable``).

    Raises:
        ConfigError: ``kwargs`` repeat what the config sets, or name an unknown argument.

    Example:
        >>> import torch, ciuic
        >>> p = [torch.nn.Parameter(torch.zeros(3))]
        >>> build_ciuic_adamw(p, ciuic.CiuicConfig(step_in_backward=True), lr=0.1).step_in_backward
        True
    """
    clash = [key for key in kwargs if key in _FROM_CONFIG]
    if clash:
        raise ConfigError(
            f"{clash[0]}={kwargs[clash[0]]!r} is set by the config: use CiuicConfig(optimizer=..., "
            f"step_in_backward=..., offload=...) instead of passing it to build_optimizer."
        )
    allowed = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "min_quantized_numel",
        "accumulation_steps",
        "fp32_states",
    )
    unknown = [key for key in kwargs if key not in allowed]
    if unknown:
        raise ConfigError(
            f"build_optimizer got {unknown[0]}={kwargs[unknown[0]]!r}, which CiuicAdamW does not take: "
            f"allowed are {', '.join(allowed)}."
        )
    return CiuicAdamW(
        params,
        state_bits=BITS_OF[config.optimizer],
        step_in_backward=config.step_in_backward,
        offload="optimizer" in config.offload,
        **kwargs,
    )


register_optimizer_factory(build_ciuic_adamw)

FIELDS = (
    register_field(
        FieldSpec(
            name="optimizer",
            doc="Optimizer built by `ciuic.build_optimizer`: 'adamw' (full-precision states), "
            "'adamw8bit' or 'adamw4bit' (block-wise quantized states).",
            allowed="'adamw', 'adamw8bit', 'adamw4bit'",
            default="adamw",
            normalize=choice(*BITS_OF),
            order=50,
            presets={"balanced": "adamw8bit", "max": "adamw4bit"},
            deferred=BUILD_OPTIMIZER,
        )
    ),
    register_field(
        FieldSpec(
            name="step_in_backward",
            doc="Update each parameter as soon as its gradient is ready and free that gradient, so the "
            "gradients of the whole model never coexist.",
            allowed="True or False",
            default=False,
            normalize=flag,
            order=60,
            presets={"max": True},
            deferred=BUILD_OPTIMIZER,
        )
    ),
)
OFFLOAD = register_offload_target(
    OffloadTarget("optimizer", "optimizer states and the update, in (pinned) host memory", BUILD_OPTIMIZER)
)
