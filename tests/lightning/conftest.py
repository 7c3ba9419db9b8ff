"""One intra-op thread for the Lightning runs: the tiny models' ops are too small to gain from
more, and on a shared CPU the spinning worker threads cost several times the step time."""

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
