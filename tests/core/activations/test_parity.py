"""Training parity: 300 LoRA steps on the learnable progression task, same seed and batches."""

from __future__ import annotations

from functools import cache

import pytest
import torch

import ciuic
from ciuic import CiuicConfig
from ciuic.demo import progression_batches
from tests.models import deepseek_v3, lora

STEPS, BATCH, SEQ = 300, 4, 32  # CPU-sized: about 10 s per run on one core
MAX_GAP = {"int8": 0.02, "int4": 0.02, "int2": 0.05}  # relative gap of the final loss


@cache
def _final_loss(codec: str) -> tuple[float, float]:
    """(first loss, mean loss of the last 20 steps) of a run with ``activations=codec``."""
    model = lora(deepseek_v3())
    if codec != "none":
        ciuic.apply_(model, CiuicConfig(activations=codec))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = progression_batches(batch_size=BATCH, seq_len=SEQ, vocab_size=64, seed=0)
    losses = []
    for _ in range(STEPS):
        tokens = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses[0], sum(losses[-20:]) / 20


@pytest.mark.slow
@pytest.mark.parametrize("codec", list(MAX_GAP))
def test_final_loss_matches_the_exact_run(codec: str) -> None:
    first, exact = _final_loss("none")
    assert exact < first - 0.5  # the task is learned: the comparison means something
    _, final = _final_loss(codec)
    assert abs(final - exact) <= MAX_GAP[codec] * exact
