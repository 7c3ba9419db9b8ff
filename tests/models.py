"""Tiny models and data for tests, all built offline (no hub).

- ``deepseek_v3``: DeepSeek-V3 architecture (MLA attention, a dense layer then MoE layers with
  fused routed experts and a shared expert), the same builder the demo uses.
- ``qwen2`` (the DeepSeek-R1-Distill-Qwen shape) and ``llama`` (R1-Distill-Llama).
- ``progressions``: a learnable next-token task (arithmetic progressions mod the vocabulary).
- ``lora``: PEFT LoRA on the attention and MLP projections.
- ``COPIES``: deepcopy, pickle and torch.save round trips of a model.
- ``assert_adamw_runs_agree``: two AdamW runs whose gradients differ only in summation order.
- ``assert_moe_lora_quantized``: a trainer's DeepSeek MoE LoRA model kept its bases quantized.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from ciuic.demo import LORA_TARGETS, progression_batches, tiny_deepseek_v3

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def deepseek_v3(**kwargs: int) -> nn.Module:
    """``DeepseekV3ForCausalLM``, fp32, seeded; see ``ciuic.demo.tiny_deepseek_v3`` for kwargs."""
    return tiny_deepseek_v3(**kwargs)


def qwen2(*, vocab_size: int = 64, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> nn.Module:
    """``Qwen2ForCausalLM`` (grouped-query attention with q/k/v biases), fp32, seeded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _causal_lm(Qwen2Config, Qwen2ForCausalLM, vocab_size, hidden_size, num_layers, seed)


def llama(*, vocab_size: int = 64, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> nn.Module:
    """``LlamaForCausalLM``, fp32, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _causal_lm(LlamaConfig, LlamaForCausalLM, vocab_size, hidden_size, num_layers, seed)


def _causal_lm(
    config_class: Any, model_class: Any, vocab_size: int, hidden_size: int, num_layers: int, seed: int
) -> nn.Module:
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: nn.Module = model_class(config)
    return model


def lora(model: nn.Module, *, rank: int = 8, targets: tuple[str, ...] | None = LORA_TARGETS) -> nn.Module:
    """PEFT LoRA adapters on ``targets``, or where :func:`ciuic.lora_targets` says with
    ``targets=None`` (no ``modules_to_save``): only adapters train."""
    from peft import LoraConfig, get_peft_model

    from ciuic import lora_targets

    found = lora_targets(model) if targets is None else {"target_modules": list(targets)}
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, **found))


def _pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "pickle": _pickled,
    "torch_save": _torch_saved,
}
"""The three ways an applied model is copied: ``copy.deepcopy``, pickling, ``torch.save``/``torch.load``."""


def progressions(*, batch_size: int, seq_len: int, vocab_size: int = 64, seed: int = 0) -> torch.Tensor:
    """One batch of the demo's learnable task (call again with another seed for more)."""
    return next(progression_batches(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, seed=seed))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread while a test runs (imported by the adapters' conftest files): the tiny
    models' ops gain nothing from more, and on a shared CPU spinning workers cost several times
    the step time; both runs a test compares then also reduce in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_adamw_runs_agree(
    after: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, lr: float
) -> None:
    """Parameters of two AdamW runs whose gradients differ only in summation order (~1e-6
    relative, e.g. micro-batches against the whole batch) agree.

    AdamW's update ``lr*m/(sqrt(v)+eps)`` is scale-free: an entry whose gradient is far above the
    rounding noise moves alike to ~1e-6*lr, but one whose gradient is near zero has its update
    set by that noise (on one CPU an absolute 1e-5 bound failed for 1 entry of 4,096 in one
    tensor, 1.6e-3*lr after 2 steps: ``tests/hf/test_recovery.py -k micro`` before this
    helper). So at most 1 in 1,000 entries may be more than 1e-3*lr apart and none more than
    1e-2*lr; a lost or repeated sample moves entries by whole updates.
    """
    assert after.keys() == expected.keys()
    diffs = torch.cat([(after[n] - expected[n]).abs().flatten().double() for n in expected])
    assert diffs.max() <= 1e-2 * lr, f"an entry {diffs.max():.3g} apart (allowed {1e-2 * lr:.3g})"
    apart = int((diffs > 1e-3 * lr).sum())
    allowed = diffs.numel() // 1000
    assert apart <= allowed, f"{apart} of {diffs.numel()} entries more than {1e-3 * lr:.3g} apart"


def assert_moe_lora_quantized(model: nn.Module) -> None:
    """``model`` (LoRA from :func:`ciuic.lora_targets`, then ``weights="nf4"`` through a trainer)
    holds its MLP and shared-expert bases as PEFT's bitsandbytes LoRA layers and its routed
    experts quantized under their expert LoRA, with weight bytes under 0.30x of bf16."""
    import ciuic
    from ciuic.weights.expert_lora import QuantizedParamWrapper
    from ciuic.weights.experts import QuantizedExperts

    handle = ciuic.handle_of(model)
    assert handle is not None
    record = handle.record("weights")
    assert record is not None and record.details["ratio_vs_bf16"] <= 0.30, record
    mlps = [m for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    assert mlps and all(type(m).__module__ == "peft.tuners.lora.bnb" for m in mlps), mlps
    experts = sum(isinstance(m, QuantizedExperts) for m in model.modules())
    assert experts and sum(type(m) is QuantizedParamWrapper for m in model.modules()) == 2 * experts
