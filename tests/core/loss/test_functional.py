"""Numerics of ``ciuic.loss.linear_cross_entropy`` against the materialized-logits loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ciuic.errors import ConfigError
from ciuic.loss import chunk_rows, linear_cross_entropy, reference_linear_cross_entropy

VOCAB, HIDDEN = 97, 24  # odd sizes: chunks end mid-batch and no dimension is a power of two
SMALL_CHUNKS = 4096  # bytes: a few tokens per chunk, so every test walks several chunks
FP32_RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b`` (computed in fp64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(dtype: torch.dtype = torch.float32, *, bias: bool = False, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5).to(dtype)
    target = torch.randint(0, VOCAB, (3, 11), generator=gen)
    target[1] = -100  # a whole sequence without loss
    target[2, :4] = -100  # a prompt masked out
    out: dict[str, Any] = {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "target": target,
    }
    if bias:
        out["bias"] = torch.randn(VOCAB, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return out


def _loss_and_grads(
    fn: Any, inputs: dict[str, Any], **kwargs: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t for t in inputs.values() if t.requires_grad]
    loss = fn(**inputs, **kwargs)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


OPTIONS = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "shift": {"shift": True},
    "num_items_in_batch": {"num_items_in_batch": 13, "shift": True},
    "num_items_as_tensor": {"num_items_in_batch": torch.tensor(13)},
    "softcap": {"softcap": 3.0},
    "logit_scale": {"logit_scale": 0.25},
    "scale_and_softcap": {"logit_scale": 2.0, "softcap": 5.0, "shift": True},
    "ignore_index": {"ignore_index": 5},
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=list(OPTIONS))
def test_fp32_loss_and_gradients_match_materialized_logits(options: dict[str, Any], bias: bool) -> None:
    inputs = _inputs(bias=bias)
    if "ignore_index" in options:
        target = inputs["target"]
        inputs["target"] = torch.where(target == -100, options["ignore_index"], target)
    loss, grads = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=SMALL_CHUNKS, **options)
    ref_loss, ref_grads = _loss_and_grads(reference_linear_cross_entropy, inputs, **options)
    assert chunk_rows(VOCAB, HIDDEN, torch.float32, chunk_bytes=SMALL_CHUNKS) < 33 - 1  # several chunks
    assert _rel(loss, ref_loss) <= FP32_RTOL
    assert len(grads) == (3 if bias else 2)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert _rel(grad, ref) <= FP32_RTOL


def test_ignored_tokens_get_no_gradient() -> None:
    inputs = _inputs()
    _, (grad_hidden, _) = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=SMALL_CHUNKS)
    assert torch.count_nonzero(grad_hidden[1]) == 0
    assert torch.count_nonzero(grad_hidden[2, :4]) == 0
    assert torch.count_nonzero(grad_hidden[2, 4:]) > 0


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 2**28], ids=["one_token", "small", "default"])
def test_chunk_size_changes_nothing_but_rounding(chunk_bytes: int) -> None:
    inputs = _inputs(torch.float64)
    loss, grads = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=chunk_bytes)
    ref_loss, ref_grads = _loss_and_grads(reference_linear_cross_entropy, inputs)
    # Both paths take the softmax in fp32 (as transformers does), so fp32 rounding bounds the gap.
    assert _rel(loss, ref_loss) <= FP32_RTOL
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == torch.float64
        assert _rel(grad, ref) <= FP32_RTOL


def test_frozen_weight_gets_no_gradient_and_costs_none() -> None:
    inputs = _inputs()
    inputs["weight"].requires_grad_(False)
    loss = linear_cross_entropy(**inputs, chunk_bytes=SMALL_CHUNKS)
    loss.backward()
    assert inputs["weight"].grad is None
    ref_hidden = inputs["hidden"].detach().clone().requires_grad_()
    reference_linear_cross_entropy(ref_hidden, inputs["weight"], inputs["target"]).backward()
    assert _rel(inputs["hidden"].grad, ref_hidden.grad) <= FP32_RTOL


def test_backward_scales_by_the_incoming_gradient() -> None:
    inputs = _inputs()
    loss, grads = _loss_and_grads(
        lambda **kw: 3.5 * linear_cross_entropy(**kw, chunk_bytes=SMALL_CHUNKS), inputs
    )
    ref_loss, ref_grads = _loss_and_grads(lambda **kw: 3.5 * reference_linear_cross_entropy(**kw), inputs)
    assert _rel(loss, ref_loss) <= FP32_RTOL
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert _rel(grad, ref) <= FP32_RTOL


def test_all_tokens_ignored() -> None:
    inputs = _inputs()
    inputs["target"] = torch.full_like(inputs["target"], -100)
    loss, grads = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=SMALL_CHUNKS)
    ref_loss = reference_linear_cross_entropy(**inputs)
    assert torch.isnan(loss) and torch.isnan(ref_loss)  # a mean over zero tokens, as torch gives
    assert all(torch.count_nonzero(g) == 0 for g in grads)  # but no NaN reaches the weights
    summed, summed_grads = _loss_and_grads(linear_cross_entropy, inputs, reduction="sum")
    assert summed.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in summed_grads)


def _bf16_errors(fn: Any, **kwargs: Any) -> list[float]:
    """Errors of ``fn`` on bf16 inputs against the fp64 reference on the same (rounded) inputs."""
    inputs = _inputs(torch.bfloat16, bias=True, seed=1)
    exact = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    exact["target"] = inputs["target"]
    loss, grads = _loss_and_grads(fn, inputs, shift=True, **kwargs)
    truth, truth_grads = _loss_and_grads(reference_linear_cross_entropy, exact, shift=True)
    return [_rel(loss, truth)] + [_rel(g, t) for g, t in zip(grads, truth_grads, strict=True)]


def test_bf16_within_bf16_tolerance_of_exact() -> None:
    chunked = _bf16_errors(linear_cross_entropy, chunk_bytes=SMALL_CHUNKS)
    standard = _bf16_errors(reference_linear_cross_entropy)
    for ours, theirs in zip(chunked, standard, strict=True):
        assert ours <= 2**-7  # bf16 carries 8 significant bits: 2**-8 per rounding
        assert ours <= 2 * theirs + 2**-9  # no worse than the materialized bf16 path, up to rounding


def test_autocast_matches_linear_under_autocast() -> None:
    inputs = _inputs(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=SMALL_CHUNKS)
        ref_loss, ref_grads = _loss_and_grads(reference_linear_cross_entropy, inputs)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert _rel(loss, ref_loss) <= 2**-8
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert _rel(grad, ref) <= 2**-6


def test_second_backward_is_refused() -> None:
    inputs = _inputs()
    loss = linear_cross_entropy(**inputs)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


BAD_CALLS = {
    "reduction": ({"reduction": "none"}, ConfigError, r"reduction='none' is not allowed.*'mean', 'sum'"),
    "num_items_with_sum": (
        {"reduction": "sum", "num_items_in_batch": 4},
        ConfigError,
        "num_items_in_batch=4",
    ),
    "softcap": ({"softcap": 0.0}, ConfigError, r"softcap=0\.0 is not allowed"),
    "logit_scale": ({"logit_scale": True}, ConfigError, r"logit_scale=True is not allowed"),
    "chunk_bytes": ({"chunk_bytes": 0}, ConfigError, r"chunk_bytes=0 is not allowed"),
    "float_target": ({"target": torch.zeros(3, 11)}, ValueError, "target=.*must be an integer tensor"),
    "target_shape": (
        {"target": torch.zeros(3, 10, dtype=torch.long)},
        ValueError,
        r"shape of hidden.*\(3, 11\)",
    ),
    "weight_shape": ({"weight": torch.zeros(VOCAB, HIDDEN + 1)}, ValueError, "weight=.*lm_head weight"),
    "bias_shape": ({"bias": torch.zeros(VOCAB + 1)}, ValueError, rf"bias=.*\({VOCAB},\)"),
    "class_out_of_range": (
        {"target": torch.full((3, 11), VOCAB)},
        ValueError,
        rf"class index {VOCAB}, outside \[0, {VOCAB}\)",
    ),
    "negative_class": ({"target": torch.full((3, 11), -5)}, ValueError, r"class index -5, outside"),
    "dtype_mismatch": (
        {"weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.float64)},
        ValueError,
        "share a dtype",
    ),
}


@pytest.mark.parametrize("bad", BAD_CALLS.values(), ids=list(BAD_CALLS))
def test_bad_input_names_the_argument(bad: tuple[dict[str, Any], type[Exception], str]) -> None:
    override, error, pattern = bad
    inputs = {**_inputs(), **override}
    with pytest.raises(error, match=pattern):
        linear_cross_entropy(**inputs)


def test_chunk_rows_targets_the_byte_budget() -> None:
    rows = chunk_rows(152064, 3584, torch.bfloat16)
    per_token = 152064 * (4 + 2) + 3584 * 2  # fp32 logits, their bf16 copy, a hidden-gradient row
    assert rows == 288 and rows * per_token <= 256 * 2**20 < (rows + 8) * per_token
    assert chunk_rows(152064, 3584, torch.float32) % 8 == 0
    assert chunk_rows(152064, 3584, torch.bfloat16, chunk_bytes=1) == 1
    assert chunk_rows(152064, 3584, torch.bfloat16, softcap=True) < rows


def _frozen(weight: torch.Tensor, block: int) -> Any:
    from ciuic.loss import FrozenRows

    reads: list[tuple[int, int]] = []

    def read(start: int, stop: int) -> torch.Tensor:
        reads.append((start, stop))
        return weight.detach()[start:stop].clone()  # a new tensor per block, as a dequantization gives

    return FrozenRows(read, weight.shape, weight.dtype, weight.device, block=block), reads


@pytest.mark.parametrize("options", OPTIONS.values(), ids=list(OPTIONS))
def test_a_frozen_weight_read_in_row_blocks_gives_the_dense_results(options: dict[str, Any]) -> None:
    inputs = _inputs(bias=True)
    if "ignore_index" in options:
        target = inputs["target"]
        inputs["target"] = torch.where(target == -100, options["ignore_index"], target)
    inputs["weight"].requires_grad_(False)
    frozen, reads = _frozen(inputs["weight"], block=7)  # 7 does not divide the vocabulary
    loss, grads = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=4096, **options)
    blocked, blocked_grads = _loss_and_grads(
        linear_cross_entropy, {**inputs, "weight": frozen}, chunk_bytes=4096, **options
    )
    assert _rel(blocked, loss) <= 1e-6
    for got, want in zip(blocked_grads, grads, strict=True):  # hidden and bias
        assert _rel(got, want) <= 1e-6
    rows = chunk_rows(VOCAB, HIDDEN, torch.float32, chunk_bytes=4096, softcap="softcap" in options)
    chunks = -(-3 * 11 // rows)
    blocks = [(start, min(VOCAB, start + 7)) for start in range(0, VOCAB, 7)]
    assert reads == blocks * (2 * chunks)  # each chunk: its logits, then its hidden-state gradient


def test_a_frozen_weight_in_row_blocks_stays_within_bf16_tolerance() -> None:
    inputs = _inputs(torch.bfloat16)
    inputs["weight"].requires_grad_(False)
    exact = _inputs(torch.float64)
    exact["weight"].requires_grad_(False)
    frozen, _ = _frozen(inputs["weight"], block=16)
    loss, (grad,) = _loss_and_grads(linear_cross_entropy, {**inputs, "weight": frozen}, chunk_bytes=4096)
    ref_loss, (ref_grad,) = _loss_and_grads(reference_linear_cross_entropy, exact)
    _, (dense_grad,) = _loss_and_grads(linear_cross_entropy, inputs, chunk_bytes=4096)
    assert _rel(loss, ref_loss) <= 1e-2 and _rel(grad, ref_grad) <= _rel(dense_grad, ref_grad) * 1.5 + 1e-3
