"""A lower bound of a step's peak that needs no pricing: the frozen weights' own bytes.

Every byte of the weights is held through the whole step, so a config whose weights alone
exceed what the budget leaves is skipped without running it. The bound counts, on the
``meta`` model, quantizable frozen weights (linear layers and fused experts, not the embeddings
and the head) at half a byte per element under 4-bit formats (their block scales left out), the
embeddings and a head at one byte with 8-bit tables, and everything else at its dtype's size,
so it never exceeds what the priced step holds.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
>>> weight_floor(model, weights_rank=0), weight_floor(model, weights_rank=1)
(16384, 2048)
"""

from __future__ import annotations

from torch import nn

TABLES = ("embed_tokens", "lm_head", "wte")


def weight_floor(model: nn.Module, *, weights_rank: int) -> int:
    """Bytes the parameters of ``model`` take at least under weights rank ``weights_rank``
    (0 as they are, 1 NF4, 2 NF4 with 8-bit embeddings and head; see ``ciuic.planner.knobs``)."""
    total = 0
    for name, param in model.named_parameters():
        dense = param.numel() * param.element_size()
        if weights_rank == 0:
            total += dense
        elif any(part in TABLES for part in name.split(".")):
            total += param.numel() if weights_rank == 2 else dense
        elif param.dim() >= 2:
            total += param.numel() // 2
        else:
            total += dense
    return total
