"""Numerics against ``torch.optim.AdamW``: state by state on awkward sizes, and loss over 300 steps."""

from __future__ import annotations

import functools

import pytest
import torch

from ciuic.optim import FORMATS, CiuicAdamW, dequantize_blockwise
from tests.core.optim.helpers import (
    AWKWARD_SIZES,
    FINAL_LOSS_TOLERANCE,
    MOMENT_TOLERANCE,
    PARAM_TOLERANCE,
    ciuic,
    final_loss,
    markov_lm,
    regression,
    train,
)

DTYPES = (torch.float32, torch.bfloat16)
BF16_TORCH_TOLERANCE = 0.02
"""Largest moment or parameter gap against torch's AdamW on the same bf16 parameter after 5
steps (relative to the largest magnitude): a few bf16 roundings (2**-9 relative each)."""
TASKS = {"regression": regression, "markov_lm": markov_lm}


def moments(opt: CiuicAdamW, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two moments as fp32 values, dequantized if need be."""
    state = opt.state[param]
    if "exp_avg" in state:
        return state["exp_avg"], state["exp_avg_sq"]
    out = []
    for name, fmt in zip(("exp_avg", "exp_avg_sq"), FORMATS[opt.state_bits], strict=True):
        qmap, _, _ = fmt.tables(torch.device("cpu"))
        codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
        out.append(
            dequantize_blockwise(
                codes, absmax, qmap, block_size=fmt.block_size, bits=fmt.bits, numel=param.numel()
            )
        )
    return out[0], out[1]


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", AWKWARD_SIZES)
def test_states_and_parameter_track_torch_adamw(bits: int, dtype: torch.dtype, numel: int) -> None:
    quantize = {} if bits == 32 else {"state_bits": bits, "min_quantized_numel": 1}
    ours = torch.nn.Parameter(torch.randn(numel).to(dtype))
    ref = torch.nn.Parameter(ours.detach().float().clone())
    opt = CiuicAdamW([ours], lr=1e-2, **quantize)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2)
    for step in range(5):
        grad = torch.randn(numel, generator=torch.Generator().manual_seed(step)).to(dtype)
        ours.grad, ref.grad = grad, grad.float()
        opt.step()
        ref_opt.step()
    for got, name in zip(moments(opt, ours), ("exp_avg", "exp_avg_sq"), strict=True):
        want = ref_opt.state[ref][name]
        assert got.dtype == (dtype if bits == 32 else torch.float32)
        error = (got.float() - want).abs().max()
        assert error <= MOMENT_TOLERANCE[(bits, dtype)] * want.abs().max(), name
    assert ours.dtype == dtype
    error = ((ours.float() - ref).abs() / ref.abs().clamp(min=1)).max()
    assert error <= PARAM_TOLERANCE[(bits, dtype)]


@pytest.mark.parametrize("numel", AWKWARD_SIZES)
def test_bf16_parameters_keep_bf16_moments_like_torch_adamw(numel: int) -> None:
    # torch's AdamW on the same bf16 parameter: its moments are bf16 and it computes in bf16,
    # CiuicAdamW computes in fp32 and rounds each result once, so the two differ by bf16 roundings.
    ours = torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(9)).bfloat16())
    ref = torch.nn.Parameter(ours.detach().clone())
    opt, ref_opt = CiuicAdamW([ours], lr=1e-2), torch.optim.AdamW([ref], lr=1e-2)
    for step in range(5):
        ours.grad = torch.randn(numel, generator=torch.Generator().manual_seed(step)).bfloat16()
        ref.grad = ours.grad.clone()
        opt.step()
        ref_opt.step()
    for name in ("exp_avg", "exp_avg_sq"):
        got, want = opt.state[ours][name], ref_opt.state[ref][name]
        assert got.dtype == want.dtype == torch.bfloat16
        error = (got.float() - want.float()).abs().max()
        assert error <= BF16_TORCH_TOLERANCE * want.float().abs().max(), name
    error = ((ours.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max()
    assert error <= BF16_TORCH_TOLERANCE


@pytest.mark.parametrize("bits", [32, 8])
def test_fp32_states_keeps_fp32_moments_and_fp32_parameters_are_unchanged(bits: int) -> None:
    quantize = {} if bits == 32 else {"state_bits": bits, "min_quantized_numel": 1}
    bf16 = torch.nn.Parameter(torch.randn(257).bfloat16())
    bf16.grad = torch.randn(257).bfloat16()
    kept = CiuicAdamW([bf16], fp32_states=True) if bits == 32 else CiuicAdamW([bf16], **quantize)
    kept.step()
    assert all(t.dtype != torch.bfloat16 for t in kept.state[bf16].values() if isinstance(t, torch.Tensor))
    # fp32 parameters: the moments were and stay fp32, and fp32_states changes no bit
    runs = []
    for fp32_states in (False, True):
        p = torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(3)))
        opt = CiuicAdamW([p], lr=1e-2, fp32_states=fp32_states)
        for step in range(3):
            p.grad = torch.randn(257, generator=torch.Generator().manual_seed(step))
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    assert runs[0][1].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@functools.cache
def torch_final_loss(task: str, dtype: torch.dtype) -> float:
    model, loss = TASKS[task](dtype)
    return final_loss(train(model, loss, torch.optim.AdamW(model.parameters(), lr=3e-3), range(300)))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("task", list(TASKS))
def test_final_loss_matches_torch_adamw_over_300_steps(task: str, dtype: torch.dtype, bits: int) -> None:
    model, loss = TASKS[task](dtype)
    ours = final_loss(train(model, loss, ciuic(model, state_bits=bits), range(300)))
    reference = torch_final_loss(task, dtype)
    assert abs(ours / reference - 1) <= FINAL_LOSS_TOLERANCE[(bits, dtype)], (ours, reference)


def test_quantized_moments_are_used_by_the_parity_models() -> None:
    # The parity runs would prove little if every tensor kept fp32 states.
    for task in TASKS.values():
        model, _ = task(torch.float32)
        quantized = sum(
            p.numel() for p in model.parameters() if p.numel() >= CiuicAdamW([p]).min_quantized_numel
        )
        assert quantized / sum(p.numel() for p in model.parameters()) > 0.95
