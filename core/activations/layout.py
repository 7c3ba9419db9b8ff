"""Flatten a saved tensor to the vector a codec packs, and rebuild the view exactly.

A codec packs a 1-D vector; what autograd saved is a view with its own shape, strides and
storage offset (a transpose, a slice, an ``expand``). :func:`flatten` returns the elements in
memory order plus a :class:`Layout`, and :meth:`Layout.restore` rebuilds a tensor with the same
shape, strides and dtype:

- broadcast dimensions (stride 0) are packed once and re-expanded;
- a dense view (a permutation of a contiguous block, e.g. ``x.t()``) is read in place;
- a view with gaps (a slice) is copied to a vector and restored into ``empty_strided``.

Two views that cover the same dense block of the same storage flatten to the same vector, so
their :attr:`Layout.region` is equal: the hooks use it to pack the block once.

Example:
    >>> import torch
    >>> x = torch.randn(3, 4).t()
    >>> flat, layout = flatten(x)
    >>> y = layout.restore(flat.clone())
    >>> y.stride() == x.stride() and torch.equal(x, y)
    True
"""

from __future__ import annotations

import torch

from ciuic.memory.fake import storage_key


class Layout:
    """How to turn a packed vector back into the saved view.

    Attributes:
        shape, stride: Of the base (broadcast dimensions narrowed to 1).
        expand_to: The saved tensor's shape when it was broadcast, else ``None``.
        dense: Whether the base was read in place in memory order.
        region: ``(storage identity, byte offset, numel, dtype, version)`` of a dense base, the
            key under which identical blocks are packed once; ``None`` for non-dense views.
    """

    __slots__ = ("dense", "expand_to", "region", "shape", "stride")

    def __init__(
        self,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        expand_to: tuple[int, ...] | None,
        dense: bool,
        region: tuple[object, ...] | None,
    ) -> None:
        self.shape = shape
        self.stride = stride
        self.expand_to = expand_to
        self.dense = dense
        self.region = region

    def restore(self, flat: torch.Tensor) -> torch.Tensor:
        """The saved view rebuilt from its packed vector (same shape, strides, dtype)."""
        if self.dense:
            base = flat.as_strided(self.shape, self.stride, flat.storage_offset())
        else:
            base = torch.empty_strided(self.shape, self.stride, dtype=flat.dtype, device=flat.device)
            base.copy_(flat.view(self.shape))
        return base.expand(self.expand_to) if self.expand_to is not None else base


def flatten(tensor: torch.Tensor) -> tuple[torch.Tensor, Layout] | None:
    """The elements of ``tensor`` as a 1-D vector and the layout to rebuild it.

    Returns ``None`` for views that cannot be rebuilt exactly (overlapping strides other than
    broadcasting); the hooks then keep such a tensor as it is.
    """
    base, expand_to = _unbroadcast(tensor)
    shape, stride = tuple(base.shape), tuple(base.stride())
    if is_dense(shape, stride):
        storage = base.untyped_storage()
        offset = base.storage_offset()
        flat = base.as_strided((base.numel(),), (1,), offset)
        region = (storage_key(storage), offset * base.element_size(), base.numel(), base.dtype, base._version)
        return flat, Layout(shape, stride, expand_to, True, region)
    if not _non_overlapping(shape, stride):
        return None
    return base.contiguous().view(-1), Layout(shape, stride, expand_to, False, None)


def _unbroadcast(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    dims = zip(tensor.shape, tensor.stride(), strict=True)
    broadcast = [d for d, (n, s) in enumerate(dims) if s == 0 and n > 1]
    if not broadcast:
        return tensor, None
    base = tensor
    for d in broadcast:
        base = base.narrow(d, 0, 1)
    return base, tuple(tensor.shape)


def is_dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a view addresses exactly ``numel`` consecutive elements (no gaps, no overlap).

    >>> is_dense((3, 4), (1, 3)), is_dense((3, 2), (4, 1))
    (True, False)
    """
    expected = 1
    for n, s in sorted(((n, s) for n, s in zip(shape, stride, strict=True) if n != 1), key=lambda d: d[1]):
        if s != expected:
            return False
        expected *= n
    return True


def _non_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    reach = 0  # furthest offset covered by the faster dimensions
    for n, s in sorted(((n, s) for n, s in zip(shape, stride, strict=True) if n != 1), key=lambda d: d[1]):
        if s <= reach:
            return False
        reach += s * (n - 1)
    return True
