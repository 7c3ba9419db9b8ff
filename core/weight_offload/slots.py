"""Frozen storages of a model, each with its host copy and the device storage it refills.

A :class:`Slot` is one storage of frozen weights (a parameter, a persistent buffer, or a
tensor bitsandbytes keeps beside a quantized weight: ``quant_state.absmax``/``code``, ``SCB``).
Its bytes live in a host copy (an :class:`~ciuic.activations.offload.HostCopy`); the device
storage keeps its identity but is resized to zero bytes while released, as FSDP frees
unsharded parameters, so every tensor that views it (the parameter, ``weight.t()`` saved by
autograd, the weight bitsandbytes keeps in its autograd context) sees the data again once the
storage is refilled, without being found and replaced.

Example:
    >>> import torch
    >>> from ciuic.activations.offload import Offloader
    >>> w = torch.arange(6.0).reshape(2, 3)
    >>> slot = Slot.of(w, Offloader(torch.device("cpu")))
    >>> slot.release()
    >>> w.untyped_storage().nbytes()
    0
    >>> _ = slot.refill_now(Offloader(torch.device("cpu")))
    >>> w.sum().item()
    15.0
"""

from __future__ import annotations

import torch
from torch import nn

from ciuic.activations.offload import HostCopy, Offloader
from ciuic.memory import storage_resized, tag_allocations
from ciuic.memory.meter import own_quantization_state


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of ``tensor``'s storage (works under FakeTensorMode, where ``data_ptr()`` is 0)."""
    return int(tensor.untyped_storage()._cdata)


def storage_view(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D ``uint8`` tensor over the whole storage of ``tensor`` (it keeps its size when the
    storage is resized to zero, so it can be refilled by ``copy_``)."""
    storage = tensor.untyped_storage()
    whole = tensor.storage_offset() == 0 and tensor.numel() * tensor.element_size() == storage.nbytes()
    if whole and tensor.is_contiguous():  # the usual case; also what FakeTensorMode allows
        return tensor.detach().reshape(-1).view(torch.uint8)
    view = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    return view.set_(storage, 0, (storage.nbytes(),), (1,))


class Slot:
    """One frozen storage: its host copy, and a byte view of the device storage.

    Attributes:
        view: ``uint8`` tensor over the device storage (see :func:`storage_view`).
        copy: The host copy (pinned on CUDA).
        nbytes: Bytes of the storage.
        holders: Units (indices) that use it now; released when none does.
    """

    __slots__ = ("copy", "holders", "nbytes", "source", "view")

    def __init__(self, source: torch.Tensor, view: torch.Tensor, copy: HostCopy) -> None:
        self.source = source  # a tensor of the storage in its own dtype (what a copy pickles)
        self.view = view
        self.copy = copy
        self.nbytes = int(view.numel())
        self.holders: set[int] = set()

    @classmethod
    def of(cls, tensor: torch.Tensor, offloader: Offloader) -> Slot:
        """Copy ``tensor``'s storage to host memory (the device storage stays as it is)."""
        view = storage_view(tensor)
        copy = offloader.store((view,))
        if copy.ready is not None:
            copy.ready.synchronize()  # once, at apply: the host copy is complete before any release
            copy.ready = None
        return cls(tensor, view, copy)

    def __getstate__(self) -> dict[str, object]:
        # torch.save refuses two dtypes over one storage: the byte view is rebuilt on load
        # (the model is copied with its storages refilled, see WeightStreamer.refill_all)
        return {"source": self.source, "copy": self.copy, "nbytes": self.nbytes, "holders": self.holders}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        if not self.source.untyped_storage().resizable():  # torch.load's storages are fixed
            _move_to_resizable(self.source)
        self.view = storage_view(self.source)

    @property
    def resident(self) -> bool:
        """Whether the device storage holds the data (or a copy into it has started)."""
        return self.view.untyped_storage().nbytes() > 0

    def release(self) -> None:
        """Free the device storage (its tensors keep their shapes; their data is gone)."""
        self.copy.prefetched = None
        self.view.untyped_storage().resize_(0)
        storage_resized(self.view)

    def prefetch(self, offloader: Offloader) -> int:
        """Start refilling the device storage; the bytes started (0 if resident or started)."""
        if self.resident:
            return 0
        with tag_allocations("parameters"):
            offloader.prefetch(self.copy, into=(self.view,))
        return self.nbytes

    def refill_now(self, offloader: Offloader) -> int:
        """Make the device storage usable on the current stream; the bytes it copied now."""
        if self.copy.prefetched is not None:
            offloader.fetch(self.copy, into=(self.view,))
            return 0
        if self.resident:
            return 0
        with tag_allocations("parameters"):
            offloader.fetch(self.copy, into=(self.view,))
        return self.nbytes

    def host_as(self, tensor: torch.Tensor) -> torch.Tensor:
        """The host copy read as ``tensor`` (same dtype, shape, strides and offset)."""
        host: torch.Tensor = self.copy.host[0].view(tensor.dtype)
        return host.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


def _move_to_resizable(tensor: torch.Tensor) -> None:
    """Give ``tensor`` a resizable copy of its storage (another tensor sharing the old one keeps
    it: it is then never freed, which costs memory but no correctness)."""
    old = tensor.untyped_storage()
    new = torch.empty(old.nbytes(), dtype=torch.uint8, device=tensor.device).untyped_storage()
    new.copy_(old)
    with torch.no_grad():
        tensor.set_(new, tensor.storage_offset(), tensor.shape, tensor.stride())


def own_frozen_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The frozen tensors ``module`` holds itself: parameters that do not require grad,
    persistent buffers, and bitsandbytes' quantization state beside its weights."""
    skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    found: list[torch.Tensor] = [p for p in module.parameters(recurse=False) if not p.requires_grad]
    found += [b for name, b in module.named_buffers(recurse=False) if name not in skip]
    found += own_quantization_state(module)
    return [t for t in found if t.device.type != "meta" and t.untyped_storage().nbytes() > 0]
