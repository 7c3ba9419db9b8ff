"""Selective activation checkpointing of decoder blocks (non-reentrant ``torch.utils.checkpoint``).

``checkpointing='full'`` recomputes every decoder block in backward, an int ``N`` every N-th
(blocks 0, N, 2N, ...), and ``'auto'`` the fewest blocks that make the step fit the config's
``budget``, decided by a dry run of the first training forward (:class:`AutoCheckpointing`).

Blocks are found by :func:`find_blocks` (the longest ``nn.ModuleList`` of one module type: the
``layers`` of a Hugging Face causal LM). A Hugging Face ``GradientCheckpointingLayer`` is
switched with its own attributes (``gradient_checkpointing`` and ``_gradient_checkpointing_func``
on the instance), so it drops its KV cache the way it does under
``model.gradient_checkpointing_enable()``; any other block gets an instance ``forward`` that
calls the class's through ``checkpoint``. Either way the block's own forward hooks stay outside
the checkpoint (they do not run again in the recomputation), and the tensors the checkpoint
saves (the block's inputs) go through the activation hooks when those are on, so they are
compressed and/or offloaded too.

Example:
    >>> import torch
    >>> blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
    >>> model = torch.nn.Sequential(*blocks)
    >>> undo = checkpoint_blocks(find_blocks(model), every=2)
    >>> model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    >>> undo()
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def find_blocks(model: nn.Module) -> tuple[nn.Module, ...]:
    """The decoder blocks of ``model``.

    The ``ModuleList`` of Hugging Face ``GradientCheckpointingLayer``s if there is one, else
    the outermost ``ModuleList`` whose items share one type (the longest among equals), so
    the experts list inside each block of a mixture of experts is not taken for the blocks.

    >>> find_blocks(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.ReLU()])))
    (ReLU(), ReLU())
    """
    candidates = [
        (not _is_hf_layer(module[0]), name.count("."), -len(module), tuple(module))
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
    ]
    if candidates:
        return min(candidates, key=lambda c: c[:3])[3]
    if isinstance(model, nn.Sequential) and len(model) and len({type(m) for m in model}) == 1:
        return tuple(model)
    return ()


def _is_hf_layer(module: nn.Module) -> bool:
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


class _RestoreAttr:
    """Puts back an instance attribute as it was (a picklable undo)."""

    def __init__(self, module: nn.Module, name: str, previous: object) -> None:
        self.module, self.name, self.previous = module, name, previous

    def __call__(self) -> None:
        if self.previous is _MISSING:
            self.module.__dict__.pop(self.name, None)
        else:
            object.__setattr__(self.module, self.name, self.previous)


class _Missing:
    """The marker of an attribute that was absent; one instance, also after a copy."""

    def __reduce__(self) -> str:
        return "_MISSING"

    def __deepcopy__(self, memo: dict[int, Any]) -> _Missing:
        return self


_MISSING = _Missing()


class UndoAll:
    """Calls undos in reverse order (a picklable composite undo)."""

    def __init__(self, undos: list[Callable[[], None]]) -> None:
        self.undos = undos

    def __call__(self) -> None:
        for undo in reversed(self.undos):
            undo()


def _set_attr(module: nn.Module, name: str, value: object) -> Callable[[], None]:
    """Set an instance attribute; the returned callable puts back what was there."""
    previous = module.__dict__.get(name, _MISSING)
    object.__setattr__(module, name, value)
    return _RestoreAttr(module, name, previous)


class CheckpointedForward:
    """The instance ``forward`` of a checkpointed block that is no Hugging Face layer.

    It holds its module (not a weak reference) so that it survives ``deepcopy``/pickling with
    the model, where the copy's forward refers to the copy.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        forward = type(module).forward
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
        return forward(module, *args, **kwargs)


def checkpoint_block(block: nn.Module) -> Callable[[], None]:
    """Recompute ``block`` in backward (training with gradients only); returns the undo."""
    if _is_hf_layer(block):
        recompute = functools.partial(checkpoint, use_reentrant=False)
        undo_func = _set_attr(block, "_gradient_checkpointing_func", recompute)
        undo_flag = _set_attr(block, "gradient_checkpointing", True)
        return UndoAll([undo_func, undo_flag])
    return _set_attr(block, "forward", CheckpointedForward(block))


