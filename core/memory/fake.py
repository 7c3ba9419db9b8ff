"""Telling fake tensors apart: what the techniques' fake-tensor paths branch on.

Under ``FakeTensorMode`` a tensor has a shape, a dtype, a device and a storage object, but no
data: every ``data_ptr()`` is 0 and data-dependent ops (``.item()``, ``nonzero``, a boolean
test) raise. A technique that reads values or pointers checks these first and takes a path with
the same allocations instead.
"""

from __future__ import annotations

import torch


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``FakeTensor`` (shape, dtype and device only, no data).

    Example:
        >>> import torch
        >>> from torch._subclasses.fake_tensor import FakeTensorMode
        >>> with FakeTensorMode():
        ...     fake = is_fake(torch.empty(3))
        >>> fake, is_fake(torch.empty(3))
        (True, False)
    """
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def fake_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is active (ops create fake tensors)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def storage_key(storage: torch.UntypedStorage) -> int:
    """An identity of a storage that fake tensors have too: the address of its ``StorageImpl``.

    ``data_ptr()`` is 0 for every fake storage, so it cannot tell them apart; the storage
    object's ``_cdata`` is distinct for each live storage, real or fake, and shared by all views.
    """
    return int(storage._cdata)
