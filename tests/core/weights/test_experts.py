"""``QuantizedExperts`` against transformers' own fused-experts module."""

from __future__ import annotations

import pytest
import torch

from ciuic.weights import QuantizedExperts, fused_experts_layout_problem
from tests.core.weights.helpers import frozen_deepseek


def _experts(dtype: torch.dtype) -> torch.nn.Module:
    return frozen_deepseek(dtype).model.layers[1].mlp.experts


def _routing(tokens: int, experts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 256, generator=generator)
    index = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=generator)
    return hidden, index, weights


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_the_experts_module_on_the_dequantized_weights(fmt: str, dtype: torch.dtype) -> None:
    dense = _experts(dtype)
    quantized = QuantizedExperts(dense, fmt)
    assert quantized.gate_up_proj_data.shape[0] == quantized.down_proj_data.shape[0] == 4
    for name in ("gate_up_proj", "down_proj"):  # the reference holds what the quantized one stores
        getattr(dense, name).data = quantized.dense(name)
    hidden, index, weights = _routing(9, 4)
    hidden = hidden.to(dtype)
    ref_in = hidden.clone().requires_grad_()
    q_in = hidden.clone().requires_grad_()
    ref = dense(ref_in, index, weights.to(dtype))
    out = quantized(q_in, index, weights.to(dtype))
    # Not bitwise: transformers runs its experts with grouped_mm, we loop over the routed experts,
    # and the CPU matmul's accumulation order follows the thread count (a few ulp apart at 2 threads).
    rounding = {torch.float32: (1e-6, 1e-7), torch.bfloat16: (2**-8, 1e-5)}[dtype]
    torch.testing.assert_close(out, ref, rtol=rounding[0], atol=rounding[1])
    ref.float().square().sum().backward()
    out.float().square().sum().backward()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(q_in.grad, ref_in.grad, rtol=tol, atol=tol)


def test_state_dict_holds_packed_rows_and_scales() -> None:
    quantized = QuantizedExperts(_experts(torch.bfloat16), "nf4")
    state = quantized.state_dict()
    assert sorted(state) == ["down_proj_absmax", "down_proj_data", "gate_up_proj_absmax", "gate_up_proj_data"]
    assert state["gate_up_proj_data"].shape == (4, 256 * 256 // 2)  # (E, 2I*H/2) two weights a byte
    assert state["gate_up_proj_absmax"].shape == (4, 256 * 256 // 64)


def test_layouts_that_cannot_be_stored_expert_by_expert_are_named() -> None:
    class Experts(torch.nn.Module):
        def __init__(self, hidden: int, inter: int) -> None:
            super().__init__()
            self.num_experts, self.act_fn = 2, torch.nn.SiLU()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 2 * inter, hidden))
            self.down_proj = torch.nn.Parameter(torch.randn(2, hidden, inter))

    assert fused_experts_layout_problem(Experts(32, 16)) is None
    assert "not a multiple of the block size 256" in QuantizedExperts.layout_problem(Experts(12, 6), "int8")
    transposed = Experts(32, 16)
    transposed.is_transposed = True
    assert "is_transposed" in fused_experts_layout_problem(transposed)
    assert "no fused" in fused_experts_layout_problem(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot be quantized: unsupported layout flags is_transposed"):
        QuantizedExperts(transposed, "nf4")
