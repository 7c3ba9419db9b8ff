"""Frozen lm_head and input embeddings stored block-wise (WeightOptions(head=..., embeddings=...))."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ciuic import ApplyError, MemoryMeter
from ciuic.weights import WeightOptions, convert_weights, quantize_, snr_db
from ciuic.weights.tables import QuantizedEmbedding, QuantizedHead
from tests.core.weights.helpers import (
    ATTENTION_TARGETS,
    HIDDEN,
    frozen_deepseek,
    frozen_qwen2,
    warm_bitsandbytes,
)
from tests.models import lora, progressions

BUILDERS = {"deepseek_v3": frozen_deepseek, "qwen2": frozen_qwen2}
BITS = {"int8": (1, 256), "nf4": (0.5, 64)}  # bytes per weight, weights per fp32 scale
MIN_LOGITS_SNR_DB = {"int8": 30.0, "nf4": 12.0}
"""Measured on these models (fp32, head and embeddings converted): int8 34.5/35.6 dB,
nf4 14.1/17.8 dB (DeepSeek-V3/Qwen2)."""


def _expected_bytes(weight_numel: int, fmt: str) -> int:
    per_weight, block = BITS[fmt]
    return int(weight_numel * per_weight) + 4 * weight_numel // block


def _tables(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.get_input_embeddings(), model.get_output_embeddings()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_head_and_embeddings_hold_exactly_codes_and_scales(arch: str, fmt: str) -> None:
    model = BUILDERS[arch]()
    warm_bitsandbytes()
    with MemoryMeter(track=(model,), device="cpu") as meter:
        before = meter.current_bytes
    numel = sum(t.weight.numel() for t in _tables(model))
    applied = quantize_(model, WeightOptions(format="none", head=fmt, embeddings=fmt))
    embeddings, head = _tables(model)
    assert isinstance(embeddings, QuantizedEmbedding) and isinstance(head, QuantizedHead)
    assert set(applied.changed) == {"model.embed_tokens", "lm_head"}
    with MemoryMeter(track=(head, embeddings), device="cpu") as tables:
        pass
    with MemoryMeter(track=(model,), device="cpu") as after:
        pass
    expected = sum(_expected_bytes(t.shape.numel(), fmt) for t in (head, embeddings))
    assert tables.current_bytes == expected == applied.details["stored_bytes"]
    assert after.current_bytes == before - 2 * numel + expected  # bf16 tables replaced by codes
    assert applied.details["dense_bytes"] == 2 * numel


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_logits_stay_close_to_the_dense_model(arch: str, fmt: str) -> None:
    ids = progressions(batch_size=2, seq_len=16)
    model = BUILDERS[arch](torch.float32)
    with torch.no_grad():
        reference = model(ids).logits
    quantize_(model, WeightOptions(format="none", head=fmt, embeddings=fmt))
    with torch.no_grad():
        logits = model(ids).logits
    assert MIN_LOGITS_SNR_DB[fmt] <= snr_db(reference, logits) < float("inf")


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_embedding_dequantizes_the_looked_up_rows_and_head_exposes_its_dense_weight(fmt: str) -> None:
    table = nn.Embedding(32, HIDDEN)
    embedding = QuantizedEmbedding(table, fmt)
    ids = torch.tensor([[3, 1, 3], [31, 0, 7]])
    dense = embedding.dense_weight()
    assert torch.equal(embedding(ids), dense[ids])  # rows decode alone exactly as in the whole table
    assert snr_db(table.weight, dense) > {"int8": 35, "nf4": 15}[fmt]
    head = QuantizedHead(nn.Linear(HIDDEN, 32, bias=True), fmt)
    weight, bias = head.ciuic_dense_weight()
    x = torch.randn(4, HIDDEN, requires_grad=True)
    out = head(x)
    assert bias is head.bias and torch.equal(weight, head.dense_weight())
    assert torch.equal(out, F.linear(x, weight, bias))
    out.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, weight.sum(0).expand(4, -1), atol=1e-5)


def test_undo_dequantizes_back_into_the_original_modules() -> None:
    model = frozen_qwen2()
    embeddings, head = _tables(model)
    applied = quantize_(model, WeightOptions(format="nf4", head="int8", embeddings="nf4"))
    dense = {"emb": model.model.embed_tokens.dense_weight(), "head": model.lm_head.dense_weight()}
    applied.undo()
    assert model.model.embed_tokens is embeddings and model.lm_head is head
    assert torch.equal(embeddings.weight, dense["emb"]) and torch.equal(head.weight, dense["head"])
    assert embeddings.weight.dtype == torch.bfloat16 and not embeddings.weight.requires_grad


def test_lora_trains_with_quantized_head_and_embeddings() -> None:
    model = lora(frozen_deepseek(torch.float32), targets=ATTENTION_TARGETS)
    applied = quantize_(model, WeightOptions(format="nf4", head="int8", embeddings="int8"))
    assert any(n.endswith("lm_head") for n in applied.changed)
    assert any(n.endswith("embed_tokens") for n in applied.changed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = progressions(batch_size=4, seq_len=16)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, s) for p, s in zip(trainable, start, strict=True))


def _tied_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model: nn.Module = Qwen2ForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_head_shares_the_embeddings_codes_and_undo_reties() -> None:
    model = _tied_qwen2()
    applied = quantize_(model, WeightOptions(format="none", head="int8", embeddings="int8"))
    assert model.lm_head.weight_data is model.model.embed_tokens.weight_data
    assert applied.details["stored_bytes"] == _expected_bytes(64 * HIDDEN, "int8")  # stored once
    applied.undo()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_head_alone_is_skipped_with_the_reason_and_contradictions_raise() -> None:
    model = _tied_qwen2()
    applied = quantize_(model, WeightOptions(format="nf4", head="int8"))
    assert "tie_word_embeddings" in dict(applied.skipped)["lm_head"]
    assert type(model.lm_head) is nn.Linear
    applied.undo()
    with pytest.raises(ApplyError, match=r"tied to the input embeddings.*head='int8' and embeddings='nf4'"):
        quantize_(model, WeightOptions(format="nf4", head="int8", embeddings="nf4"))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding


def test_converting_again_leaves_the_stored_tables_as_they_are() -> None:
    model = frozen_qwen2()
    first = quantize_(model, WeightOptions(format="none", head="nf4", embeddings="nf4"))
    stored = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    again = convert_weights(model, WeightOptions(format="none", head="int8", embeddings="int8"))
    assert again.details["already"] and again.changed == []
    assert again.skipped == [
        (
            "model",
            "already quantized (2 modules stored by bitsandbytes/ciuic, e.g. 'model.embed_tokens'): "
            "left as they are; remove_ leaves them quantized",
        )
    ]
    assert model.lm_head.codec.format == "nf4"
    assert all(torch.equal(stored[name], tensor) for name, tensor in model.state_dict().items())
    again.undo()  # nothing to undo: the first conversion keeps its own
    assert model.lm_head.codec.format == "nf4"
    first.undo()
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding


def test_short_rows_take_a_smaller_block_and_odd_rows_are_skipped_with_the_reason() -> None:
    from tests.models import qwen2

    model = qwen2(hidden_size=64).requires_grad_(False)  # int8 blocks hold 256 weights by default
    quantize_(model, WeightOptions(format="nf4", head="int8", embeddings="int8"))
    assert model.lm_head.codec.blocksize == 64
    assert model.lm_head.weight_absmax.shape == (64, 1)
    odd = nn.Sequential(nn.Embedding(16, 96)).requires_grad_(False)  # 96 = 32 * 3: no block >= 64 divides it
    from ciuic.weights.tables import table_layout_problem

    problem = table_layout_problem(odd[0].weight, "int8")
    assert problem == "rows of 96 weights are not a multiple of the smallest int8 block 64"
