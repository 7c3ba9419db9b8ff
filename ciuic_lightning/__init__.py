"""PyTorch Lightning adapter for Ciuic: a config-only change to a Lightning fine-tuning job.

``Trainer(strategy=CiuicStrategy("balanced"))`` (or ``strategy="ciuic"`` once this package is
imported; ``"ciuic_ddp"``, ``"ciuic_fsdp"`` for several devices) applies the config to the
``LightningModule`` before the DDP/FSDP wrap and before ``configure_optimizers``, swaps in the
optimizer the config names, wraps each training step in the techniques' step scope and saves
the config in checkpoints. ``CiuicCallback`` logs the memory by category. The adapter holds no
technique logic: it only calls ``ciuic``; the hook order it relies on is documented in
:mod:`ciuic_lightning.strategy`.

Example:
    >>> import lightning.pytorch as pl
    >>> import ciuic_lightning
    >>> trainer = pl.Trainer(strategy="ciuic", accelerator="cpu", logger=False,
    ...                      enable_checkpointing=False)
    >>> trainer.strategy.ciuic_config
    CiuicConfig(...)
"""

from .callback import CiuicCallback
from .strategy import (
    CHECKPOINT_KEY,
    CiuicDDPStrategy,
    CiuicFSDPStrategy,
    CiuicStrategy,
    CiuicStrategyMixin,
    register,
    resolve_config,
)

__all__ = [
    "CHECKPOINT_KEY",
    "CiuicCallback",
    "CiuicDDPStrategy",
    "CiuicFSDPStrategy",
    "CiuicStrategy",
    "CiuicStrategyMixin",
    "register",
    "resolve_config",
]

register()
