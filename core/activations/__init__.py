"""Activation memory: compressed saved tensors, activation offload, selective checkpointing.

In LoRA fine-tuning the weights are frozen, so most of what a step adds to memory is what
autograd saves for backward. ``CiuicConfig(activations=..., offload={"activations"},
checkpointing=...)`` applied with ``ciuic.apply_`` makes that small while the forward pass
stays exact:

- ``activations``: saved tensors are encoded per group (``int8``/``int4``/``int2`` min/max
  with stochastic rounding for the inputs of linear layers, ``fp8`` e4m3 with a scale per
  group) by :class:`~ciuic.activations.hooks.SavedTensorHooks`; sensitive places keep more
  bits (:data:`~ciuic.activations.options.DEFAULT_RULES`);
- ``offload={"activations"}``: what is saved (compressed or not) goes to host memory, pinned
  and on a side stream on CUDA, and comes back one block ahead in backward;
- ``checkpointing``: ``'full'``, every N-th block, or ``'auto'`` (fits ``budget``, decided at
  the first training forward of the model or of any module that holds its blocks).

The hooks switch on in the root module's forward. A trainer whose step calls an inner module
(``self.model(...)`` in a ``LightningModule.training_step``) wraps the step in the record's
``scope()`` instead; a backward that the hooks never saw raises
:class:`~ciuic.errors.InertTechniqueError` rather than leaving the step silently uncompressed.

Example:
    >>> import torch, ciuic
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    >>> handle = ciuic.apply_(model, ciuic.CiuicConfig(activations="int8"))
    >>> model(torch.randn(32, 64)).sum().backward()
    >>> _ = ciuic.remove_(model)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ciuic.api import apply_technique_
from ciuic.config import (
    CiuicConfig,
    FieldSpec,
    Invalid,
    OffloadTarget,
    register_field,
    register_offload_target,
)
from ciuic.errors import ApplyError, TechniqueUnavailableError
from ciuic.registry import Applied, Technique, register_technique

from .checkpoint import AutoCheckpointing, UndoAll, checkpoint_blocks, checkpointed_indices, find_blocks
from .codecs import CODECS, CodecSpec, decode, encode, fp8_available
from .hooks import SavedTensorHooks
from .options import DEFAULT_RULES, ActivationOptions, CodecRule

__all__ = [
    "CODECS",
    "DEFAULT_RULES",
    "ActivationOptions",
    "AutoCheckpointing",
    "CodecRule",
    "CodecSpec",
    "SavedTensorHooks",
    "apply_activations",
    "checkpoint_blocks",
    "checkpointed_indices",
    "decode",
    "encode",
    "find_blocks",
    "install_activations",
]


def _requested(config: CiuicConfig) -> bool:
    return config.activations != "none" or "activations" in config.offload or config.checkpointing != "none"


def apply_activations(
    model: nn.Module, config: CiuicConfig, options: ActivationOptions | None = None
) -> Applied:
    """Shim kept for existing code: ``ciuic.apply_`` with ``config``'s activation fields.

    ``options`` (if given) replaces ``config.activations`` except for its codec. Returns the
    activations record of the handle stored on the model; its ``undo()`` is ``ciuic.remove_``.
    """
    if options is not None:
        options = dataclasses.replace(options, codec=config.activations.codec)
    own = CiuicConfig(
        activations=options or config.activations,
        offload=config.offload & {"activations"},
        checkpointing=config.checkpointing,
        budget=config.budget,
    )
    return apply_technique_(model, own, "activations")


def install_activations(model: nn.Module, config: CiuicConfig) -> Applied:
    """Install compression, offload and checkpointing as ``config`` asks; what ``apply_`` runs.

    ``config.activations`` (an :class:`ActivationOptions`) gives the codec and its options.

    When saved-tensor hooks are installed, ``record.scope`` is their
    :meth:`~SavedTensorHooks.step_scope` (wrap a step that calls an inner module in it) and
    ``record.details["hooks"]`` the :class:`SavedTensorHooks` (its ``state_dict`` holds the
    stochastic-rounding generators). Everything installed, and ``record.undo``, survives
    ``copy.deepcopy``, pickling and ``torch.save`` of the model.

    Raises:
        TechniqueUnavailableError: ``model`` is a ``torch.compile`` module, or fp8 is asked
            for and this torch has no ``float8_e4m3fn``.
        ApplyError: checkpointing is asked for but ``model`` has no decoder blocks.

    Example:
        >>> import torch
        >>> from ciuic import CiuicConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
        >>> record = install_activations(model, CiuicConfig(activations={"codec": "int4", "group_size": 32}))
        >>> record.details["codec"], record.details["group_size"]
        ('int4', 32)
        >>> record.undo()
    """
    _refuse_compiled(model)
    options = config.activations
    codec = options.codec
    if codec == "fp8" and not fp8_available():
        raise TechniqueUnavailableError(
            f"activations='fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks: "
            f"use activations='int8' (the same bytes), or torch >= 2.1."
        )
    blocks = find_blocks(model)
    record = Applied("activations", details={"codec": codec, "blocks": len(blocks)})
    undos: list[Callable[[], None]] = []
    hooks: SavedTensorHooks | None = None
    offload = "activations" in config.offload
    if codec != "none" or offload:
        hooks = SavedTensorHooks(model, codec=codec, offload=offload, options=options)
        hooks.install(blocks)
        undos.append(hooks.remove)
        record.changed.extend(name or "<root>" for name in hooks.scoped_modules)
        record.details.update(offload=offload, group_size=options.group_size, stats=hooks.stats, hooks=hooks)
        record.scope = hooks.step_scope
        record.stateful = hooks
    if config.checkpointing != "none":
        undos.append(_checkpoint(model, config, blocks, hooks, record))
    record.undo = UndoAll(undos)
    return record


def _checkpoint(
    model: nn.Module,
    config: CiuicConfig,
    blocks: tuple[nn.Module, ...],
    hooks: SavedTensorHooks | None,
    record: Applied,
) -> Callable[[], None]:
    if not blocks:
        raise ApplyError(
            f"checkpointing={config.checkpointing!r}: {type(model).__name__} has no decoder blocks "
            f"(no nn.ModuleList of modules of one type) to checkpoint: use checkpointing='none', or "
            f"keep the blocks in an nn.ModuleList."
        )
    if config.checkpointing == "auto":
        budget = config.budget if isinstance(config.budget, int) else _device_memory(model)
        if budget is None:
            record.skipped.append(
                ("checkpointing='auto'", "budget=None on CPU: no limit to fit, nothing checkpointed")
            )
            return UndoAll([])
        auto = AutoCheckpointing(model, blocks, budget, hooks._pack if hooks is not None else None)
        record.changed.append("auto checkpointing (decided at the first training step)")
        record.details["checkpointing"] = auto.decision  # filled in at the first training step
        return auto.remove
    every = 1 if config.checkpointing == "full" else int(config.checkpointing)
    undo = checkpoint_blocks(blocks, every=every)
    chosen = checkpointed_indices(blocks)
    record.changed.extend(f"checkpointed block {i}" for i in chosen)
    record.details["checkpointing"] = {"checkpointed": chosen}
    return undo


def _device_memory(model: nn.Module) -> int | None:
    """Total memory of the CUDA device ``model`` is on (``budget=None`` means all of it)."""
    device = next((p.device for p in model.parameters()), None)
    if device is None or device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def _refuse_compiled(model: nn.Module) -> None:
    if type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
        raise TechniqueUnavailableError(
            "ciuic's activation technique cannot be applied to a torch.compile'd module: apply it "
            "to the original model (model._orig_mod) and run that uncompiled, or leave "
            "activations, offload={'activations'} and checkpointing off when compiling."
        )


def _checkpointing(field: str, value: object) -> object:
    if isinstance(value, str) and value in ("none", "auto", "full"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise Invalid("an int N checkpoints every N-th decoder block")


FIELDS = (
    register_field(
        ActivationOptions.field(
            "activations",
            "Codec for tensors saved for backward: 'none' keeps them exact; 'fp8', 'int8', 'int4', 'int2' "
            "compress them (the forward pass stays exact).",
            allowed="'none', 'fp8', 'int8', 'int4', 'int2'",
            order=20,
            presets={"balanced": ActivationOptions(codec="int8"), "max": ActivationOptions(codec="int4")},
        )
    ),
    register_field(
        FieldSpec(
            name="checkpointing",
            doc="Recompute decoder blocks in backward instead of saving their activations: 'none', "
            "'full' (every block), an int N (every N-th block) or 'auto' (the fewest blocks that fit "
            "`budget`).",
            allowed="'none', 'auto', 'full', or an int >= 1",
            default="none",
            normalize=_checkpointing,
            order=40,
            # Re-derived from the planner (issue #14): without checkpointing, balanced peaked above the
            # plain QLoRA recipe (7B, 4,096 tokens: 18.1 vs 14.5 GiB); `python bench/planner.py`.
            presets={"balanced": "full", "max": "full"},
        )
    ),
)
OFFLOAD = register_offload_target(
    OffloadTarget("activations", "tensors saved for backward, fetched back one block ahead")
)

TECHNIQUE = register_technique(
    Technique(
        name="activations",
        fields=("activations", "offload.activations", "checkpointing"),
        order=30,
        is_requested=_requested,
        apply=install_activations,
        examples=({"activations": "int4"}, {"offload": ["activations"]}, {"checkpointing": "full"}),
    )
)
"""The registered technique: serves ``activations``, ``offload={'activations'}``, ``checkpointing``."""
