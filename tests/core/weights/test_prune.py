"""Magnitude pruning stored as packed values + bit mask, alone and with quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ciuic.weights import PrunedLinear, WeightOptions, magnitude_mask, quantize_
from ciuic.weights.prune import pack_bits, unpack_bits
from tests.core.weights.helpers import frozen_qwen2, measure_conversion
from tests.models import progressions

# Parameter bytes of the converted weights over their bf16 bytes, measured with MemoryMeter
# on Qwen2 (hidden 256): values + 1 bit/weight mask (+ 4-bit/8-bit codes and scales).
MAX_RATIO = {("none", "2:4"): 0.5625, ("nf4", "2:4"): 0.21, ("int8", "2:4"): 0.32, ("none", 0.75): 0.32}


def test_two_of_four_keeps_the_two_largest_of_every_four() -> None:
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.0, 0.1, -0.2, 0.3]])
    assert magnitude_mask(w, "2:4").tolist() == [[False, True, True, False, False, False, True, True]]
    mask = magnitude_mask(torch.randn(64, 128), "2:4")
    assert (mask.view(64, -1, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="does not divide rows of 6 weights"):
        magnitude_mask(torch.randn(2, 6), "2:4")


def test_ratio_prunes_the_smallest_magnitudes() -> None:
    w = torch.randn(32, 64)
    mask = magnitude_mask(w, 0.25)
    assert int((~mask).sum()) == 512
    assert w.abs()[~mask].max() <= w.abs()[mask].min()


@pytest.mark.parametrize("numel", [1, 7, 8, 1001])
def test_bit_packing_round_trips(numel: int) -> None:
    mask = torch.rand(numel) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_bits(packed, numel), mask)


@pytest.mark.parametrize("fmt", ["none", "nf4", "int8"])
def test_pruned_linear_computes_with_the_masked_weight(fmt: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 32).requires_grad_(False)
    mask = magnitude_mask(linear.weight, "2:4")
    pruned = PrunedLinear(linear, mask, fmt)
    dense = pruned.dense_weight()
    assert torch.equal(dense == 0, ~mask) or fmt != "none"
    assert ((dense != 0) <= mask).all()  # nothing appears where pruned
    if fmt == "none":
        assert torch.equal(dense, linear.weight * mask)
    x = torch.randn(4, 128, requires_grad=True)
    out = pruned(x)
    assert torch.equal(out, nn.functional.linear(x, dense, linear.bias))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(("fmt", "prune"), sorted(MAX_RATIO, key=str))
def test_pruning_bytes_drop_as_reported(fmt: str, prune: str | float) -> None:
    model = frozen_qwen2()
    measured = measure_conversion(model, lambda m: quantize_(m, WeightOptions(format=fmt, prune=prune)))
    details = measured["result"].details
    assert measured["after"] == details["stored_bytes"]
    assert measured["before"] == details["bf16_bytes"]
    ratio = measured["after"] / measured["before"]
    print(f"prune {prune} format {fmt}: {ratio:.4f}x of bf16")
    assert ratio <= MAX_RATIO[(fmt, prune)]
    assert details["prune_saved_memory"] is True and "prune_note" not in details
    with torch.no_grad():
        assert torch.isfinite(model(progressions(batch_size=1, seq_len=8)).logits).all()


@pytest.mark.parametrize("fmt", ["none", "nf4"])
def test_pruning_that_saves_no_memory_says_so(fmt: str) -> None:
    model = frozen_qwen2()
    applied = quantize_(model, WeightOptions(format=fmt, prune=0.05))
    details = applied.details
    assert details["prune_saved_memory"] is False
    assert "saves no memory" in details["prune_note"]
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())
    q = model.get_submodule(applied.changed[0])
    weight = q.weight if fmt == "none" else None
    if weight is not None:  # stored dense, but the pruned weights are zero
        assert int((weight == 0).sum()) == round(0.05 * weight.numel())
    applied.undo()


def test_undo_gives_dense_pruned_layers() -> None:
    model = frozen_qwen2(torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = q_proj.weight * magnitude_mask(q_proj.weight, "2:4")
    applied = quantize_(model, WeightOptions(format="none", prune="2:4"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, PrunedLinear)
    applied.undo()
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert torch.equal(q_proj.weight, expected)
