"""Move saved tensors to host memory in forward and back, one block ahead, in backward.

An :class:`Offloader` copies the tensors that hold one saved activation (raw, or the codes and
scales of a compressed one, which moves 2-8x fewer bytes) to host memory and copies them back
when autograd unpacks them. On CUDA the host buffers are pinned and the copies run on a side
stream, ordered by events:

- forward: the side stream waits for the compute stream, copies device -> host, and the
  device tensor is ``record_stream``-ed on the side stream, so the caching allocator does not
  hand its memory out before the copy has read it;
- backward: :meth:`Offloader.prefetch` starts host -> device copies of the next block's
  tensors on the side stream; :meth:`Offloader.fetch` makes the compute stream wait for them
  (or copies synchronously what was not prefetched) and ``record_stream``-s the result on the
  compute stream, the stream that uses and frees it.

On CPU (and under ``FakeTensorMode``, with ``asynchronous=False``) the same calls run
synchronously; the host copies are allocated under ``tag_allocations("offloaded")`` so that
:class:`ciuic.MemoryMeter` counts them as host bytes.

``prefetch``/``fetch`` either allocate new device tensors (saved activations) or, given
``into``, refill device tensors whose storage was resized to zero bytes (frozen weights, see
:mod:`ciuic.weight_offload`): the storage is grown on the copying stream and the copy lands in
it, so every view of it sees the data again.

Example:
    >>> import torch
    >>> off = Offloader(torch.device("cpu"))
    >>> stored = off.store((torch.arange(4.0),))
    >>> off.fetch(stored)[0]
    tensor([0., 1., 2., 3.])
"""

from __future__ import annotations

from typing import Any

import torch

from ciuic.memory import tag_allocations


class HostCopy:
    """Host copies of a tuple of device tensors, and what is needed to bring them back.

    Attributes:
        host: The host tensors (pinned on CUDA).
        device: The device they came from.
        ready: CUDA event recorded after the device -> host copy (``None`` on CPU).
        prefetched: Device copies started by :meth:`Offloader.prefetch`, with their event.
    """

    __slots__ = ("device", "host", "prefetched", "ready")

    def __init__(self, host: tuple[torch.Tensor, ...], device: torch.device, ready: Any) -> None:
        self.host = host
        self.device = device
        self.ready = ready
        self.prefetched: tuple[tuple[torch.Tensor, ...], Any] | None = None

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return sum(t.numel() * t.element_size() for t in self.host)


class Offloader:
    """Copies saved tensors of one device to host memory and back (see the module docstring).

    Args:
        device: The device the model computes on.
        asynchronous: Pinned host memory and side-stream copies (default: on CUDA).
    """

    def __init__(self, device: torch.device, *, asynchronous: bool | None = None) -> None:
        self.device = device
        self.asynchronous = device.type == "cuda" if asynchronous is None else asynchronous
        self._stream: Any = None
        self.prefetches = 0
        self.fetches = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None}  # a CUDA stream is not copied

    @property
    def is_cuda(self) -> bool:
        """Whether copies are asynchronous (side stream, pinned memory)."""
        return self.asynchronous

    def _side_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def store(self, tensors: tuple[torch.Tensor, ...]) -> HostCopy:
        """Start copying ``tensors`` to host memory; the device tensors may be dropped at once."""
        pin = self.is_cuda
        with tag_allocations("offloaded"):
            host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors)
        if not self.is_cuda:
            for dst, src in zip(host, tensors, strict=True):
                dst.copy_(src)
            return HostCopy(host, tensors[0].device, None)
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for dst, src in zip(host, tensors, strict=True):
                dst.copy_(src, non_blocking=True)
                src.record_stream(side)
            ready = torch.cuda.Event()
            ready.record(side)
        return HostCopy(host, tensors[0].device, ready)

    def prefetch(self, copy: HostCopy, into: tuple[torch.Tensor, ...] | None = None) -> None:
        """Start bringing ``copy`` back to the device (a no-op if already started).

        ``into``: device tensors (storage resized to zero) to refill instead of new ones.
        """
        if copy.prefetched is not None:
            return
        self.prefetches += 1
        if not self.is_cuda:
            copy.prefetched = (self._copy_back(copy, into), None)
            return
        side = self._side_stream()
        with torch.cuda.stream(side):
            if copy.ready is not None:
                side.wait_event(copy.ready)
            tensors = self._copy_back(copy, into)
            done = torch.cuda.Event()
            done.record(side)
        copy.prefetched = (tensors, done)

    def fetch(self, copy: HostCopy, into: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """The device tensors of ``copy``, ready to use on the current stream (``into``: as in
        :meth:`prefetch`; a prefetch already started fills the tensors it was given)."""
        self.fetches += 1
        prefetched, copy.prefetched = copy.prefetched, None
        if not self.is_cuda:
            return prefetched[0] if prefetched is not None else self._copy_back(copy, into)
        current = torch.cuda.current_stream(self.device)
        if prefetched is None:
            if copy.ready is not None:
                current.wait_event(copy.ready)
            return self._copy_back(copy, into)
        tensors, done = prefetched
        current.wait_event(done)
        for t in tensors:  # allocated on the side stream, used and freed on this one
            t.record_stream(current)
        return tensors

    def copy_now(self, host: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Device copies of host tensors, made on the current stream (no prefetch: small reads,
        such as one routed expert's rows, needed at once)."""
        self.fetches += 1
        return tuple(h.to(self.device, non_blocking=self.is_cuda, copy=True) for h in host)

    def _copy_back(
        self, copy: HostCopy, into: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, ...]:
        if into is None:
            return tuple(h.to(copy.device, non_blocking=self.is_cuda, copy=True) for h in copy.host)
        for dst, h in zip(into, copy.host, strict=True):
            dst.untyped_storage().resize_(h.numel() * h.element_size())
            # the same bytes come back: views that autograd saved must not look modified
            with torch.autograd.grad_mode._unsafe_preserve_version_counter(dst):
                dst.copy_(h, non_blocking=self.is_cuda)
        return into
