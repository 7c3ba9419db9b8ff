"""What a fake step cannot see, and the margin the planner keeps for it.

A step priced under ``FakeTensorMode`` counts every tensor the step allocates through
PyTorch, exactly. It does not see:

- the CUDA context and the libraries' workspaces (cuBLAS, cuDNN, kernels loaded on first use):
  a few hundred MiB that are allocated outside PyTorch's caching allocator;
- the caching allocator's fragmentation: ``torch.cuda.memory_reserved`` exceeds
  ``max_memory_allocated`` by blocks that are cached but cannot serve a larger request;
- NCCL's communication buffers in a multi-GPU run (a few hundred MiB per process).

So a config *fits* ``budget`` when its priced peak is at most ``budget - margin_bytes(budget)``:
:data:`FIXED_MARGIN` for the first and third, plus :data:`FRAGMENTATION` of the budget for the
second. The CUDA-gated test ``tests/core/planner/test_cuda.py`` and ``python bench/planner.py``
on a CUDA machine compare the prediction with ``torch.cuda.max_memory_allocated``.

>>> round(margin_bytes(8 * 2**30) / 2**30, 2)
1.8
"""

from __future__ import annotations

FIXED_MARGIN = 2**30
"""Bytes kept for the CUDA context, library workspaces and NCCL buffers (1 GiB)."""

FRAGMENTATION = 0.10
"""Share of the budget kept for the caching allocator's fragmentation."""


def margin_bytes(budget: int) -> int:
    """Bytes of ``budget`` a priced peak may not use (see the module docstring)."""
    return FIXED_MARGIN + int(FRAGMENTATION * budget)


def usable_bytes(budget: int) -> int:
    """The most a priced peak may be for a config to fit ``budget``."""
    return budget - margin_bytes(budget)
