"""`MemoryMeter`: exact live-tensor bytes per category, on CPU, CUDA and under FakeTensorMode.

How it counts. A ``TorchDispatchMode`` sees the output of every aten op run inside the meter;
each new tensor storage becomes a record (its byte size and a category) and a weak reference
to the storage removes the record the moment the storage is freed. The running total of
device records gives the peak exactly; at the peak the set of live records is kept, so the
breakdown is the one *at that moment*. Categories come from what the storage turns out to be:

- ``parameters``: registered as a module parameter or buffer (global registration hooks, or
  :meth:`MemoryMeter.track` for modules built before the meter);
- ``gradients``: a parameter's ``.grad`` (post-accumulate-grad hooks, and every optimizer step);
- ``optimizer``: a tensor in an optimizer's ``state`` (global optimizer step hooks);
- ``activations``: saved for backward and still held by autograd (a ``saved_tensors_hooks``
  pair; techniques that install their own hooks report their packed tensors with
  :func:`tag_allocations`);
- ``temporary``: everything else on the device;
- ``offloaded``: host memory (CPU storages when the device is CUDA, and storages that an
  offload technique allocates under ``tag_allocations("offloaded")``). Not part of the device
  peak.

A category found out after the peak (a gradient is allocated before autograd assigns it to
``.grad``) still applies to the peak breakdown; a tensor that stops being saved for backward
after the peak keeps the category it had at the peak.

Frozen parameters (LoRA) are fine: nothing here hooks a tensor that does not require grad.
Under FakeTensorMode, enter the meter *inside* the fake mode so it sees the fake ops, and pass
``device="cuda"`` when the fake tensors are CUDA tensors on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ciuic.errors import BudgetExceededError
from ciuic.memory.fake import is_fake
from ciuic.units import format_bytes

DEVICE_CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporary")
"""Categories of device memory; at the peak they sum to ``peak_bytes``."""
CATEGORIES = (*DEVICE_CATEGORIES, "offloaded")
"""All categories reported, ``offloaded`` being host memory."""

# A storage is counted in the strongest category it has shown: a parameter saved for backward
# stays a parameter.
_PRIORITY = {
    "temporary": 0,
    "activations": 1,
    "offloaded": 2,
    "optimizer": 3,
    "gradients": 4,
    "parameters": 5,
}

_ACTIVE: list[MemoryMeter] = []
_LOCAL = threading.local()


@contextlib.contextmanager
def tag_allocations(category: str) -> Iterator[None]:
    """Count every tensor allocated inside the block under ``category`` in all active meters.

    For techniques: an activation codec packs inside ``tag_allocations("activations")``, an
    offload copies to host inside ``tag_allocations("offloaded")`` (on CPU that is how host
    memory is told apart from device memory). A no-op when no meter is active.
    """
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r} is unknown: choose one of {', '.join(CATEGORIES)}.")
    previous = getattr(_LOCAL, "category", None)
    _LOCAL.category = category
    try:
        yield
    finally:
        _LOCAL.category = previous


def tag_tensor(tensor: torch.Tensor, category: str) -> None:
    """Put an existing tensor's storage under ``category`` in all active meters."""
    for meter in _ACTIVE:
        meter._tag(tensor, category)


