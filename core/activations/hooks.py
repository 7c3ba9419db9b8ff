"""Saved-tensor hooks: compress and/or offload what autograd saves in a model's forward.

:class:`SavedTensorHooks` is installed on a model with module forward hooks:

- the root module's pre-forward hook enters ``torch.autograd.graph.saved_tensors_hooks`` (only
  when gradients are enabled and the model is training: ``eval()`` and ``no_grad`` see no
  change) and its post-forward hook, registered with ``always_call=True``, leaves it even when
  the forward raises;
- :meth:`SavedTensorHooks.step_scope` enters them for a whole block instead, for a trainer
  whose step calls an inner module rather than the root's ``forward`` (a ``LightningModule``
  whose ``training_step`` calls ``self.model(...)``); a root forward inside it does not enter
  them again;
- a tensor hook on each trainable parameter raises :class:`~ciuic.errors.InertTechniqueError`
  at the first backward if the saved-tensor hooks were never entered while a module of the
  model is training (the step ran without the scope and without a training forward of the
  root), and is removed once a backward saw them entered;
- the hooks of the modules that need it (a rule applies, a linear layer, a decoder block)
  keep a stack of *scopes*: the codec and rounding that the tensors saved right now get, and
  the block they belong to (what the offload prefetches one block ahead in backward).

Only the root pushes the autograd hooks: ``torch.utils.checkpoint``'s own hooks then stay the
innermost ones inside a checkpointed block, and its recomputation in backward is left alone.

What a pack does with a saved tensor:

1. the storage of a parameter or buffer: kept as it is, never compressed nor offloaded. It is
   compared by storage identity (:func:`ciuic.memory.fake.storage_key`, which fake tensors
   have too), not by type, with the storages read when the model's forward
   starts and when each module with weights starts its own (so weights that FSDP unshards in
   a module pre-forward hook registered before ciuic's count too; not tested with FSDP here);
2. integer tensors: kept (offloaded if asked); bool tensors (dropout masks): 1 bit each;
3. floating-point tensors under ``min_numel`` elements, non-finite ones, and views that
   cannot be rebuilt exactly: kept (offloaded if asked);
4. what is saved after the last decoder block has left (the final norm, ``lm_head``, the loss):
   never encoded (offloaded if asked). Backward uses and frees it first, at the start of
   backward, where the step peaks: there an encoding would hold its codes beside the decoded
   copy and cost float32 scratch of the logits' size, which doubled the temporaries at the
   loss (issue #10, 9c);
5. the rest: encoded with the scope's codec (stochastic rounding inside linear layers).

Packed data is keyed on the exact block of memory it came from (storage, offset, dtype, shape,
strides, version; see :mod:`ciuic.activations.layout`): a tensor saved twice (``x`` and
``x.view(...)``, the same softmax saved by two ops) is packed once and reference-counted by the
handles autograd holds. Unpacking decodes a fresh tensor each time, so a graph may be unpacked
more than once (``retain_graph``) and in any order.

The hooks object survives ``copy.deepcopy``, pickling and ``torch.save`` of the model it is
installed on: the module hooks are bound methods (or ``functools.partial`` of them), the
per-step state (entries, segments, the per-thread stacks, CUDA streams) is dropped on copy, and
the stochastic-rounding generators are copied, so a copy's next step is bitwise the original's
(:meth:`SavedTensorHooks.state_dict` saves them for a resumed run).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import nn

from ciuic.errors import InertTechniqueError, TechniqueUnavailableError
from ciuic.memory import tag_tensor
from ciuic.memory.fake import is_fake, storage_key

from .codecs import CodecSpec, Encoded, decode, encode, more_precise, pack_mask, unpack_mask
from .layout import Layout, flatten
from .offload import HostCopy, Offloader
from .options import ActivationOptions

_COMPILE_MESSAGE = (
    "ciuic activations='...'/offload={'activations'} cannot run under torch.compile: the codec of "
    "a saved tensor depends on the module that saves it, which a compiled graph does not tell its "
    "saved-tensor hooks. Run the model uncompiled, or compile it with activations='none' and no "
    "'activations' in offload (checkpointing alone installs no saved-tensor hooks)."
)


@dataclass(frozen=True)
class Scope:
    """How tensors saved inside one module are stored.

    Attributes:
        codec: Codec name (``'none'``: exact).
        stochastic: Stochastic rounding (inputs of linear layers).
        weight_shapes: Shapes of the module's own weights (and their transposes): a saved
            tensor of such a shape is taken for a copy of a weight (autocast's cast of a frozen
            weight, PEFT's merged ``W + BA`` of a LoRA on a parameter). An activation that
            happens to have such a shape only gets more bits.
        block: Whether the module is a decoder block (starts a new offload segment).
        dropout: Whether the module is a dropout layer (its saved floating-point mask,
            values ``0`` and ``1 / (1 - p)`` as the CPU kernel saves it, is stored in 1 bit).
        last: Whether the module is the last decoder block (what is saved after it is kept).
    """

    codec: str
    stochastic: bool = False
    weight_shapes: frozenset[tuple[int, ...]] = frozenset()
    block: bool = False
    dropout: bool = False
    last: bool = False


@dataclass
class PackStats:
    """What the hooks did so far (for reports and tests)."""

    packed: int = 0
    deduplicated: int = 0
    kept: int = 0
    parameters: int = 0
    offloaded: int = 0
    fetched: int = 0
    prefetched: int = 0
    by_codec: dict[str, int] = field(default_factory=dict)


class _Entry:
    """Packed data of one block of memory, shared by every handle saved from it."""

    __slots__ = ("__weakref__", "data", "kind", "meta", "segment", "storage")

    def __init__(self, kind: str, data: Any, meta: Any, segment: int, storage: Any) -> None:
        self.kind = kind  # 'codec' (Encoded), 'mask' (numel), 'raw'
        self.data = data  # Encoded | tuple of tensors | HostCopy
        self.meta = meta
        self.segment = segment
        self.storage = storage  # weak reference to the source storage (dedup check)


class _Handle:
    """What autograd holds for one saved tensor: the shared entry and how to rebuild the view."""

    __slots__ = ("entry", "layout")

    def __init__(self, entry: _Entry, layout: Layout) -> None:
        self.entry = entry
        self.layout = layout


class SavedTensorHooks:
    """Pack/unpack hooks for one model (see the module docstring).

    Args:
        model: The root module.
        codec: The config's codec (``'none'`` with ``offload`` only moves tensors).
        offload: Copy packed data to host memory (pinned, side stream on CUDA).
        options: Rules, group size, threshold.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
        >>> hooks = SavedTensorHooks(model, codec="int8", offload=False).install()
        >>> model(torch.randn(32, 64)).sum().backward()
        >>> hooks.stats.packed > 0
        True
        >>> hooks.remove()
    """

    _TRANSIENT = ("_local", "_entries", "_segments", "_offloaders", "_checks", "_param_ptrs")

    def __init__(
        self, model: nn.Module, *, codec: str, offload: bool, options: ActivationOptions | None = None
    ) -> None:
        self.model = model
        self.codec = codec
        self.offload = offload
        self.options = options or ActivationOptions()
        self.stats = PackStats()
        self._segment = 0
        self._tail = False  # the last decoder block has left: what is saved now is kept
        self._generators: dict[torch.device, torch.Generator] = {}
        self._handles: list[Any] = []
        self._watched: list[nn.Parameter] = []  # trainable parameters the inert check watches
        self._entered = False  # the saved-tensor hooks were entered at least once
        self._check_passed = False  # a backward ran after they were entered: the check can go
        self.scoped_modules: list[str] = []
        self._init_transient()

    def _init_transient(self) -> None:
        self._local = threading.local()
        self._entries: weakref.WeakValueDictionary[tuple[object, ...], _Entry] = weakref.WeakValueDictionary()
        self._segments: dict[int, list[weakref.ref[_Entry]]] = {}
        self._offloaders: dict[torch.device, Offloader] = {}
        self._checks: list[Any] = []
        self._param_ptrs: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        """What a copy keeps: everything but the per-step state (see the module docstring)."""
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_transient()
        if self._handles and not self._check_passed:  # parameters do not carry tensor hooks over
            self._arm_check()

    # -- installation ----------------------------------------------------------------------
    def install(self, blocks: tuple[nn.Module, ...] = ()) -> SavedTensorHooks:
        """Register the forward hooks on the model; ``blocks`` are its decoder blocks."""
        block_ids = {id(b) for b in blocks}
        last = id(blocks[-1]) if blocks else None
        self._param_ptrs = _storage_ptrs(self.model)
        self._handles.append(self.model.register_forward_pre_hook(self._enter))
        self._handles.append(self.model.register_forward_hook(self._exit, always_call=True))
        for name, module, scope in self._scopes(block_ids, last):
            self.scoped_modules.append(name)
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._push, scope)))
            self._handles.append(
                module.register_forward_hook(functools.partial(self._pop, scope), always_call=True)
            )
        self._watched = [p for p in self.model.parameters() if p.requires_grad]
        self._arm_check()
        return self

    def remove(self) -> None:
        """Remove every hook; saved data already packed stays valid until its graph is freed."""
        for handle in (*self._handles, *self._checks):
            handle.remove()
        self._handles.clear()
        self._checks.clear()

    def step_scope(self) -> contextlib.AbstractContextManager[None]:
        """A context manager that packs what a whole training step saves.

        Wrap a trainer's step in it when the step calls an inner module rather than the root's
        ``forward`` (a root forward inside it does not enter the hooks again). It does nothing
        when gradients are off or the root model is in ``eval()`` mode.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
            >>> hooks = SavedTensorHooks(model, codec="int8", offload=False).install()
            >>> with hooks.step_scope():
            ...     model[1](model[0](torch.randn(32, 64))).sum().backward()
            >>> hooks.stats.packed
            2
            >>> hooks.remove()
        """
        return self._scoped()

    @contextlib.contextmanager
    def _scoped(self) -> Iterator[None]:
        context = self._activate(self.model) if torch.is_grad_enabled() and self.model.training else None
        try:
            yield
        finally:
            self._deactivate(context)

    def _arm_check(self) -> None:
        check = _InertCheck(self)
        self._checks = [p.register_hook(check) for p in self._watched]

    def _check_backward(self) -> None:
        """Called by the tensor hooks on the trainable parameters at each backward."""
        if self._entered:
            self._check_passed = True  # the hooks go at the next entry (not inside backward)
            return
        if not any(m.training for m in self.model.modules()):
            return  # eval() with gradients: saved exactly, as asked
        names = {id(p): n for n, p in self.model.named_parameters()}
        first = next((names[id(p)] for p in self._watched if id(p) in names), "?")
        raise InertTechniqueError(
            f"activations={self.codec!r}/offload={self.offload}: a backward ran through the "
            f"trainable parameters of {type(self.model).__name__} (e.g. {first!r}) but ciuic's "
            f"saved-tensor hooks were never entered, so nothing was compressed or offloaded: the "
            f"step did not call the model ciuic was applied to in training mode. Wrap the step in "
            f"the step scope (`with ciuic.step_scope(model): ...`, or `handle.step_scope()`), apply "
            f"ciuic to the module the step calls, or call model.train() before the step."
        )

    def _scopes(self, block_ids: set[int], last: int | None = None) -> Iterator[tuple[str, nn.Module, Scope]]:
        """Modules whose saved tensors are stored differently from their parent's."""
        inherited: dict[str, str] = {}  # codec each module hands down to its submodules
        on_top: dict[str, str] = {}  # codec of the innermost scope pushed around a module's children
        for name, module in self.model.named_modules():
            up = name.rpartition(".")[0]
            parent, parent_top = inherited.get(up, self.codec), on_top.get(up, self.codec)
            if not name:
                parent = parent_top = self.codec
            rule = self.options.rule_for(name, type(module)) if self.codec != "none" else None
            codec = parent if rule is None else more_precise(self.codec, rule.codec)
            inherited[name] = codec if rule is None or rule.subtree else parent
            linear = isinstance(module, nn.Linear)
            weights = frozenset(
                shape
                for p in module.parameters(recurse=False)
                if p.dim() >= 2
                for shape in (tuple(p.shape), (*p.shape[:-2], p.shape[-1], p.shape[-2]))
            )
            block = id(module) in block_ids
            final = id(module) == last
            dropout = isinstance(module, nn.modules.dropout._DropoutNd)
            pushed = codec != parent_top or linear or bool(weights) or block or dropout or not name
            on_top[name] = codec if pushed else parent_top
            if pushed:
                yield name, module, Scope(codec, linear, weights, block, dropout, final)

    # -- module hooks ----------------------------------------------------------------------
    def _stack(self) -> list[Scope]:
        stack: list[Scope] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _push(self, scope: Scope, module: nn.Module, args: Any) -> None:
        self._stack().append(scope)
        if scope.block:
            self._segment += 1
            self._tail = False
        if scope.weight_shapes:  # weights FSDP unsharded in its pre-forward hook count too
            self._param_ptrs.update(_storage_ptrs(module, recurse=False))

    def _pop(self, scope: Scope, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack()
        if any(s is scope for s in stack):
            while stack.pop() is not scope:  # and any scope above it left by an exception
                pass
        if scope.block:
            self._segment += 1
            self._tail = scope.last

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _enter(self, module: nn.Module, args: Any) -> None:
        active = torch.is_grad_enabled() and module.training
        if active and _compiled(module):
            raise TechniqueUnavailableError(_COMPILE_MESSAGE)
        self._contexts().append(self._activate(module) if active else None)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        contexts = self._contexts()
        self._deactivate(contexts.pop() if contexts else None)

    def _activate(self, module: nn.Module) -> Any:
        """Enter the autograd hooks unless a scope of this thread already did; the context or None."""
        if getattr(self._local, "depth", 0) > 0:
            self._local.depth += 1
            return _NESTED
        if self._check_passed and self._checks:
            for handle in self._checks:
                handle.remove()
            self._checks.clear()
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._param_ptrs = _storage_ptrs(module)
        self._prune_segments()
        self._tail = False
        context.__enter__()
        self._local.depth = 1
        self._entered = True
        return context

    def _deactivate(self, context: Any) -> None:
        if context is None:
            return
        self._local.depth -= 1
        if context is not _NESTED:
            context.__exit__(None, None, None)

    def _contexts(self) -> list[Any]:
        """The autograd hook contexts this thread entered (one per root forward running)."""
        contexts: list[Any] | None = getattr(self._local, "contexts", None)
        if contexts is None:
            contexts = self._local.contexts = []
        return contexts

    def _prune_segments(self) -> None:
        """Forget the segments whose entries have all been freed (their graphs are gone)."""
        for segment in [s for s, refs in self._segments.items() if all(r() is None for r in refs)]:
            del self._segments[segment]

    # -- saving and loading the generators -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The stochastic-rounding generators' states, by device (save it with the model).

        Example:
            >>> import torch
            >>> hooks = SavedTensorHooks(torch.nn.Linear(64, 64), codec="int8", offload=False)
            >>> hooks.load_state_dict(hooks.state_dict())
        """
        return {"generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generators saved by :meth:`state_dict` (the next step then rounds alike)."""
        generators = {}
        for device, generator_state in state["generators"].items():
            generator = torch.Generator(torch.device(device))
            generator.set_state(generator_state)
            generators[torch.device(device)] = generator
        self._generators = generators

    # -- pack / unpack ---------------------------------------------------------------------
    def _scope(self) -> Scope:
        stack = self._stack()
        return stack[-1] if stack else Scope(self.codec)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if _is_parameter(tensor, self._param_ptrs):
            self.stats.parameters += 1
            return tensor.detach()
        scope = self._scope()
        codec = self._codec_for(tensor, scope)
        if codec is None:
            return self._keep(tensor)
        flat_layout = flatten(tensor)
        if flat_layout is None:
            return self._keep(tensor)
        flat, layout = flat_layout
        storage = tensor.untyped_storage()
        key = (layout.region or (storage_key(storage), tensor.shape, tensor.stride(), tensor._version), codec)
        entry = self._entries.get(key)
        if entry is not None and entry.storage() is storage:
            self.stats.deduplicated += 1
            return _Handle(entry, layout)
        entry = self._new_entry(flat, codec, scope, weakref.ref(storage))
        self._entries[key] = entry
        return _Handle(entry, layout)

    def _codec_for(self, tensor: torch.Tensor, scope: Scope) -> str | None:
        """The codec for ``tensor``: ``'mask'`` for bool, ``None`` to keep it as it is."""
        if tensor.dtype == torch.bool:
            return "mask" if tensor.numel() >= self.options.min_numel else None
        if not tensor.is_floating_point() or tensor.numel() < self.options.min_numel:
            return None
        if tensor.device.type == "meta" or not _dense_storage(tensor):
            return None
        if scope.dropout and _is_scaled_mask(tensor):
            return "mask"
        codec = "none" if self._tail else scope.codec
        if codec != "none" and tuple(tensor.shape) in scope.weight_shapes:
            codec = more_precise(codec, self.options.weight_copies)
        if codec == "none" and not self.offload:
            return None
        return codec

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor | _Handle:
        """Keep ``tensor`` exact: as it is, or moved to host memory when offloading."""
        if self.offload:
            flat_layout = flatten(tensor)
            if flat_layout is not None:
                flat, layout = flat_layout
                storage = weakref.ref(tensor.untyped_storage())
                return _Handle(self._new_entry(flat, "none", self._scope(), storage), layout)
        self.stats.kept += 1
        tag_tensor(tensor, "activations")
        return tensor.detach()

    def _new_entry(self, flat: torch.Tensor, codec: str, scope: Scope, storage: Any) -> _Entry:
        data: tuple[torch.Tensor, ...]
        meta: Encoded | int | None
        if codec == "mask" and flat.dtype == torch.bool:
            kind, data, meta = "mask", (pack_mask(flat),), flat.numel()
        elif codec == "mask":  # a dropout mask in floating point: 0 or one scale
            scale = flat.detach().amax().reshape(1)
            kind, data, meta = "mask", (pack_mask(flat != 0), scale), flat.numel()
        elif codec == "none":
            kind, data, meta = "raw", (flat.detach(),), None
        else:
            spec = CodecSpec(codec, self.options.group_size, stochastic=scope.stochastic)
            enc = encode(flat.detach(), spec, self._generator(flat.device) if scope.stochastic else None)
            kind, data, meta = "codec", enc.tensors(), enc.header()
            # inf or NaN in a group make its min/max (or absmax) non-finite: checking the
            # scales is as sound as checking the tensor, and reads far fewer elements
            # (not under fake tensors: they have no values, and a real run rarely falls back)
            if self.options.check_finite and not is_fake(enc.meta) and not bool(torch.isfinite(enc.meta).all()):
                codec, kind, data, meta = "none", "raw", (flat.detach(),), None
        self.stats.packed += 1
        self.stats.by_codec[codec] = self.stats.by_codec.get(codec, 0) + 1
        stored: tuple[torch.Tensor, ...] | HostCopy = data
        if self.offload:
            self.stats.offloaded += 1
            stored = self._offloader(flat.device).store(data)
        else:
            for t in data:
                tag_tensor(t, "activations")
        entry = _Entry(kind, stored, meta, self._segment, storage)
        if self.offload:  # what the prefetch walks
            self._segments.setdefault(self._segment, []).append(weakref.ref(entry))
        return entry

    def _unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        entry: _Entry = saved.entry
        if isinstance(entry.data, HostCopy):
            offloader = self._offloader(entry.data.device)
            self._prefetch_before(entry.segment, offloader)
            self.stats.fetched += 1
            tensors = offloader.fetch(entry.data)
        else:
            tensors = entry.data
        layout: Layout = saved.layout
        return layout.restore(_flat(entry, tensors))

    def _prefetch_before(self, segment: int, offloader: Offloader) -> None:
        """Start bringing back the entries of the nearest earlier segment that has any."""
        for earlier in sorted((s for s in self._segments if s < segment), reverse=True):
            live = [e for ref in self._segments[earlier] if (e := ref()) is not None]
            if not live:
                del self._segments[earlier]
                continue
            for e in live:
                if isinstance(e.data, HostCopy) and e.data.prefetched is None:
                    self.stats.prefetched += 1
                    offloader.prefetch(e.data)
            return

    # -- per-device helpers ----------------------------------------------------------------
    def _offloader(self, device: torch.device) -> Offloader:
        if device not in self._offloaders:
            self._offloaders[device] = Offloader(device)
        return self._offloaders[device]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.options.seed)
        return self._generators[device]


_NESTED = object()  # what a root forward inside a step scope pushes: the scope's hooks serve it


class _InertCheck:
    """Tensor hook on a trainable parameter: refuses a backward that the hooks did not see."""

    def __init__(self, hooks: SavedTensorHooks) -> None:
        self.hooks = hooks

    def __call__(self, grad: torch.Tensor) -> None:
        self.hooks._check_backward()


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs under ``torch.compile`` (``module.compile()`` or a wrapper)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return True
    frame: FrameType | None = sys._getframe(2)
    for _ in range(64):  # OptimizedModule.__call__ is a few frames up from the hook
        if frame is None:
            return False
        if type(frame.f_locals.get("self")).__name__ == "OptimizedModule":
            return True
        frame = frame.f_back
    return False


def _flat(entry: _Entry, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if entry.kind == "codec":
        header: Encoded = entry.meta
        return decode(header.replace_tensors(tensors))
    if entry.kind == "mask":
        mask = unpack_mask(tensors[0], entry.meta)
        return mask if len(tensors) == 1 else mask.to(tensors[1].dtype) * tensors[1]
    return tensors[0]


def _is_scaled_mask(tensor: torch.Tensor) -> bool:
    """Whether every element is 0 or the tensor's maximum (a dropout mask scaled by 1/(1-p)).
    Fake tensors have no values: taken as not a mask (the dropout of a CUDA device saves a bool
    mask, which needs no test)."""
    if is_fake(tensor):
        return False
    top = tensor.amax()
    return bool(((tensor == 0) | (tensor == top)).all())


def _storage_ptrs(model: nn.Module, recurse: bool = True) -> set[int]:
    tensors = [*model.parameters(recurse=recurse), *model.buffers(recurse=recurse)]
    return {storage_key(t.untyped_storage()) for t in tensors if t.device.type != "meta"}


def _is_parameter(tensor: torch.Tensor, ptrs: set[int]) -> bool:
    if isinstance(tensor, nn.Parameter):
        return True
    try:
        return storage_key(tensor.untyped_storage()) in ptrs
    except (RuntimeError, NotImplementedError):
        return True  # no storage of its own (a wrapper subclass): leave it alone


def _dense_storage(tensor: torch.Tensor) -> bool:
    return type(tensor) is torch.Tensor or type(tensor) is nn.Parameter or is_fake(tensor)
