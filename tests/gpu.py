"""The one gate for tests that need a GPU (CI has none; they run when a GPU machine is lent)."""

import pytest
import torch

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)
