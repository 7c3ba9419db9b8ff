"""The memory acceptance figures, measured with ``ciuic.MemoryMeter`` (exact bytes on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ciuic import MemoryMeter
from ciuic.memory import DEVICE_CATEGORIES
from ciuic.optim import FORMATS, CiuicAdamW, StateFormat
from tests.core.optim.helpers import clone, same_bits
from tests.models import deepseek_v3, progressions


def model_1m() -> nn.Module:
    """Tiny DeepSeek-V3 (MLA, MoE with fused experts) with 1,049,568 trainable parameters."""
    return deepseek_v3(hidden_size=192, vocab_size=1024)


def lm_loss(model: nn.Module, seed: int) -> torch.Tensor:
    ids = progressions(batch_size=2, seq_len=16, vocab_size=1024, seed=seed)
    return model(input_ids=ids, labels=ids).loss


def expected_state_bytes(model: nn.Module, opt: CiuicAdamW) -> int:
    """What the formats promise: fp32 moments (8 B) below the threshold, codes + absmax above."""
    total = 0
    for p in model.parameters():
        if opt.state_bits == 32 or p.numel() < opt.min_quantized_numel:
            total += 8 * p.numel()
        else:
            fmts: tuple[StateFormat, StateFormat] = FORMATS[opt.state_bits]
            total += sum(f.code_bytes(p.numel()) + 4 * f.blocks(p.numel()) for f in fmts)
    return total


def steady_state_reading(model: nn.Module, opt: torch.optim.Optimizer) -> MemoryMeter:
    """The second step, states already allocated by the first, under the meter."""
    lm_loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    with MemoryMeter(track=(model, opt)) as meter:
        lm_loss(model, 1).backward()
        opt.step()
        opt.zero_grad()
    return meter


@pytest.mark.parametrize(("bits", "ceiling"), [(32, 8.0), (8, 2.1), (4, 1.1)])
def test_optimizer_bytes_per_trainable_parameter(bits: int, ceiling: float) -> None:
    model = model_1m()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable >= 1_000_000
    opt = CiuicAdamW(model.parameters(), state_bits=bits)
    meter = steady_state_reading(model, opt)
    state = meter.peak_by_category["optimizer"]
    assert state == expected_state_bytes(model, opt)
    assert state / trainable <= ceiling
    # measured: 8.000, 2.043 and 1.076 B per parameter
    assert round(state / trainable, 3) == {32: 8.0, 8: 2.043, 4: 1.076}[bits]


def test_torch_adamw_reference_is_8_bytes_per_parameter() -> None:
    model = model_1m()
    meter = steady_state_reading(model, torch.optim.AdamW(model.parameters()))
    params = list(model.parameters())
    # two fp32 moments, and torch's 4-byte step tensor per parameter
    assert meter.peak_by_category["optimizer"] == 8 * sum(p.numel() for p in params) + 4 * len(params)


def test_step_in_backward_holds_one_gradient_at_a_time() -> None:
    model = model_1m()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    all_grads = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = CiuicAdamW(model.parameters(), step_in_backward=True)
    meter = steady_state_reading(model, opt)
    grads = meter.peak_by_category["gradients"]
    assert 0 < grads <= 1.1 * largest
    assert all(p.grad is None for p in model.parameters())
    # The same run with step() after backward holds every gradient at once.
    model = model_1m()
    plain = steady_state_reading(model, CiuicAdamW(model.parameters()))
    assert plain.peak_by_category["gradients"] == all_grads > 3 * grads


def test_step_in_backward_is_bitwise_the_same_update() -> None:
    model = deepseek_v3()
    twin = clone(model)
    opts = (
        CiuicAdamW(model.parameters(), state_bits=8),
        CiuicAdamW(twin.parameters(), state_bits=8, step_in_backward=True),
    )
    for step in range(3):
        for m, opt in zip((model, twin), opts, strict=True):
            ids = progressions(batch_size=2, seq_len=12, seed=step)
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert same_bits(model, twin)


def device_bytes_left(model: nn.Module, **kwargs: object) -> tuple[MemoryMeter, CiuicAdamW]:
    """Build the optimizer and run two steps inside a meter; gradients are freed at the end."""
    with MemoryMeter(track=(model,)) as meter:
        opt = CiuicAdamW(model.parameters(), **kwargs)  # type: ignore[arg-type]
        for seed in range(2):
            lm_loss(model, seed).backward()
            opt.step()
            opt.zero_grad()
    return meter, opt


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_offload_keeps_no_optimizer_bytes_on_the_device_and_changes_no_bit(bits: int) -> None:
    model = model_1m()
    twin = clone(model)
    param_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    on_device, kept = device_bytes_left(model, state_bits=bits)
    on_host, offloaded = device_bytes_left(twin, state_bits=bits, offload=True)
    assert same_bits(model, twin)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in kept.state[p].items():
            assert (
                torch.equal(value, offloaded.state[q][key])
                if key != "step"
                else value == offloaded.state[q][key]
            )
    state_bytes = expected_state_bytes(twin, offloaded)
    # Device bytes live after the steps: the parameters, plus the states unless they are offloaded.
    assert on_device.current_bytes == param_bytes + state_bytes
    assert on_host.current_bytes == param_bytes
    assert on_host.peak_offloaded_bytes >= state_bytes
    assert on_device.peak_bytes - on_host.peak_bytes >= state_bytes


def test_offloaded_states_are_not_in_the_device_breakdown() -> None:
    model = nn.Linear(256, 256)
    with MemoryMeter(track=(model,)) as meter:
        opt = CiuicAdamW(model.parameters(), offload=True)
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        opt.zero_grad()
        peak = torch.empty(10_000_000, dtype=torch.uint8)  # a new device peak, states alive
        del peak
    assert meter.peak_by_category["optimizer"] == 0
    assert sum(meter.peak_by_category[c] for c in DEVICE_CATEGORIES) == meter.peak_bytes


def test_quantized_states_cut_host_memory_when_offloaded() -> None:
    host = {}
    for bits in (32, 8, 4):
        model = model_1m()
        opt = CiuicAdamW(model.parameters(), state_bits=bits, offload=True)
        steady_state_reading(model, opt)
        host[bits] = sum(
            t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
    assert host[32] > 3.9 * host[8] > 7.4 * host[4]
