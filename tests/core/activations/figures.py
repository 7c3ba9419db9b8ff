"""How the issue's figures are measured, shared by the acceptance tests and
``bench/activations.py``: one LoRA step of the tiny DeepSeek-V3 under bf16 autocast."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ciuic import MemoryMeter


@dataclass(frozen=True)
class Step:
    """What one measured step gives.

    Attributes:
        loss: The loss.
        grads: The gradients of the trainable parameters, concatenated.
        saved: Device bytes saved for backward when the forward ends (``activations``).
        offloaded: Host bytes then (``offloaded``).
    """

    loss: torch.Tensor
    grads: torch.Tensor
    saved: int
    offloaded: int


def saved_at_end_of_forward(meter: MemoryMeter) -> dict[str, int]:
    """The meter's breakdown of what is live now (call it between forward and backward).

    Everything saved for backward is alive when the forward ends; but the meter reports its
    categories at the moment of its peak, which may fall inside the forward (attention
    temporaries). An empty buffer larger than that peak moves the peak to now (``torch.empty``
    does not touch the memory; the buffer itself counts as ``temporary``).
    """
    probe = torch.empty(meter.peak_bytes + 1, dtype=torch.uint8)
    del probe
    return meter.peak_by_category


def lora_step(model: nn.Module, ids: torch.Tensor) -> Step:
    """One forward and backward of ``model`` on ``ids`` (labels = inputs), measured."""
    model.zero_grad(set_to_none=True)
    with MemoryMeter(device="cpu", track=(model,)) as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        saved = saved_at_end_of_forward(meter)
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return Step(loss.detach(), grads, saved["activations"], saved["offloaded"])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two gradient vectors, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()
