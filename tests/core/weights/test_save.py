"""Saving converted models: resume (convert a fresh model, load the saved state dict), dense
export (a plain model loads it), and copies (deepcopy, pickle, torch.save of the whole model)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ciuic.weights import QuantizedExperts, WeightOptions, dense_state_dict, quantize_
from ciuic.weights.linear import is_bnb_linear
from tests.core.weights.helpers import ATTENTION_TARGETS, frozen_deepseek
from tests.models import COPIES, lora, progressions

VARIANTS: dict[str, dict[str, Any]] = {
    "nf4": {"format": "nf4"},
    "fp4": {"format": "fp4"},
    "int8": {"format": "int8"},
    "double_quant": {"format": "nf4", "double_quant": True},
    "prune_2:4_nf4": {"format": "nf4", "prune": "2:4"},
    "prune_0.5_dense": {"format": "none", "prune": 0.5},
    "head_embeddings": {"format": "int8", "head": "nf4", "embeddings": "int8"},
}
"""Every variant converts the DeepSeek-V3 fused experts too (QuantizedExperts), except pruning alone."""

IDS = progressions(batch_size=2, seq_len=16)


def _build(
    options: dict[str, Any], *, seed: int, peft: bool, dtype: torch.dtype = torch.float32
) -> nn.Module:
    model = frozen_deepseek(dtype, seed=seed)
    if peft:
        torch.manual_seed(seed)
        model = lora(model, targets=ATTENTION_TARGETS)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # as after some training: adapters that change the output
                nn.init.normal_(param, std=0.02)
    quantize_(model, WeightOptions(**options))
    return model


def _step(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the trainable parameters' gradients of one forward/backward."""
    out = model(input_ids=IDS, labels=IDS)
    if out.loss.requires_grad:
        out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, tensor in sa.items():
        assert torch.equal(tensor, sb[name]), name


RESUME_CASES = [(v, True) for v in sorted(VARIANTS)] + [
    (v, False) for v in ("nf4", "int8", "head_embeddings")
]
"""Every variant on a PEFT LoRA model (forward and backward checked); three on the plain model."""


@pytest.mark.parametrize(("variant", "peft"), RESUME_CASES)
def test_resume_converting_a_fresh_model_then_loading_is_bitwise(
    variant: str, peft: bool, tmp_path: Path
) -> None:
    options = VARIANTS[variant]
    source = _build(options, seed=0, peft=peft)
    expected_logits, expected_grads = _step(source)  # a step first: bitsandbytes moves state on forward
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target = _build(options, seed=1, peft=peft)  # other initial weights
    _step(target)  # the loaders must also work after a forward
    assert not torch.equal(_step(target)[0], expected_logits)  # the load below has work to do
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert str(target.load_state_dict(loaded, strict=True)) == "<All keys matched successfully>"
    _assert_same_state(source, target)
    logits, grads = _step(target)
    assert torch.equal(logits, expected_logits)
    assert len(grads) == len(expected_grads) and (len(grads) > 0) == peft
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dense_export_loads_into_the_plain_model_strictly(variant: str) -> None:
    """bf16: the plain model computes bitwise what the dequantized (undone) model computes.
    Against the converted model itself (fp32, within fp32 rounding): the PEFT test below."""
    model = frozen_deepseek(torch.bfloat16, seed=0)
    applied = quantize_(model, WeightOptions(**VARIANTS[variant]))
    exported = dense_state_dict(model)
    plain = frozen_deepseek(torch.bfloat16, seed=3)
    assert str(plain.load_state_dict(exported, strict=True)) == "<All keys matched successfully>"
    assert all(t.dtype == torch.bfloat16 for t in exported.values() if t.is_floating_point())
    applied.undo()
    assert list(exported) == list(model.state_dict())  # the plain model's names, in its order
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("variant", ["nf4", "int8", "head_embeddings"])
def test_dense_export_of_a_peft_model_matches_the_converted_model(variant: str) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    model = _build(VARIANTS[variant], seed=0, peft=True)
    with torch.no_grad():
        converted = model(IDS).logits
        with model.disable_adapter():
            converted_base = model(IDS).logits
    base = dense_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model") for k in base)
    plain = frozen_deepseek(torch.float32, seed=3)
    assert str(plain.load_state_dict(base, strict=True)) == "<All keys matched successfully>"
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, converted_base, rtol=0, atol=1e-5)
    merged = frozen_deepseek(torch.float32, seed=3)
    merged.load_state_dict(dense_state_dict(model, merge_adapters=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, converted, rtol=0, atol=1e-5)
        assert not torch.allclose(merged(IDS).logits, converted_base, atol=1e-3)  # adapters count
    # Adapters alone: PEFT's own state dict, into get_peft_model of the dense model.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(ATTENTION_TARGETS))
    dense_peft = get_peft_model(plain, config)
    result = set_peft_model_state_dict(dense_peft, get_peft_model_state_dict(model))
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(dense_peft(IDS).logits, converted, rtol=0, atol=1e-5)


COPY_CASES = [(v, how) for v in ("nf4", "int8") for how in sorted(COPIES)] + [("head_embeddings", "pickle")]


@pytest.mark.parametrize(("variant", "how"), COPY_CASES)
def test_copies_train_bitwise_like_the_original_and_their_undo_dequantizes_the_copy(
    variant: str, how: str
) -> None:
    torch.manual_seed(0)
    model = lora(frozen_deepseek(torch.float32), targets=ATTENTION_TARGETS)
    applied = quantize_(model, WeightOptions(**VARIANTS[variant]))
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())
    _step(model)  # a forward first: the copy must carry bitsandbytes' moved state
    copied, copied_undo = COPIES[how]((model, applied.undo))
    pickle.dumps(applied)  # the Applied record itself pickles (no closure)

    def train_step(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        logits, _ = _step_keep(m)
        optimizer.step()
        return logits, [p.detach().clone() for p in params]

    (la, pa), (lb, pb) = train_step(model), train_step(copied)
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))
    copied_undo()
    assert not any(is_bnb_linear(m) or isinstance(m, QuantizedExperts) for m in copied.modules())
    assert any(is_bnb_linear(m) for m in model.modules())  # the original is still converted
    applied.undo()
    with torch.no_grad():
        torch.testing.assert_close(copied(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def _step_keep(model: nn.Module) -> tuple[torch.Tensor, None]:
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), None
