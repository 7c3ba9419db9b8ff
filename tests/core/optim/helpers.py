"""Shared pieces of the optimizer tests: tolerances, tiny tasks, a training loop."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ciuic.optim import CiuicAdamW

FINAL_LOSS_TOLERANCE = {
    (32, torch.float32): 1e-4,
    # torch's AdamW does bf16 parameters' arithmetic in bf16, CiuicAdamW in fp32: not the same run.
    (32, torch.bfloat16): 0.01,
    (8, torch.float32): 0.02,
    (8, torch.bfloat16): 0.02,
    (4, torch.float32): 0.04,
    (4, torch.bfloat16): 0.04,
}
"""Relative final-loss gap allowed against ``torch.optim.AdamW`` after the 300-step parity runs,
by ``(state_bits, dtype)`` (the issue's acceptance: 2 % for 8-bit, 4 % for 4-bit)."""

MOMENT_TOLERANCE = {
    (32, torch.float32): 1e-6,
    # bf16 moments (they follow the parameter dtype): a bf16 rounding (2**-9 relative) per step
    (32, torch.bfloat16): 0.01,
    (8, torch.float32): 0.03,
    (8, torch.bfloat16): 0.03,
    (4, torch.float32): 0.3,
    (4, torch.bfloat16): 0.3,
}
"""Largest error of a dequantized moment after 5 steps, as a fraction of that moment's largest
magnitude, by ``(state_bits, dtype)``. Moments depend on the gradients only, so the reference
is exact."""

PARAM_TOLERANCE = {
    (32, torch.float32): 1e-6,
    (32, torch.bfloat16): 0.025,
    (8, torch.float32): 3e-3,
    (8, torch.bfloat16): 0.025,
    (4, torch.float32): 0.04,
    (4, torch.bfloat16): 0.04,
}
"""Largest parameter error (relative, to magnitudes below 1 absolute) after 5 steps of lr 1e-2
against torch's AdamW on an fp32 copy, by ``(state_bits, dtype)``: bf16 rounds the parameter at
every step (up to 2**-9 relative each time)."""

AWKWARD_SIZES = (1, 7, 257, 4097)
"""1 element, odd, and not a multiple of either block size (256 for 8-bit, 128 for 4-bit)."""


def regression(
    dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[nn.Module, Callable[[nn.Module, int], torch.Tensor]]:
    """An MLP fitting a fixed random teacher; ``loss(model, step)`` draws the step's batch."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 4)).to(
        dtype
    )

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        return (model(x.to(dtype)).float() - y).pow(2).mean()

    return model, loss


class TinyLM(nn.Module):
    """Next-token model over the last two tokens (embedding, MLP, head): small, fast, learnable."""

    def __init__(self, vocab: int = 64, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(2 * width, 2 * width)
        self.head = nn.Linear(2 * width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.head(torch.relu(self.mix(torch.cat([prev, e], dim=-1))))


def markov_lm(
    dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[nn.Module, Callable[[nn.Module, int], torch.Tensor]]:
    """:class:`TinyLM` on text from a fixed random Markov chain over 64 tokens.

    Like real text (and unlike a deterministic task), the data has an entropy floor: the
    best achievable loss is the chain's conditional entropy, 1.743 nats, so 300 steps end far
    from a zero loss (about 1.83), as a fine-tuning loss does.
    """
    torch.manual_seed(seed)
    model = TinyLM().to(dtype)
    transitions = torch.softmax(
        torch.randn(64, 64, generator=torch.Generator().manual_seed(1234)) * 3, dim=-1
    )

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        ids = torch.empty(16, 24, dtype=torch.long)
        ids[:, 0] = torch.randint(0, 64, (16,), generator=gen)
        for t in range(1, ids.shape[1]):
            ids[:, t] = torch.multinomial(transitions[ids[:, t - 1]], 1, generator=gen).squeeze(1)
        logits = model(ids[:, :-1]).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return model, loss


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: range,
) -> list[float]:
    """Plain loop: backward, step, zero_grad; returns the losses."""
    losses = []
    for step in steps:
        loss = loss_fn(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def final_loss(losses: list[float], last: int = 20) -> float:
    """Mean of the last ``last`` losses (one batch's loss is noisy)."""
    return sum(losses[-last:]) / last


def ciuic(model: nn.Module, **kwargs: Any) -> CiuicAdamW:
    return CiuicAdamW(model.parameters(), lr=kwargs.pop("lr", 3e-3), **kwargs)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def same_bits(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
