"""Where optimizer states live and where the update runs: on the parameter's device, or on the host.

:class:`Placement` hands the optimizer a *staged* copy of each parameter and gradient to update:

- on the device (``offload=False``): the parameter and gradient themselves, nothing copied;
- on the host, parameter on CPU (``offload=True``, CPU runs): the same tensors, the states and the
  update's temporaries allocated under ``ciuic.memory.tag_allocations("offloaded")`` so that
  :class:`ciuic.MemoryMeter` counts them as host memory;
- on the host, parameter on CUDA: the gradient and parameter are copied into pinned host buffers
  on a side stream (ordered after the compute stream, so the copy overlaps the rest of backward),
  the update runs on the host once the copy's event has completed, and the new values go back on
  the same side stream; :meth:`Placement.finish` makes the compute stream wait for it. Every
  hand-over is ordered by a stream or an event, so the result does not depend on timing.

The update is the same code in all three cases, which is why offloading changes no bit of the
result (:mod:`ciuic.optim.functional` uses only correctly rounded operations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ciuic.memory import tag_allocations

HOST = torch.device("cpu")


@dataclass
class Staged:
    """A parameter and its gradient, ready (once ``event`` has completed) for the update.

    Attributes:
        param: The live parameter (the one the model holds).
        work_param: The tensor the update reads and writes (``param`` itself, or a host copy).
        work_grad: The gradient the update reads (on the same device as ``work_param``).
        event: CUDA event recorded after the host copies, or ``None`` when nothing was copied.
    """

    param: torch.Tensor
    work_param: torch.Tensor
    work_grad: torch.Tensor
    event: Any = None

    def ready(self) -> bool:
        """Whether the update can run without waiting."""
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        """Block until the host copies have landed."""
        if self.event is not None:
            self.event.synchronize()


class Placement:
    """States on the parameter's device (``offload=False``) or in host memory (``offload=True``).

    Example:
        >>> placement = Placement(offload=True)
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> placement.state_device(p)
        device(type='cpu')
    """

    def __init__(self, *, offload: bool) -> None:
        self.offload = offload
        self._streams: dict[torch.device, Any] = {}

    def state_device(self, param: torch.Tensor) -> torch.device:
        """The device that holds ``param``'s optimizer states and runs its update."""
        return HOST if self.offload else param.device

    @contextlib.contextmanager
    def on_host(self) -> Iterator[None]:
        """Allocations inside count as host memory when offloading (no-op otherwise)."""
        with tag_allocations("offloaded") if self.offload else contextlib.nullcontext():
            yield

    def new_state(self, param: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled state tensor for ``param`` (pinned host memory when offloading a CUDA param)."""
        with self.on_host():
            device = self.state_device(param)
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=self._pin(param))

    def place_state(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A copy of a loaded state tensor where this placement keeps ``param``'s states."""
        out = self.new_state(param, tuple(value.shape), value.dtype)
        out.copy_(value)
        return out

    def _pin(self, param: torch.Tensor) -> bool:
        return self.offload and param.device.type == "cuda"

    def stage(self, param: torch.Tensor, grad: torch.Tensor) -> Staged:
        """Hand ``param`` and ``grad`` to where the update runs (asynchronously for CUDA offload)."""
        if not self._pin(param):
            return Staged(param, param.detach(), grad)
        stream = self._stream(param.device)
        stream.wait_stream(torch.cuda.current_stream(param.device))
        with torch.cuda.stream(stream), self.on_host():
            work_param = torch.empty(param.shape, dtype=param.dtype, device=HOST, pin_memory=True)
            work_grad = torch.empty(grad.shape, dtype=grad.dtype, device=HOST, pin_memory=True)
            work_param.copy_(param.detach(), non_blocking=True)
            work_grad.copy_(grad, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        grad.record_stream(stream)  # the caller drops the gradient: keep it until the copy is done
        return Staged(param, work_param, work_grad, event)

    def write_back(self, staged: Staged) -> None:
        """Put the updated values into the live parameter (a no-op unless they are a host copy)."""
        if staged.event is None:
            return
        stream = self._stream(staged.param.device)
        with torch.cuda.stream(stream):
            # The pinned buffer may be freed after this: the host allocator records the stream's
            # use of it, so it is not reused before the copy completes.
            staged.param.detach().copy_(staged.work_param, non_blocking=True)

    def finish(self) -> None:
        """Make each compute stream wait for the write-backs (call after a round of updates)."""
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]
