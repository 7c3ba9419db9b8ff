"""The converted model under PEFT LoRA: PEFT's bitsandbytes layers, gradients, conversion order."""

from __future__ import annotations

import pytest
import torch

import ciuic
from ciuic import CiuicConfig
from ciuic.weights import QuantizedExperts
from tests.core.weights.helpers import ATTENTION_TARGETS, frozen_deepseek, frozen_qwen2
from tests.models import lora, progressions


def _lora(model: torch.nn.Module, targets: tuple[str, ...] = ATTENTION_TARGETS) -> torch.nn.Module:
    torch.manual_seed(1)  # same adapter initialization in every model
    return lora(model, targets=targets)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_converting_before_or_after_get_peft_model_gives_the_same_model(fmt: str) -> None:
    before = frozen_deepseek()
    ciuic.apply_(before, CiuicConfig(weights=fmt))
    before = _lora(before)
    after = _lora(frozen_deepseek())
    ciuic.apply_(after, CiuicConfig(weights=fmt))

    modules_before, modules_after = dict(before.named_modules()), dict(after.named_modules())
    assert {n: type(m) for n, m in modules_before.items()} == {n: type(m) for n, m in modules_after.items()}
    wrapper = modules_after["base_model.model.model.layers.0.self_attn.q_a_proj"]
    assert type(wrapper).__module__ == "peft.tuners.lora.bnb"  # PEFT's own bitsandbytes LoRA layer
    state_before, state_after = before.state_dict(), after.state_dict()
    assert state_before.keys() == state_after.keys()
    base = [k for k in state_before if "lora_" not in k]
    assert all(torch.equal(state_before[k], state_after[k]) for k in base)  # packed data and scales
    # PEFT initializes lora_A in the base weight's dtype when it is a float (bf16 here, then
    # upcast to fp32) and straight in fp32 over an int8 weight: the adapters agree up to that
    # bf16 rounding. With the same adapter values the two models compute bitwise the same.
    adapters = [k for k in state_before if "lora_" in k]
    assert all(torch.equal(state_before[k].bfloat16(), state_after[k].bfloat16()) for k in adapters)
    if fmt == "nf4":  # over Linear4bit PEFT uses the quantization's bf16 dtype: exactly equal
        assert all(torch.equal(state_before[k], state_after[k]) for k in adapters)
    before.load_state_dict({k: state_after[k] for k in adapters}, strict=False)

    ids = progressions(batch_size=2, seq_len=16)
    out_before, out_after = before(input_ids=ids, labels=ids), after(input_ids=ids, labels=ids)
    assert torch.equal(out_before.logits, out_after.logits)
    out_before.loss.backward()
    out_after.loss.backward()
    grads_before = {n: p.grad for n, p in before.named_parameters() if p.grad is not None}
    grads_after = {n: p.grad for n, p in after.named_parameters() if p.grad is not None}
    assert grads_before.keys() == grads_after.keys()
    assert all(torch.equal(grads_before[n], grads_after[n]) for n in grads_before)


@pytest.mark.parametrize("build", [frozen_deepseek, frozen_qwen2], ids=["deepseek_v3", "qwen2"])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_lora_step_on_converted_model_gives_gradients_to_lora_only(build, fmt: str) -> None:
    targets = ATTENTION_TARGETS if build is frozen_deepseek else ("q_proj", "k_proj", "v_proj", "o_proj")
    model = build()
    ciuic.apply_(model, CiuicConfig(weights=fmt))
    model = _lora(model, targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = progressions(batch_size=4, seq_len=16)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_before) and all("lora_" in n for n in with_grad)
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(moved) == len(lora_before)
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name


def test_experts_under_a_peft_target_parameters_adapter_are_quantized_and_keep_it() -> None:
    # PEFT 0.21 turns gate_proj/up_proj/down_proj targets on transformers-5 MoE models into
    # LoRA on the fused expert parameters (nested lora.ParamWrapper): the experts are quantized
    # under it and the chain adds the LoRA per routed expert.
    from ciuic.weights.expert_lora import QuantizedParamWrapper

    model = lora(frozen_deepseek())
    handle = ciuic.apply_(model, CiuicConfig(weights="nf4"))
    assert handle.applied[0].details["coverage"] >= 0.98
    outer = model.base_model.model.model.layers[1].mlp.experts
    assert type(outer) is QuantizedParamWrapper and type(outer.base_layer) is QuantizedParamWrapper
    assert isinstance(outer.base_layer.base_layer, QuantizedExperts)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_remove_after_peft_wrapped_the_converted_layers_keeps_the_adapters(fmt: str) -> None:
    from peft.tuners.lora import layer as lora_layer

    base = frozen_deepseek(torch.float32)
    ciuic.apply_(base, CiuicConfig(weights=fmt))
    model = _lora(base)
    ids = progressions(batch_size=2, seq_len=16)
    with torch.no_grad():
        quantized = model(ids).logits
    ciuic.remove_(base)  # the handle belongs to the model the config was applied to
    wrapper = model.base_model.model.model.layers[0].self_attn.q_a_proj
    assert type(wrapper) is lora_layer.Linear and type(wrapper.base_layer) is torch.nn.Linear
    assert "default" in wrapper.lora_A
    with torch.no_grad():
        dense = model(ids).logits
    # Same weights, dense matmul instead of bitsandbytes' (int8 also quantizes activations).
    torch.testing.assert_close(dense, quantized, rtol=0, atol={"nf4": 1e-4, "int8": 0.05}[fmt])
