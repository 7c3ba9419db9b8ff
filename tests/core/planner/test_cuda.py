"""The prediction against the CUDA allocator's measured peak (runs where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from ciuic import CiuicConfig
from ciuic.planner import price, qlora_recipe
from tests.gpu import requires_cuda

from .test_search import small_qwen2

CONFIGS = [CiuicConfig(), qlora_recipe(), CiuicConfig.preset("balanced")]


@requires_cuda
@pytest.mark.parametrize("config", CONFIGS, ids=["off", "qlora", "balanced"])
def test_fake_prediction_matches_max_memory_allocated(config: CiuicConfig) -> None:
    builder = small_qwen2(layers=4)
    predicted = price(builder, config, seq_len=512, batch=2, lora=8, device="cpu").peak_bytes
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    price(builder, config, seq_len=512, batch=2, lora=8, device="cuda", fake=False)
    measured = torch.cuda.max_memory_allocated() - base
    assert predicted == pytest.approx(measured, rel=0.05)
