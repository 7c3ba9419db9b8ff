"""The HF adapter's tests run the real ``Trainer`` on a shared CPU: one thread each (faster under
contention, and the same reduction order in both runs a test compares)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
