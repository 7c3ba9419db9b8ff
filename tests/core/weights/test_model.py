"""What ``quantize_`` converts, what it leaves alone and says so, and the errors it raises."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

import ciuic
from ciuic import ApplyError, CiuicConfig
from ciuic.weights import QuantizedExperts, WeightOptions, convert_weights, quantize_
from ciuic.weights.linear import is_bnb_linear
from tests.core.weights.helpers import HIDDEN, frozen_deepseek, frozen_qwen2
from tests.models import deepseek_v3, progressions, qwen2


def test_a_full_fine_tuning_model_is_frozen_with_the_count_and_remove_unfreezes_it() -> None:
    model = deepseek_v3(hidden_size=HIDDEN)  # every parameter trainable, as load_in_4bit users hand it
    count = len(list(model.parameters()))
    handle = ciuic.apply_(model, CiuicConfig(weights="nf4"))
    details = handle.applied[0].details
    assert details["frozen_parameters"] == count and "full fine-tuning" in details["froze_full_fine_tuning"]
    assert details["coverage"] >= 0.95 and not any(p.requires_grad for p in model.parameters())
    ciuic.remove_(model)
    assert len(list(model.parameters())) == count
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())


def test_trainable_candidates_beside_frozen_parameters_raise_a_clear_error() -> None:
    model = deepseek_v3(hidden_size=HIDDEN)
    model.model.norm.requires_grad_(False)  # not full fine-tuning: the user froze something
    with pytest.raises(ApplyError, match=r"require grad \(full fine-tuning\).*freeze=\('model.layers',\)"):
        ciuic.apply_(model, CiuicConfig(weights="nf4"))
    assert ciuic.handle_of(model) is None
    assert sum(not p.requires_grad for p in model.parameters()) == 1


def test_naming_modules_to_freeze_quantizes_them_and_undo_unfreezes() -> None:
    model = deepseek_v3(hidden_size=HIDDEN)
    applied = quantize_(model, WeightOptions(format="nf4", freeze=("model.layers",)))
    assert applied.details["coverage"] >= 0.95
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("model.layers.") for n in trainable)  # embeddings, head
    applied.undo()
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_modules_are_never_quantized() -> None:
    model = frozen_qwen2()
    model.model.layers[0].self_attn.q_proj.requires_grad_(True)
    applied = quantize_(model, WeightOptions(format="int8"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    reasons = dict(applied.skipped)
    assert "trainable (requires_grad=True)" in reasons["model.layers.0.self_attn.q_proj"]


def test_router_gates_and_skip_names_are_left_dense_with_reasons() -> None:
    class Moe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(64, 4)  # a router (Qwen-MoE / Mixtral style)
            self.proj = nn.Linear(64, 64)
            self.keep = nn.Linear(64, 64)

    model = Moe().requires_grad_(False)
    applied = quantize_(model, WeightOptions(format="nf4", skip=("keep",)))
    assert applied.changed == ["proj"]
    reasons = dict(applied.skipped)
    assert "router" in reasons["gate"] and "skip" in reasons["keep"]


def test_quantize_head_is_an_alias_of_head_int8() -> None:
    from ciuic.weights.tables import QuantizedHead

    model = frozen_deepseek()
    applied = quantize_(model, WeightOptions(format="nf4", quantize_head=True))
    import bitsandbytes as bnb

    assert isinstance(model.lm_head, QuantizedHead) and model.lm_head.codec.format == "int8"
    assert applied.details["head"] == "int8"
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, bnb.nn.Linear4bit)
    assert applied.details["coverage"] == 1.0
    assert type(model.model.embed_tokens) is nn.Embedding


def test_double_quant_reduces_bytes_further() -> None:
    plain = quantize_(frozen_qwen2(), WeightOptions(format="nf4")).details
    double = quantize_(frozen_qwen2(), WeightOptions(format="nf4", double_quant=True)).details
    assert double["stored_bytes"] < plain["stored_bytes"]
    assert double["ratio_vs_bf16"] <= 0.27


def test_nothing_to_convert_raises() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Embedding(4, 8)).requires_grad_(False)
    with pytest.raises(ApplyError, match="found nothing to convert in Sequential"):
        quantize_(model, WeightOptions(format="nf4"))


def test_model_loaded_with_bitsandbytes_config_is_left_alone() -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        qwen2(hidden_size=128).save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
        )
    layers = {n: m for n, m in loaded.named_modules()}
    handle = ciuic.apply_(loaded, CiuicConfig(weights="nf4"))
    record = handle.applied[0]
    assert record.changed == []
    assert record.skipped[0][0] == "model" and "already quantized by transformers" in record.skipped[0][1]
    assert {n: m for n, m in loaded.named_modules()} == layers
    ciuic.remove_(loaded)


def test_converting_a_converted_model_again_reports_it_already_quantized() -> None:
    model = frozen_deepseek()
    first = quantize_(model, WeightOptions(format="int8"))
    with pytest.raises(ApplyError, match="already applied to this DeepseekV3ForCausalLM"):
        quantize_(model, WeightOptions(format="nf4"))  # the door that shares apply_'s handle
    again = convert_weights(model, WeightOptions(format="nf4", skip=("lm_head",)))  # the raw conversion
    assert again.details["already"] and not again.changed and "already quantized" in again.skipped[0][1]
    assert is_bnb_linear(model.model.layers[0].self_attn.q_a_proj)
    first.undo()
    assert not any(is_bnb_linear(m) for m in model.modules())


def test_experts_forward_dequantizes_only_routed_experts() -> None:
    model = frozen_deepseek(torch.float32)
    quantize_(model, WeightOptions(format="nf4"))
    experts = next(m for m in model.modules() if isinstance(m, QuantizedExperts))
    used: list[int] = []
    original = experts.expert_weight
    experts.expert_weight = lambda name, e: used.append(e) or original(name, e)  # type: ignore[method-assign]
    ids = torch.zeros(1, 1, dtype=torch.long)  # one token: at most num_experts_per_tok experts
    with torch.no_grad():
        model(ids)
    assert 1 <= len(set(used)) <= 2 < experts.num_experts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reported_bytes_match_the_modules_storage(dtype: torch.dtype) -> None:
    from ciuic.weights.functional import storage_bytes
    from ciuic.weights.linear import linear_storage_bytes

    model = frozen_deepseek(dtype)
    weights = {n: p.untyped_storage().nbytes() for n, p in model.named_parameters()}
    applied = quantize_(model, WeightOptions(format="nf4"))
    converted = {n: model.get_submodule(n) for n in applied.changed}
    # Bytes of the dense weights these modules held, read off the model before converting.
    dense = sum(b for n, b in weights.items() if n.rpartition(".")[0] in converted and not n.endswith("bias"))
    assert applied.details["dense_bytes"] == dense
    assert applied.details["bf16_bytes"] * dtype.itemsize == dense * 2
    stored = sum(
        linear_storage_bytes(m) if is_bnb_linear(m) else storage_bytes(*m.buffers())
        for m in converted.values()
    )
    assert applied.details["stored_bytes"] == stored
    assert sum(is_bnb_linear(m) for m in converted.values()) == len(converted) - 1
    ids = progressions(batch_size=1, seq_len=8)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_preset_on_a_model_ciuic_already_quantized_applies_the_rest_and_undoes_only_that() -> None:
    model = frozen_deepseek()
    earlier = convert_weights(model, WeightOptions(format="nf4"))  # no handle: the direct converter
    handle = ciuic.apply_(model, CiuicConfig.preset("balanced"))
    record = handle.record("weights")
    assert record is not None and record.details["already"] and not record.changed
    assert any("already quantized" in reason for _, reason in record.skipped)
    assert {r.technique for r in handle.applied} > {"weights"}  # the preset's other techniques ran
    ciuic.remove_(model)
    assert is_bnb_linear(model.model.layers[0].self_attn.q_a_proj)  # the earlier conversion stays
    assert isinstance(model.model.layers[1].mlp.experts, QuantizedExperts)
    earlier.undo()
    assert type(model.model.layers[0].self_attn.q_a_proj) is nn.Linear


def test_a_preset_on_a_bitsandbytes_loaded_model_reports_the_weights_as_already_quantized() -> None:
    from transformers import BitsAndBytesConfig

    model = frozen_deepseek()
    convert_weights(model, WeightOptions(format="nf4"))
    model.__dict__.pop("_ciuic_weights")  # as transformers leaves it: its flags and config only
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    handle = ciuic.apply_(model, CiuicConfig.preset("balanced"))
    record = handle.record("weights")
    assert record is not None and record.details["already"]
    assert "already quantized by transformers" in record.skipped[0][1]
    assert len(handle.applied) > 1
    ciuic.remove_(model)
    assert is_bnb_linear(model.model.layers[0].self_attn.q_a_proj)
