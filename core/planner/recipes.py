"""The plain QLoRA recipe, defined once: what users already run and every preset must beat.

>>> from ciuic.planner.recipes import qlora_recipe
>>> qlora_recipe().to_dict()["weights"], qlora_recipe().to_dict()["checkpointing"]
('nf4', 'full')
"""

from __future__ import annotations

from ciuic.config import CiuicConfig


def qlora_recipe() -> CiuicConfig:
    """NF4 frozen weights and every decoder block checkpointed (with the user's PEFT LoRA).

    This is the QLoRA recipe as users run it (Dettmers et al., 2023:
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` and
    ``gradient_checkpointing=True``), with torch AdamW and the model's own loss.
    """
    return CiuicConfig(weights="nf4", checkpointing="full")