_HOST_TENSORS: weakref.WeakKeyDictionary[nn.Module, Callable[[], list[torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def register_host_tensors(module: nn.Module, source: Callable[[], list[torch.Tensor]] | None) -> None:
    """Let ``MemoryMeter.track(module)`` count host tensors a technique keeps for ``module``
    (the weight offload's host copies) as ``offloaded``; ``source=None`` unregisters.

    Example:
        >>> import torch
        >>> from ciuic.memory import MemoryMeter, register_host_tensors
        >>> model, host = torch.nn.Linear(4, 4), [torch.zeros(256)]
        >>> register_host_tensors(model, lambda: host)
        >>> with MemoryMeter(device="cpu", track=(model,)) as meter:
        ...     pass
        >>> meter.peak_offloaded_bytes
        1024
        >>> register_host_tensors(model, None)
    """
    if source is None:
        _HOST_TENSORS.pop(module, None)
    else:
        _HOST_TENSORS[module] = source


def storage_resized(tensor: torch.Tensor) -> None:
    """Tell all active meters that ``tensor``'s storage was resized in place.

    ``untyped_storage().resize_()`` runs outside the dispatcher, so a meter sees a storage grow
    only when an op next writes it, and never sees it shrink: a technique that frees a storage
    this way (the weight offload releasing a block) calls this after the resize.
    """
    for meter in _ACTIVE:
        meter._update(tensor)


_OP_WORKSPACE: dict[str, Callable[..., int]] = {}


def register_op_workspace(op: str, workspace: Callable[..., int]) -> None:
    """Count the scratch memory an op allocates and frees inside its own kernel.

    A dispatch mode sees an op's inputs and outputs, not what its kernel allocates in between
    (bitsandbytes' ``gemm_4bit`` dequantizes the whole weight, then multiplies). For such an op,
    ``workspace(*args, **kwargs)`` gives those bytes; every active meter counts them as
    ``temporary`` beside the op's output, at the moment the output appears, then frees them.
    Fake kernels do not allocate them either, so this keeps fake and real runs alike and both
    honest.

    Args:
        op: The op's qualified name, ``"namespace::name"`` (every overload).
        workspace: ``workspace(*args, **kwargs) -> int`` bytes, on the device of the op's first
            tensor argument.

    Example:
        >>> register_op_workspace("bitsandbytes::gemm_4bit", lambda A, B, shapeB, *a, **k: 0)
    """
    _OP_WORKSPACE[op] = workspace


class _Record:
    __slots__ = ("category", "host", "nbytes", "saved_refs")

    def __init__(self, nbytes: int, category: str, host: bool) -> None:
        self.nbytes = nbytes
        self.category = category
        self.host = host
        self.saved_refs = 0


class _SavedForBackward:
    """What the meter's pack hook stores: the tensor, and a count on its record while held."""

    __slots__ = ("meter", "record", "tensor")

    def __init__(self, tensor: torch.Tensor, record: _Record | None, meter: MemoryMeter) -> None:
        self.tensor = tensor
        self.record = record
        self.meter = meter
        if record is not None:
            record.saved_refs += 1

    def __del__(self) -> None:
        if self.record is not None:
            self.meter._release_saved(self.record)


# torch.tensor(...) allocates outside the dispatcher and shows up only as lift_fresh of that
# new tensor: its output is an allocation although it aliases the op's input.
_FRESH_OPS = {torch.ops.aten.lift_fresh.default}


class _AllocationMode(TorchDispatchMode):
    def __init__(self, meter: MemoryMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or self.meter._update(leaf):
                continue
            if func in _FRESH_OPS:
                self.meter._see(leaf)
                continue
            if inputs is None:  # an output aliasing an input (a view) is no new allocation
                inputs = {id(s) for s in map(_storage_of, _tensors_in(args, kwargs)) if s is not None}
            if id(_storage_of(leaf)) not in inputs:
                self.meter._see(leaf)
        workspace = _OP_WORKSPACE.get(func._schema.name) if _OP_WORKSPACE else None
        if workspace is not None:
            self.meter._scratch(workspace(*args, **(kwargs or {})), _tensors_in(args, kwargs)[0].device)
        return out


def _tensors_in(args: Any, kwargs: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]


@dataclass(frozen=True)
class MemoryReading:
    """The figures of one measurement (what ``MemoryMeter.reading()`` returns).

    ``cuda_max_allocated`` is the cross-check on a real GPU: how far
    ``torch.cuda.max_memory_allocated`` rose above what was allocated when the meter was
    entered (the caching allocator rounds each block up to 512 bytes); ``None`` elsewhere.
    """

    device: str
    peak_bytes: int
    peak_by_category: dict[str, int]
    peak_offloaded_bytes: int
    cuda_max_allocated: int | None

    def report(self) -> str:
        """A fixed-width table of the breakdown at the peak."""
        rows = [(name, self.peak_by_category[name]) for name in DEVICE_CATEGORIES]
        width = len("offloaded (host)") + 2
        lines = [f"memory at the peak on {self.device}", f"  {'category':<{width}}{'bytes':>14}  {'':>12}"]
        lines += [f"  {name:<{width}}{n:>14,}  {format_bytes(n):>12}" for name, n in rows]
        lines.append(
            f"  {'peak (device)':<{width}}{self.peak_bytes:>14,}  {format_bytes(self.peak_bytes):>12}"
        )
        off = self.peak_by_category["offloaded"]
        lines.append(f"  {'offloaded (host)':<{width}}{off:>14,}  {format_bytes(off):>12}")
        if self.cuda_max_allocated is not None:
            lines.append(f"  torch.cuda.max_memory_allocated growth: {self.cuda_max_allocated:,} B")
        return "\n".join(lines)


class MemoryMeter:
    """Measure the peak memory of the code run inside it, broken down by category.

    Args:
        device: The device whose memory is the "device" peak (``"cpu"``, ``"cuda"``...);
            default CUDA when available, else CPU.
        track: Modules and optimizers built before the meter, whose existing tensors are to
            be counted (tensors allocated inside the meter are always counted).
        budget: Device bytes the code may hold live; an allocation that takes the live total
            over it raises :class:`ciuic.errors.BudgetExceededError` (a
            ``torch.OutOfMemoryError``), as a device of that size would. ``None``: no limit.
            This is how a CPU run enforces ``CiuicConfig(budget=...)`` and how tests make a
            step run out of memory without a GPU.

    Example:
        >>> import torch
        >>> from ciuic import MemoryMeter
        >>> with MemoryMeter() as meter:
        ...     model = torch.nn.Linear(1024, 1024)
        ...     model(torch.randn(8, 1024)).sum().backward()
        >>> meter.peak_by_category["parameters"]
        4198400
    """

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        track: tuple[object, ...] = (),
        budget: int | None = None,
    ) -> None:
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"budget={budget!r} is not allowed: give an int number of bytes >= 1, or None.")
        self.budget = budget
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self._live: dict[int, _Record] = {}
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._device_total = 0
        self._host_total = 0
        self._peak = 0
        self._peak_host = 0
        self._peak_records: list[tuple[_Record, str]] = []
        self._peak_dirty = False
        # ids, not weak references: a weakref on a parameter makes torch.utils.swap_tensors
        # (Module.to_empty, .to() of tensor subclasses) refuse to swap it.
        self._hooked_params: set[int] = set()
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._hooks: list[Any] = []
        self._stack: contextlib.ExitStack | None = None
        self._cuda_max: int | None = None
        self._cuda_start = 0
        self._used = False
        self._counts_fake = False
        for obj in track:
            _check_trackable(obj)
        self._pending_track = track

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> MemoryMeter:
        if self._stack is not None:
            raise RuntimeError("this MemoryMeter is already running: use a new one for each measurement.")
        if self._used:
            raise RuntimeError("this MemoryMeter has already been used: use a new one for each measurement.")
        # A meter started outside FakeTensorMode measures real memory: a fake step run inside it
        # (the planner pricing a config at a run's first step) holds none and is not counted.
        self._counts_fake = _fake_mode_active()
        stack = contextlib.ExitStack()
        self._hooks = [
            nn_module.register_module_parameter_registration_hook(self._on_parameter),
            nn_module.register_module_buffer_registration_hook(self._on_buffer),
            optim_module.register_optimizer_step_pre_hook(self._on_step_pre),
            optim_module.register_optimizer_step_post_hook(self._on_step_post),
        ]
        stack.callback(self._remove_hooks)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        stack.enter_context(_AllocationMode(self))
        _ACTIVE.append(self)
        stack.callback(_ACTIVE.remove, self)
        self._stack = stack
        try:
            self._start()
        except BaseException:
            self._stack = None
            stack.close()
            raise
        return self

    def _start(self) -> None:
        if self._is_real_cuda():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        self.track(*self._pending_track)

    def __exit__(self, *exc: object) -> None:
        self._close_peak()
        if self._is_real_cuda():
            torch.cuda.synchronize(self.device)
            self._cuda_max = torch.cuda.max_memory_allocated(self.device) - self._cuda_start
        assert self._stack is not None
        self._stack.close()
        self._stack = None
        self._used = True
        with self._lock:
            self._refs.clear()  # drop the weak references: no callback reaches a closed meter

    def _is_real_cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available() and not _fake_mode_active()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- results ---------------------------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        """Highest device bytes live at any moment inside the meter."""
        return self._peak

    @property
    def peak_by_category(self) -> dict[str, int]:
        """Device bytes by category at the moment of the peak, plus host bytes as ``offloaded``."""
        self._close_peak()
        totals = dict.fromkeys(CATEGORIES, 0)
        for record, category in self._peak_records:
            totals[_category_at_peak(record, category)] += record.nbytes
        return totals

    @property
    def peak_offloaded_bytes(self) -> int:
        """Highest host (offloaded) bytes live at any moment inside the meter."""
        return self._peak_host

    @property
    def current_bytes(self) -> int:
        """Device bytes live now (inside the meter) or at its exit."""
        return self._device_total

    def reading(self) -> MemoryReading:
        """All figures of the measurement as one immutable object."""
        return MemoryReading(
            device=str(self.device),
            peak_bytes=self.peak_bytes,
            peak_by_category=self.peak_by_category,
            peak_offloaded_bytes=self.peak_offloaded_bytes,
            cuda_max_allocated=self._cuda_max,
        )

    def report(self) -> str:
        """A readable table: bytes per category at the peak, the peak, and host bytes."""
        return self.reading().report()

    # -- tracking --------------------------------------------------------------------------
    def track(self, *objects: object) -> MemoryMeter:
        """Count the existing tensors of modules and optimizers built before the meter."""
        for obj in objects:
            _check_trackable(obj)
            if isinstance(obj, nn.Module):
                for param in obj.parameters():
                    self._on_parameter(None, "", param)
                for buf in obj.buffers():
                    self._tag(buf, "parameters", add=True)
                for tensor in _quantization_state(obj):
                    self._tag(tensor, "parameters", add=True)
                for module in obj.modules():
                    for tensor in _HOST_TENSORS[module]() if module in _HOST_TENSORS else ():
                        self._tag(tensor, "offloaded", add=True)
            else:
                self._on_step_pre(obj, (), {})  # type: ignore[arg-type]
                self._on_step_post(obj, (), {})  # type: ignore[arg-type]
        return self

    def _update(self, tensor: torch.Tensor) -> bool:
        """For a tensor whose storage is already recorded, follow a resize; False if unknown."""
        storage = _storage_of(tensor)
        if storage is None:
            return True
        with self._lock:
            record = self._live.get(id(storage))
            if record is None:
                return False
            self._resize(record, storage.nbytes())
            return True

    def _see(self, tensor: torch.Tensor) -> _Record | None:
        """Record the storage of a tensor an op returned (a no-op if already recorded)."""
        storage = _storage_of(tensor)
        if storage is None or (not self._counts_fake and is_fake(tensor)):
            return None
        key = id(storage)
        with self._lock:
            record = self._live.get(key)
            if record is not None:
                self._resize(record, storage.nbytes())
                return record
            category = getattr(_LOCAL, "category", None) or "temporary"
            host = tensor.device.type != self.device.type or category == "offloaded"
            if host and tensor.device.type not in ("cpu", self.device.type):
                return None  # another accelerator, or meta: not memory this meter measures
            record = _Record(storage.nbytes(), "offloaded" if host else category, host)
            self._live[key] = record
            self._refs[key] = weakref.ref(storage, self._free_callback(key))
            self._add(record, record.nbytes)
            return record

    def _scratch(self, nbytes: int, device: torch.device) -> None:
        """Count ``nbytes`` of kernel scratch as live for an instant (see register_op_workspace)."""
        if nbytes <= 0 or device.type != self.device.type:
            return
        with self._lock:
            record = _Record(nbytes, "temporary", False)
            key = -id(record)  # no storage id is negative
            self._live[key] = record
            self._add(record, nbytes)
            self._close_peak()
            del self._live[key]
            self._add(record, -nbytes)

    def _resize(self, record: _Record, nbytes: int) -> None:
        if nbytes != record.nbytes:
            delta = nbytes - record.nbytes
            if delta < 0:
                self._close_peak()
            record.nbytes = nbytes
            self._add(record, delta)

    def _add(self, record: _Record, delta: int) -> None:
        if record.host:
            self._host_total += delta
            self._peak_host = max(self._peak_host, self._host_total)
            return
        self._device_total += delta
        if self._device_total > self._peak:
            self._peak = self._device_total
            self._peak_dirty = True
        if self.budget is not None and delta > 0 and self._device_total > self.budget:
            self._over_budget(delta)

    def _over_budget(self, requested: int) -> None:
        total, budget = self._device_total, self.budget
        assert budget is not None
        raise BudgetExceededError(
            f"memory budget exceeded on {self.device}: an allocation of {format_bytes(requested)} "
            f"({requested:,} B) takes the live total to {format_bytes(total)} ({total:,} B), over the "
            f"budget of {format_bytes(budget)} ({budget:,} B).",
            peak_bytes=total,
            budget=budget,
        )

    def _free_callback(self, key: int) -> Callable[[object], None]:
        return lambda _ref: self._free(key)

    def _free(self, key: int) -> None:
        with self._lock:
            record = self._live.get(key)
            if record is None:
                return
            self._close_peak()
            del self._live[key]
            self._refs.pop(key, None)
            self._add(record, -record.nbytes)

    def _close_peak(self) -> None:
        """Keep the live set if the running total is the peak and is about to go down."""
        with self._lock:
            if self._peak_dirty:
                self._peak_dirty = False
                self._peak_records = [(r, r.category) for r in self._live.values()]

    def _tag(self, tensor: torch.Tensor | None, category: str, *, add: bool = False) -> _Record | None:
        if tensor is None:
            return None
        storage = _storage_of(tensor)
        if storage is None:
            return None
        with self._lock:
            record = self._live.get(id(storage))
            if record is None:
                if not add:
                    return None
                record = self._see(tensor)
                if record is None:
                    return None
            if record.host and category != "offloaded":
                return record  # host memory stays "offloaded": it is not part of the device peak
            if _PRIORITY[category] > _PRIORITY[record.category]:
                if category == "offloaded" and not record.host:
                    self._close_peak()
                    self._add(record, -record.nbytes)
                    record.host = True
                    self._add(record, record.nbytes)
                record.category = category
            return record

    # -- hooks -----------------------------------------------------------------------------
    def _on_parameter(self, module: nn.Module | None, name: str, param: torch.Tensor | None) -> None:
        if param is None or (not self._counts_fake and is_fake(param)):
            return
        self._tag(param, "parameters", add=True)
        self._tag(param.grad, "gradients", add=True)
        if param.requires_grad and id(param) not in self._hooked_params:
            self._hooked_params.add(id(param))
            self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def _on_buffer(self, module: nn.Module, name: str, buffer: torch.Tensor | None) -> None:
        self._tag(buffer, "parameters", add=True)

    def _on_grad(self, param: torch.Tensor) -> None:
        self._tag(param.grad, "gradients", add=True)

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizers.add(optimizer)
        for group in optimizer.param_groups:
            for param in group["params"]:
                self._tag(param, "parameters", add=True)
                self._tag(param.grad, "gradients", add=True)

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for state in optimizer.state.values():
            for value in tree_leaves(state):
                if isinstance(value, torch.Tensor):
                    self._tag(value, "optimizer", add=True)

    def _pack(self, tensor: torch.Tensor) -> _SavedForBackward:
        record = None
        if not _is_parameter_view(tensor):
            record = self._tag(tensor, "activations", add=True)
        # A detached alias, not the tensor itself: saving an op's own output with its grad_fn
        # would make a reference cycle that only the garbage collector frees.
        return _SavedForBackward(tensor.detach(), record, self)

    def _release_saved(self, record: _Record) -> None:
        with self._lock:
            record.saved_refs -= 1
            if record.saved_refs == 0 and record.category == "activations":
                self._close_peak()
                record.category = "temporary"

    @staticmethod
    def _unpack(saved: _SavedForBackward) -> torch.Tensor:
        return saved.tensor


def _category_at_peak(record: _Record, category_then: str) -> str:
    # Later knowledge refines a device category (a temporary that became a gradient) but never
    # moves a record between device and host, nor demotes it.
    now = record.category
    if now != "offloaded" and _PRIORITY[now] > _PRIORITY[category_then]:
        return now
    return category_then


def _quantization_state(model: nn.Module) -> list[torch.Tensor]:
    """Tensors bitsandbytes keeps beside quantized weights as plain attributes, not buffers.

    A 4-bit weight's ``quant_state`` (``absmax``, ``code``, ``offset`` and the nested state of
    double quantization) and LLM.int8's ``SCB`` (on the weight, or on ``layer.state``) are part
    of the weights' memory but invisible to ``parameters()`` and ``buffers()``.
    """
    return [t for module in model.modules() for t in own_quantization_state(module)]


def own_quantization_state(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of :func:`_quantization_state` held by ``module`` itself (not its children)."""
    found: list[object] = [getattr(getattr(module, "state", None), "SCB", None)]
    for param in module.parameters(recurse=False):
        found.append(getattr(param, "SCB", None))
        state = getattr(param, "quant_state", None)
        while state is not None:
            found.extend(getattr(state, name, None) for name in ("absmax", "code", "offset"))
            state = getattr(state, "state2", None)
    return [t for t in found if isinstance(t, torch.Tensor)]


def _check_trackable(obj: object) -> None:
    if not isinstance(obj, (nn.Module, torch.optim.Optimizer)):
        raise TypeError(f"MemoryMeter.track takes modules and optimizers, not {type(obj).__name__}.")


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None  # sparse, nested or wrapper tensors without a storage of their own


def _is_parameter_view(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or isinstance(getattr(tensor, "_base", None), nn.Parameter)


def _fake_mode_active() -> bool:
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None
