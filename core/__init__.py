"""Ciuic: make DeepSeek fine-tuning fit in GPU memory by configuration.

One config object, one in-place verb::

    import ciuic
    handle = ciuic.apply_(model, ciuic.CiuicConfig.preset("balanced"))
    optimizer = ciuic.build_optimizer(model.parameters(), handle.config, lr=2e-4)
    ...
    ciuic.remove_(model)

This package imports no training framework; the Lightning and Hugging Face adapters live in
``ciuic_lightning`` and ``ciuic_hf``.
"""

from importlib.metadata import PackageNotFoundError, version

from .logging_filters import quiet_bitsandbytes

quiet_bitsandbytes()  # before anything imports bitsandbytes: it logs a known-harmless line on import

# ruff: noqa: E402  (the filter above must be installed before these imports run)

from .api import (
    CiuicHandle,
    apply_,
    as_config,
    build_optimizer,
    handle_of,
    optimizer_requests,
    remove_,
    saved_config,
    step_scope,
)
from .config import CiuicConfig
from .errors import ApplyError, CiuicError, ConfigError, TechniqueUnavailableError, UnknownTechniqueError
from .lora_targets import lora_targets
from .memory import MemoryMeter, MemoryReading
from .planner import Plan, plan
from .registry import discover as _discover

try:
    __version__ = version("ciuic")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ApplyError",
    "CiuicConfig",
    "CiuicError",
    "CiuicHandle",
    "ConfigError",
    "MemoryMeter",
    "MemoryReading",
    "Plan",
    "TechniqueUnavailableError",
    "UnknownTechniqueError",
    "__version__",
    "apply_",
    "as_config",
    "build_optimizer",
    "handle_of",
    "lora_targets",
    "optimizer_requests",
    "plan",
    "remove_",
    "saved_config",
    "step_scope",
]

_discover()  # each technique package registers its config fields and itself
