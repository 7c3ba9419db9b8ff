"""Memory measurement: :class:`MemoryMeter` and the tags techniques use to report their bytes."""

from .meter import (
    CATEGORIES,
    DEVICE_CATEGORIES,
    MemoryMeter,
    MemoryReading,
    register_host_tensors,
    storage_resized,
    tag_allocations,
    tag_tensor,
)

__all__ = [
    "CATEGORIES",
    "DEVICE_CATEGORIES",
    "MemoryMeter",
    "MemoryReading",
    "register_host_tensors",
    "storage_resized",
    "tag_allocations",
    "tag_tensor",
]