def checkpoint_blocks(blocks: tuple[nn.Module, ...], *, every: int = 1) -> Callable[[], None]:
    """Checkpoint blocks ``0, every, 2*every, ...``; returns the undo of all of them."""
    return UndoAll([checkpoint_block(b) for i, b in enumerate(blocks) if i % every == 0])


def checkpointed_indices(blocks: tuple[nn.Module, ...]) -> list[int]:
    """Indices of the blocks that are checkpointed now (for reports and tests)."""
    return [
        i
        for i, b in enumerate(blocks)
        if b.__dict__.get("gradient_checkpointing") is True or "forward" in b.__dict__
    ]


class AutoCheckpointing:
    """``checkpointing='auto'``: the fewest blocks that fit ``budget``, chosen at the first step.

    At the first forward in training mode with gradients of the root model or of any module
    that holds the blocks (so it works whichever of them a trainer calls), a pre-forward hook
    runs a dry forward of that module on the same inputs, RNG state preserved, whose saved
    tensors are counted and dropped at once (so it holds no more than one op's temporaries). It
    measures, per block, the bytes the block would keep for backward (after compression, when
    ``pack`` is given) and the bytes of its inputs (what a checkpointed block keeps instead).
    The step is estimated as

        fixed + saved outside blocks + peak of what the blocks keep

    (see :func:`estimate_peak` for the last term), with ``fixed`` the memory allocated on CUDA
    (plus the gradients of trainable parameters not yet allocated) or, on CPU, parameters,
    buffers and three copies of the trainable parameters (gradient and two AdamW states). The
    fewest blocks that make the estimate fit are checkpointed; if none fits, all are, and a
    warning says so.

    Args:
        model: The root module.
        blocks: Its decoder blocks.
        budget: Bytes the step may use.
        pack: The activation hooks' pack function, or ``None`` (tensors saved as they are).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: tuple[nn.Module, ...],
        budget: int,
        pack: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.budget = budget
        self.pack = pack
        self.decision: dict[str, Any] = {}
        self._undos: list[Callable[[], None]] = []
        self._hooks = [
            m.register_forward_pre_hook(self._first_forward, with_kwargs=True, prepend=True)
            for m in holders(model, blocks)
        ]

    def remove(self) -> None:
        """Remove the hooks and the checkpointing they chose."""
        self._remove_hooks()
        for undo in reversed(self._undos):
            undo()
        self._undos.clear()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _first_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.decision:
            return
        self._remove_hooks()
        kept, inputs, outside = self.measure(args, kwargs, module)
        chosen = self.choose(kept, inputs, outside)
        self._undos = [checkpoint_block(self.blocks[i]) for i in chosen]
        self.decision.update(
            checkpointed=chosen, saved_per_block=kept, inputs_per_block=inputs, saved_outside=outside
        )

    def measure(
        self, args: Any, kwargs: Any, module: nn.Module | None = None
    ) -> tuple[list[int], list[int], int]:
        """Dry-run forward of ``module`` (default: the root): bytes each block keeps, each
        block's input bytes, bytes outside the blocks."""
        counter = _SavedCounter(self.pack, len(self.blocks))
        hooks = []
        for i, block in enumerate(self.blocks):
            hooks.append(block.register_forward_pre_hook(counter.enter(i), with_kwargs=True))
            hooks.append(block.register_forward_hook(counter.leave, always_call=True))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), counter.hooks():
                (module or self.model).forward(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return counter.per_block, counter.inputs, counter.outside

    def choose(self, kept: list[int], inputs: list[int], outside: int) -> list[int]:
        """Block indices to checkpoint: the fewest that fit, or all of them (with a warning).

        For each count ``k`` it tries the ``k`` blocks with the largest saving and the first
        ``k`` blocks (a block recomputed early in backward costs least: the blocks after it have
        freed their tensors by then) and keeps the one with the smaller estimate.
        """
        fixed = _fixed_bytes(self.model) + outside
        n = len(kept)
        by_saving = sorted(range(n), key=lambda i: (inputs[i] - kept[i], i))
        for k in range(n + 1):
            candidates = (set(by_saving[:k]), set(range(k)))
            best = min(candidates, key=lambda c: estimate_peak(c, kept, inputs))
            if fixed + estimate_peak(best, kept, inputs) <= self.budget:
                return sorted(best)
        worst = fixed + estimate_peak(set(range(n)), kept, inputs)
        warnings.warn(
            f"checkpointing='auto': the step is estimated at {worst:,} bytes with every block "
            f"checkpointed, over budget={self.budget:,}: raise the budget, or add "
            f"activations='int4' / offload={{'activations'}}.",
            UserWarning,
            stacklevel=2,
        )
        return list(range(n))


def holders(model: nn.Module, blocks: tuple[nn.Module, ...]) -> list[nn.Module]:
    """``model`` and every module between it and ``blocks`` (the containers left out: they have
    no forward), outermost first.

    >>> inner = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.ReLU()]))
    >>> [type(m).__name__ for m in holders(torch.nn.Sequential(inner), tuple(inner[0]))]
    ['Sequential', 'Sequential']
    """
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    found = [model]
    for block in blocks:
        parts = names.get(id(block), "").split(".")
        for depth in range(1, len(parts)):
            holder = modules[".".join(parts[:depth])]
            if not isinstance(holder, (nn.ModuleList, nn.ModuleDict)) and all(holder is not m for m in found):
                found.append(holder)
    return found


def estimate_peak(chosen: set[int], kept: list[int], inputs: list[int]) -> int:
    """Peak bytes of the saved tensors of the blocks when ``chosen`` are checkpointed.

    At the end of the forward every block holds its tensors (a checkpointed one its inputs);
    when backward recomputes block ``b``, the blocks after it have freed theirs, and ``b``
    holds all it saves again.

    >>> estimate_peak({0}, kept=[100, 100], inputs=[10, 10])
    110
    >>> estimate_peak({1}, kept=[100, 100], inputs=[10, 10])
    200
    """
    stored = [inputs[i] if i in chosen else kept[i] for i in range(len(kept))]
    peak, before = sum(stored), 0
    for i, held in enumerate(stored):
        if i in chosen:
            peak = max(peak, before + kept[i])
        before += held
    return peak


class _SavedCounter:
    """Saved-tensor hooks that count the bytes a forward would keep, then drop the tensors."""

    def __init__(self, pack: Callable[[torch.Tensor], Any] | None, n_blocks: int) -> None:
        self.pack = pack
        self.per_block = [0] * n_blocks
        self.inputs = [0] * n_blocks
        self.outside = 0
        self.block: int | None = None
        self._seen: dict[int, weakref.ref[Any]] = {}

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._count, _never_unpacked)

    def enter(self, index: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            self.block = index
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            self.inputs[index] = sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())

        return pre

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.block = None

    def _count(self, tensor: torch.Tensor) -> None:
        held = self.pack(tensor) if self.pack is not None else tensor
        nbytes = self._new_bytes(held)
        if self.block is None:
            self.outside += nbytes
        else:
            self.per_block[self.block] += nbytes

    def _new_bytes(self, held: Any) -> int:
        """Device bytes of what a pack returned, counted once per storage or packed entry."""
        if isinstance(held, torch.Tensor):
            if isinstance(held, nn.Parameter) or isinstance(getattr(held, "_base", None), nn.Parameter):
                return 0
            return self._once(held.untyped_storage(), lambda s: int(s.nbytes()))
        entry = getattr(held, "entry", None)
        if entry is None:
            return 0
        return self._once(entry, _entry_device_bytes)

    def _once(self, obj: Any, size: Callable[[Any], int]) -> int:
        ref = self._seen.get(id(obj))
        if ref is not None and ref() is obj:
            return 0
        self._seen[id(obj)] = weakref.ref(obj)
        return size(obj)


def _never_unpacked(_: Any) -> torch.Tensor:
    raise RuntimeError("the dry run of checkpointing='auto' has no backward")


def _entry_device_bytes(entry: Any) -> int:
    data = entry.data
    if not isinstance(data, tuple):
        return 0  # a host copy: nothing stays on the device
    return sum(t.numel() * t.element_size() for t in data)


def _fixed_bytes(model: nn.Module) -> int:
    params = list(model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    missing_grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad and p.grad is None)
    device = next((p.device for p in params), torch.device("cpu"))
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device)) + missing_grads
    weights = sum(t.numel() * t.element_size() for t in (*params, *model.buffers()))
    return weights + 3 * trainable
