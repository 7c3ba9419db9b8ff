"""The undo log that lets :meth:`CiuicAdamW.rollback` restore a backward's in-place updates.

With ``step_in_backward`` each parameter is overwritten inside backward, as soon as its gradient
is complete. If that backward then fails (an out-of-memory error, a bad batch), some parameters
have stepped and others have not. Before a parameter and its states are overwritten, the log
keeps a copy of them (in host memory when the states are offloaded, beside the states
otherwise); :meth:`UndoLog.restore` writes the copies back, bit for bit.

Cost: while held, one copy of each stepped parameter and of its states, i.e. at the end of a
backward as many bytes as the trainable parameters plus their optimizer states (for a bf16
parameter with 8-bit states, about 2 + 2 bytes per element). The log is counted by
:class:`ciuic.MemoryMeter` under ``"optimizer"`` (``"offloaded"`` when offloading).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ciuic.memory import tag_tensor

from .placement import Placement


@dataclass
class _Entry:
    param: torch.Tensor
    value: torch.Tensor
    state: dict[str, Any] | None  # None: the parameter had no state before this step


class UndoLog:
    """Old values of the parameters (and their states) updated since the log was last cleared.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> log = UndoLog(Placement(offload=False))
        >>> log.record(p, p.detach(), {})
        >>> with torch.no_grad():
        ...     _ = p.mul_(3)
        >>> state = {p: {"step": 1}}
        >>> log.restore(state)
        >>> p.tolist(), p in state
        ([1.0, 1.0], False)
    """

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the log holds."""
        total = 0
        for entry in self._entries.values():
            tensors = [entry.value, *(v for v in (entry.state or {}).values() if isinstance(v, torch.Tensor))]
            total += sum(t.nbytes for t in tensors)
        return total

    def record(self, param: torch.Tensor, work_param: torch.Tensor, state: dict[str, Any]) -> None:
        """Keep ``param``'s value (read from ``work_param``) and ``state`` unless already kept."""
        if id(param) in self._entries:
            return  # the first copy is the one from before this step
        with self.placement.on_host():
            value = work_param.detach().clone()
            saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        if not self.placement.offload:
            for tensor in (value, *(v for v in saved.values() if isinstance(v, torch.Tensor))):
                tag_tensor(tensor, "optimizer")
        self._entries[id(param)] = _Entry(param, value, saved or None)

    def restore(self, states: Any) -> None:
        """Write every kept value back into its parameter and ``states[param]``, then clear."""
        with torch.no_grad():
            for entry in self._entries.values():
                entry.param.detach().copy_(entry.value)
                if entry.state is None:
                    states.pop(entry.param, None)
                    continue
                live = states[entry.param]
                for key, old in entry.state.items():
                    if isinstance(old, torch.Tensor):
                        live[key].copy_(old)
                    else:
                        live[key] = old
        self.clear()

    def clear(self) -> None:
        """Forget the kept values (the step they undo is final)."""
        self._entries = {}
