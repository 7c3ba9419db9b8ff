"""Frozen-weight offload: ``CiuicConfig(offload={"weights"})``.

The frozen weights (dense or bitsandbytes-quantized linear layers with their quantization
state, :class:`~ciuic.weights.experts.QuantizedExperts` rows, dense fused experts, embeddings,
norms and a frozen ``lm_head``) live in host memory, pinned on CUDA, and are copied to the
device one decoder block ahead in forward and again in backward, so the device holds about two
blocks of them at a time. Trainable parameters (LoRA) stay on the device. Routed experts stored
by ``weights='nf4'``/``'int8'``/``'fp4'`` are copied expert by expert, only those the router
picked. The copies are exact: training is bitwise the run without the offload. See
:mod:`ciuic.weight_offload.streamer` for how.

Example:
    >>> import torch, ciuic
    >>> model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3))).requires_grad_(False)
    >>> handle = ciuic.apply_(model, ciuic.CiuicConfig(offload={"weights"}))
    >>> handle.record("weight_offload").details["host_bytes"]
    864
    >>> _ = ciuic.remove_(model)
"""

from __future__ import annotations

from torch import nn

from ciuic.activations.checkpoint import find_blocks
from ciuic.config import CiuicConfig, OffloadTarget, register_offload_target
from ciuic.registry import Applied, Technique, register_technique

from .slots import Slot, own_frozen_tensors
from .streamer import ExpertRows, Unit, WeightStreamer

__all__ = ["ExpertRows", "Slot", "Unit", "WeightStreamer", "install_weight_offload", "own_frozen_tensors"]


def install_weight_offload(model: nn.Module, config: CiuicConfig) -> Applied:
    """Keep ``model``'s frozen weights in host memory and stream them in (what ``apply_`` runs).

    ``record.details``: ``host_bytes`` (all frozen storages), ``block_bytes`` (per decoder
    block), ``streamer`` (the :class:`WeightStreamer`: fetch counts, resident bytes).

    Raises:
        ApplyError: ``model`` has no frozen weights.
    """
    streamer = WeightStreamer(model, find_blocks(model)).install()
    record = Applied(
        "weight_offload",
        changed=[unit.name for unit in streamer.units] + streamer.expert_modules,
        undo=streamer.remove,
        details={
            "host_bytes": sum(slot.nbytes for slot in streamer.slots.values()),
            "block_bytes": [u.nbytes for u in streamer.units if u.block is not None],
            "expert_modules": list(streamer.expert_modules),
            "streamer": streamer,
        },
    )
    dense = [name for name, m in model.named_modules() if _dense_fused_experts(m)]
    record.skipped.extend(
        (
            name,
            "dense fused experts are fetched whole with their block: transformers' kernel reads the "
            "whole stack, and an expert-by-expert loop would change the bits; weights='nf4'/'int8' "
            "stores them per expert, which fetches only the routed ones",
        )
        for name in dense
    )
    return record


def _dense_fused_experts(module: nn.Module) -> bool:
    from ciuic.weights.experts import fused_experts_layout_problem

    return fused_experts_layout_problem(module) is None and not module.gate_up_proj.requires_grad


OFFLOAD = register_offload_target(
    OffloadTarget("weights", "frozen weights, streamed to the device one decoder block ahead")
)

TECHNIQUE = register_technique(
    Technique(
        name="weight_offload",
        fields=("offload.weights",),
        order=20,
        is_requested=lambda config: "weights" in config.offload,
        apply=install_weight_offload,
        examples=({"offload": ["weights"]},),
    )
)
"""The registered technique: serves ``offload={'weights'}``."""
