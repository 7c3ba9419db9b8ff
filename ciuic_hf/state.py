"""Technique states saved beside a ``Trainer`` checkpoint, so a resumed run continues exactly.

An applied model carries its technique states (the stochastic-rounding generators of
compressed activations) in its ``state_dict`` metadata, but a PEFT checkpoint keeps only the
adapter tensors: the metadata is lost on the way. So ``on_save`` writes them into the
checkpoint folder (``ciuic_state-<rank>.pt``, one per process) with the config they were taken
under, and ``on_train_begin`` of a resumed run loads them back. The frozen weights need nothing:
``apply_`` converts the same base weights to the same codes again.
"""

from __future__ import annotations

import os

import torch

from ciuic import CiuicHandle
from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError


def state_file(folder: str, rank: int) -> str:
    """The path of one process's technique states inside a checkpoint folder."""
    return os.path.join(folder, f"ciuic_state-{rank}.pt")


def save_states(handle: CiuicHandle, folder: str, rank: int) -> None:
    """Write the config and technique states of ``handle`` into ``folder``."""
    payload = {"config": handle.config.to_dict(), "state": handle.technique_states()}
    torch.save(payload, state_file(folder, rank))


def load_states(handle: CiuicHandle, folder: str, rank: int) -> bool:
    """Restore the technique states saved in ``folder``; ``False`` if there are none.

    Raises:
        ConfigError: the checkpoint was saved under another config.
    """
    path = state_file(folder, rank)
    if not os.path.isfile(path):
        return False
    payload = torch.load(path, weights_only=True)
    saved = CiuicConfig.from_dict(payload["config"])
    if saved != handle.config:
        changed = ", ".join(saved.differs(handle.config))
        raise ConfigError(
            f"the checkpoint {folder} was saved under another ciuic config ({changed} differ): resume with "
            f"CiuicCallback({saved.to_dict()}) or start a new run."
        )
    handle.load_technique_states(payload["state"])
    return True
