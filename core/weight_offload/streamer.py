"""Stream a model's frozen weights from host memory, one decoder block ahead.

:class:`WeightStreamer` groups the model's frozen storages (:class:`~.slots.Slot`) into
*units*: each decoder block (everything frozen inside it), and each module outside the blocks
that holds frozen tensors itself (embeddings, final norm, ``lm_head``). Module forward hooks
drive it:

- forward: a unit's pre-hook refills its storages (waiting for a prefetch already started) and,
  for a block, starts refilling the next block; its post-hook frees them. The device holds
  the running block and the next one;
- backward: autograd still holds views of the freed storages (``weight.t()``, bitsandbytes'
  saved weight and quantization state). An identity autograd node on the unit's outputs
  refills them when backward reaches the unit (and starts refilling the previous block); one
  on its inputs frees them when backward leaves it; what is still held when backward ends is
  freed then. A recomputation (``checkpointing``) runs inside backward, after the refill: the
  hooks leave the storages alone there;
- routed experts stored by :class:`~ciuic.weights.experts.QuantizedExperts`: their rows stay on
  the host and ``row_source`` copies one expert's rows when the expert loop asks for them (the
  router's picks only), in forward and again in backward.

The copies are the :class:`~ciuic.activations.offload.Offloader`'s (side stream and events on
CUDA; synchronous on CPU and under FakeTensorMode), and they are exact: training is bitwise
the same as without the offload.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ciuic.activations.offload import Offloader
from ciuic.errors import ApplyError
from ciuic.memory import register_host_tensors

from .slots import Slot, own_frozen_tensors, storage_key


class Unit:
    """A group of storages fetched together (a decoder block, or one module outside them)."""

    __slots__ = ("block", "index", "name", "slots")

    def __init__(self, index: int, name: str, block: int | None) -> None:
        self.index = index
        self.name = name
        self.block = block  # position among the decoder blocks, None outside them
        self.slots: list[Slot] = []

    @property
    def nbytes(self) -> int:
        """Bytes of its storages."""
        return sum(s.nbytes for s in self.slots)


class ExpertRows:
    """``QuantizedExperts.row_source``: one expert's rows, copied from the host copies now."""

    def __init__(self, streamer: WeightStreamer, name: str, module: nn.Module) -> None:
        self.streamer = streamer
        self.name = name
        self.module = module

    def _host(self, buffer: str) -> torch.Tensor:
        tensor: torch.Tensor = getattr(self.module, buffer)
        return self.streamer.slot_of(tensor).host_as(tensor)

    def __call__(self, param: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.streamer.expert_fetches.append((self.name, param, expert))
        rows = (self._host(f"{param}_data")[expert], self._host(f"{param}_absmax")[expert])
        data, absmax = self.streamer.offloader.copy_now(rows)
        return data, absmax


class WeightStreamer:
    """Keeps a model's frozen weights in host memory and streams them in (module docstring).

    Args:
        model: The root module.
        blocks: Its decoder blocks, in execution order.

    Attributes:
        fetches: Host -> device copies of each unit so far, by unit name.
        expert_fetches: ``(module, tensor, expert)`` of every routed expert's rows copied.
        resident_bytes / max_resident_bytes: Frozen bytes on the device now / at most so far.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3))).requires_grad_(False)
        >>> streamer = WeightStreamer(model, tuple(model)).install()
        >>> model(torch.randn(2, 8)).shape, streamer.resident_bytes
        (torch.Size([2, 8]), 0)
        >>> streamer.remove()
    """

    def __init__(self, model: nn.Module, blocks: tuple[nn.Module, ...]) -> None:
        self.model = model
        self.blocks = blocks
        self.units: list[Unit] = []
        self.slots: dict[int, Slot] = {}
        self.expert_modules: list[str] = []
        self.fetches: dict[str, int] = {}
        self.expert_fetches: list[tuple[str, str, int]] = []
        self.resident_bytes = 0
        self.max_resident_bytes = 0
        self.offloader = Offloader(torch.device("cpu"))
        self._handles: list[Any] = []
        self._graph_tasks: set[int] = set()

    # -- installation ----------------------------------------------------------------------
    def install(self) -> WeightStreamer:
        """Copy the frozen storages to host memory, free them on the device, hook the units."""
        owners = self._owners()
        if not owners:
            raise ApplyError(
                f"offload={{'weights'}}: {type(self.model).__name__} has no frozen weights to keep in host "
                f"memory (every parameter requires grad): freeze the base model (LoRA), or leave 'weights' "
                f"out of offload."
            )
        self.offloader = _offloader_for(next(t for _, _, tensors in owners for t in tensors))
        for unit, _, tensors in owners:
            slots = [self._slot(tensor) for tensor in tensors]
            if unit is not None:
                unit.slots.extend(slot for slot in dict.fromkeys(slots) if slot not in unit.slots)
        self.units = list({id(u): u for u, _, _ in owners if u is not None}.values())
        for slot in self.slots.values():
            slot.release()
        self._install_expert_rows()
        self._install_hooks()
        register_host_tensors(self.model, _HostTensors(self))
        self.model.__dict__["__getstate__"] = _RefilledState(self)
        return self

    def host_tensors(self) -> list[torch.Tensor]:
        """The host copies (what ``MemoryMeter.track(model)`` counts as ``offloaded``)."""
        return [slot.copy.host[0] for slot in self.slots.values()]

    def _owners(self) -> list[tuple[Unit | None, nn.Module, list[torch.Tensor]]]:
        """``(unit, module, frozen tensors)`` for every module holding frozen tensors itself
        (the unit ``None``: routed-expert rows, fetched per expert instead)."""
        from ciuic.weights.experts import QuantizedExperts

        prefixes = {id(b): i for i, b in enumerate(self.blocks)}
        block_units: dict[int, Unit] = {}
        owners: list[tuple[Unit | None, nn.Module, list[torch.Tensor]]] = []
        block_of: dict[str, int] = {}
        for name, module in self.model.named_modules():
            if id(module) in prefixes:
                block_of[name] = prefixes[id(module)]
            tensors = own_frozen_tensors(module)
            if not tensors:
                continue
            if isinstance(module, QuantizedExperts):
                buffers = {id(b) for b in module.buffers(recurse=False)}
                owners.append((None, module, [t for t in tensors if id(t) in buffers]))
                self.expert_modules.append(name)
                tensors = [t for t in tensors if id(t) not in buffers]
                if not tensors:
                    continue
            block = next((i for prefix, i in block_of.items() if _inside(name, prefix)), None)
            if block is None:
                unit = Unit(len(self.blocks) + len(owners), name or "<root>", None)
            else:
                unit = block_units.setdefault(block, Unit(block, f"block {block}", block))
            owners.append((unit, module, tensors))
        return owners

    def _slot(self, tensor: torch.Tensor) -> Slot:
        key = storage_key(tensor)
        if key not in self.slots:
            self.slots[key] = Slot.of(tensor, self.offloader)
        return self.slots[key]

    def slot_of(self, tensor: torch.Tensor) -> Slot:
        """The slot holding ``tensor``'s storage."""
        return self._slots()[storage_key(tensor)]

    def _install_expert_rows(self) -> None:
        for name in self.expert_modules:
            module = self.model.get_submodule(name)
            module.__dict__["row_source"] = ExpertRows(self, name, module)

    def _install_hooks(self) -> None:
        modules = dict(self.model.named_modules())
        for unit in self.units:
            module = (
                self.blocks[unit.block]
                if unit.block is not None
                else modules[unit.name.replace("<root>", "")]
            )
            pre = functools.partial(self._pre, unit)
            post = functools.partial(self._post, unit)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
        self._handles.append(
            self.model.register_state_dict_post_hook(functools.partial(self._host_state_dict))
        )

    def remove(self) -> None:
        """Refill every storage from its host copy (bitwise the weights before), unhook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        register_host_tensors(self.model, None)
        self.model.__dict__.pop("__getstate__", None)
        for slot in self.slots.values():
            slot.refill_now(self.offloader)
            slot.holders.clear()
        for name in self.expert_modules:
            self.model.get_submodule(name).__dict__.pop("row_source", None)
        if self.offloader.is_cuda:
            torch.cuda.synchronize(self.offloader.device)
        self.slots.clear()
        self.units.clear()
        self.resident_bytes = 0

    # -- fetching and freeing --------------------------------------------------------------
    def fetch(self, unit: Unit) -> None:
        """Make ``unit``'s storages usable on the current stream."""
        copied = 0
        for slot in unit.slots:
            copied += slot.refill_now(self.offloader)
            slot.holders.add(unit.index)
        self._count(unit, copied)

    def prefetch(self, unit: Unit) -> None:
        """Start refilling ``unit``'s storages (on the side stream on CUDA)."""
        copied = 0
        for slot in unit.slots:
            copied += slot.prefetch(self.offloader)
            slot.holders.add(unit.index)
        self._count(unit, copied)

    def release(self, unit: Unit) -> None:
        """Free the storages of ``unit`` that no other unit holds."""
        for slot in unit.slots:
            slot.holders.discard(unit.index)
            if not slot.holders and slot.resident:
                slot.release()
                self.resident_bytes -= slot.nbytes

    def _count(self, unit: Unit, copied: int) -> None:
        if copied:
            self.fetches[unit.name] = self.fetches.get(unit.name, 0) + 1
            self.resident_bytes += copied
            self.max_resident_bytes = max(self.max_resident_bytes, self.resident_bytes)

    def _neighbour(self, unit: Unit, step: int) -> Unit | None:
        if unit.block is None:
            return None
        index = unit.block + step
        return next((u for u in self.units if u.block == index), None)

    # -- hooks -----------------------------------------------------------------------------
    def _pre(self, unit: Unit, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        if _in_backward():  # a recomputation: backward already refilled the unit
            self.fetch(unit)
            return args, kwargs
        self.fetch(unit)
        following = self._neighbour(unit, 1)
        if following is not None:
            self.prefetch(following)
        if torch.is_grad_enabled():
            args, kwargs = _through(_FreeInBackward, self, unit, (args, kwargs))
        return args, kwargs

    def _post(self, unit: Unit, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if _in_backward():
            return output
        self.release(unit)
        if torch.is_grad_enabled():
            return _through(_FetchInBackward, self, unit, output)
        return output

    def backward_reached(self, unit: Unit) -> None:
        """Backward is about to run ``unit``'s nodes: refill it, start on the previous block."""
        task = torch._C._current_graph_task_id()
        if task not in self._graph_tasks:
            self._graph_tasks.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._backward_done, task)
            )
        self.fetch(unit)
        previous = self._neighbour(unit, -1)
        if previous is not None:
            self.prefetch(previous)

    def _backward_done(self, task: int) -> None:
        self._graph_tasks.discard(task)
        for unit in self.units:
            self.release(unit)

    def _host_state_dict(self, module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
        """``state_dict`` while offloaded: the host copy of every freed storage."""
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                slot = self._slots().get(storage_key(value))
                if slot is not None and not slot.resident:
                    state[key] = slot.host_as(value)

    def refill_all(self) -> None:
        """Refill every storage (before the model is copied: the copy reads the device tensors);
        each unit's next forward frees it again."""
        for slot in self.slots.values():
            self.resident_bytes += slot.refill_now(self.offloader)
        if self.offloader.is_cuda:
            torch.cuda.synchronize(self.offloader.device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_graph_tasks"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stale_keys = True
        register_host_tensors(self.model, _HostTensors(self))

    def _slots(self) -> dict[int, Slot]:
        if self.__dict__.pop("_stale_keys", False):  # a copy: its storages have new addresses
            self.slots = {storage_key(slot.source): slot for slot in self.slots.values()}
        return self.slots

    def describe(self) -> Iterator[str]:
        """One line per unit: its name and bytes."""
        for unit in self.units:
            yield f"{unit.name}: {unit.nbytes:,} B"


class _HostTensors:
    """``WeightStreamer.host_tensors`` through a weak reference: the meter's registry, keyed
    weakly by the model, must not keep the model alive through its value."""

    def __init__(self, streamer: WeightStreamer) -> None:
        self.streamer = weakref.ref(streamer)

    def __call__(self) -> list[torch.Tensor]:
        streamer = self.streamer()
        return streamer.host_tensors() if streamer is not None else []


class _RefilledState:
    """The model's instance ``__getstate__`` while offloaded: ``copy.deepcopy``, pickling and
    ``torch.save`` read the weights' device tensors, so every storage is refilled first (the
    copy is then a model with its weights refilled and its own streamer)."""

    def __init__(self, streamer: WeightStreamer) -> None:
        self.streamer = streamer

    def __call__(self) -> dict[str, Any]:
        self.streamer.refill_all()
        model = self.streamer.model
        state: dict[str, Any] = type(model).__getstate__(model)
        return state


class _FetchInBackward(torch.autograd.Function):
    """Identity on a unit's outputs; its backward refills the unit (backward enters it)."""

    @staticmethod
    def forward(ctx: Any, streamer: WeightStreamer, unit: Unit, *tensors: torch.Tensor) -> Any:
        ctx.streamer, ctx.unit = streamer, unit
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        ctx.streamer.backward_reached(ctx.unit)
        return (None, None, *grads)


class _FreeInBackward(torch.autograd.Function):
    """Identity on a unit's inputs; its backward frees the unit (backward has left it)."""

    @staticmethod
    def forward(ctx: Any, streamer: WeightStreamer, unit: Unit, *tensors: torch.Tensor) -> Any:
        ctx.streamer, ctx.unit = streamer, unit
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        ctx.streamer.release(ctx.unit)
        return (None, None, *grads)


def _through(function: Any, streamer: WeightStreamer, unit: Unit, tree: Any) -> Any:
    """``tree`` with its tensors that require grad passed through ``function`` (one node)."""
    leaves, spec = tree_flatten(tree)
    picked = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if not picked:
        return tree
    outputs = function.apply(streamer, unit, *(leaves[i] for i in picked))
    for i, out in zip(picked, outputs, strict=True):
        leaves[i] = out
    return tree_unflatten(leaves, spec)


def _in_backward() -> bool:
    return bool(torch._C._current_graph_task_id() != -1)


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or prefix == ""


def _offloader_for(tensor: torch.Tensor) -> Offloader:
    from torch._subclasses.fake_tensor import is_fake

    return Offloader(tensor.device, asynchronous=tensor.device.type == "cuda" and not is_fake(tensor))
