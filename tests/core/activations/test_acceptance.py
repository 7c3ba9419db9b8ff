"""Issue 3 acceptance figures on the tiny DeepSeek-V3 (MLA, MoE) with PEFT LoRA, bf16 autocast,
batch 2 x 256 tokens, measured with ``MemoryMeter`` on CPU.

"Saved bytes" are the bytes held for backward when the forward pass ends (all of them are
alive then): see ``figures.saved_at_end_of_forward``.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig
from tests.core.activations.figures import Step, cosine, lora_step
from tests.models import deepseek_v3, lora, progressions

# Saved-activation bytes at least this many times smaller than with activations='none'.
MIN_RATIO = {"int8": 1.9, "fp8": 1.9, "int4": 3.5, "int2": 6.0}
# Cosine of the LoRA gradient with the exact step's.
MIN_COSINE = {"int8": 0.999, "fp8": 0.995, "int4": 0.99, "int2": 0.90}


def _model() -> nn.Module:
    return lora(deepseek_v3())


def _batch() -> torch.Tensor:
    return progressions(batch_size=2, seq_len=256)


@cache
def _measured(config: CiuicConfig | None) -> Step:
    model = _model()
    if config is not None:
        ciuic.apply_(model, config)
    return lora_step(model, _batch())


@pytest.mark.parametrize("codec", list(MIN_RATIO))
def test_saved_bytes_and_gradientcosine(codec: str) -> None:
    exact, step = _measured(None), _measured(CiuicConfig(activations=codec))
    assert exact.saved > 7_000_000  # the baseline is the real thing: 8 MB saved
    assert exact.saved / step.saved >= MIN_RATIO[codec]
    assert cosine(step.grads, exact.grads) >= MIN_COSINE[codec]
    assert torch.equal(step.loss, exact.loss)  # the forward pass stays exact


def test_offload_leaves_at_most_a_tenth_on_the_device() -> None:
    exact, step = _measured(None), _measured(CiuicConfig(offload={"activations"}))
    assert step.saved <= 0.10 * exact.saved
    assert step.offloaded >= 0.9 * exact.saved  # it went to host memory, uncompressed
    compressed = _measured(CiuicConfig(activations="int4", offload={"activations"}))
    assert compressed.saved <= 0.10 * exact.saved
    assert compressed.offloaded * 3.5 <= step.offloaded  # compress-then-offload moves fewer bytes


@pytest.mark.parametrize(
    "config",
    [
        CiuicConfig(offload={"activations"}),
        CiuicConfig(checkpointing="full"),
        CiuicConfig(checkpointing=2),
        CiuicConfig(checkpointing="auto", budget=1),
        CiuicConfig(offload={"activations"}, checkpointing="full"),
    ],
    ids=["offload", "checkpoint-full", "checkpoint-every-2", "checkpoint-auto", "offload+checkpoint"],
)
def test_lossless_techniques_are_bitwise_exact(config: CiuicConfig) -> None:
    exact, step = _measured(None), _measured(config)
    assert torch.equal(step.loss, exact.loss)
    assert torch.equal(step.grads, exact.grads)


def test_checkpointing_saves_activation_memory() -> None:
    exact, step = _measured(None), _measured(CiuicConfig(checkpointing="full"))
    assert step.saved <= 0.5 * exact.saved


def test_remove_restores_the_model_bitwise() -> None:
    touched, untouched = _model(), _model()
    before = _module_state(touched)
    ciuic.apply_(touched, CiuicConfig(activations="int2", offload={"activations"}, checkpointing="full"))
    ids = _batch()
    lora_step(touched, ids)
    ciuic.remove_(touched)
    after, reference = lora_step(touched, ids), lora_step(untouched, ids)
    assert torch.equal(after.loss, reference.loss)
    assert torch.equal(after.grads, reference.grads)
    assert after.saved == reference.saved
    assert _module_state(touched) == before


def _module_state(model: nn.Module) -> dict[str, tuple[object, ...]]:
    """Instance attributes and hook counts of every module."""
    return {
        name: (
            {k: v for k, v in vars(m).items() if not isinstance(v, (dict, nn.Module, torch.Tensor))},
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
        )
        for name, m in model.named_modules()
    }


def test_lora_dropout_masks_and_gradient_accumulation() -> None:
    """PEFT LoRA with dropout (bool masks packed to 1 bit) over two accumulated micro-batches."""
    from peft import LoraConfig, get_peft_model

    def run(config: CiuicConfig | None) -> torch.Tensor:
        model = get_peft_model(
            deepseek_v3(), LoraConfig(r=8, lora_dropout=0.1, target_modules=["o_proj", "kv_b_proj"])
        )
        if config is not None:
            ciuic.apply_(model, config)
        torch.manual_seed(1)
        for seed in (0, 1):
            ids = progressions(batch_size=2, seq_len=64, seed=seed)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    exact = run(None)
    assert torch.equal(run(CiuicConfig(offload={"activations"}, checkpointing="full")), exact)
    assert cosine(run(CiuicConfig(activations="int8")), exact) >= 0.999


def test_eval_and_no_grad_are_untouched() -> None:
    model, reference = _model(), _model()
    handle = ciuic.apply_(model, CiuicConfig(activations="int2", checkpointing="full"))
    ids = _batch()[:, :64]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    model.eval()
    out = model(input_ids=ids, labels=ids).loss
    assert torch.equal(out, reference.eval()(input_ids=ids, labels=ids).loss)
    out.backward()  # eval with gradients: saved exactly, nothing packed
    stats = handle.applied[0].details["stats"]
    assert stats.packed == 0 and stats.kept == 0
    ciuic.remove_(model)


def test_apply_twice_without_remove_is_refused() -> None:
    model = _model()
    ciuic.apply_(model, CiuicConfig(activations="int8"))
    with pytest.raises(ciuic.ApplyError, match="already applied"):
        ciuic.apply_(model, CiuicConfig(activations="int4"))
    ciuic.remove_(model)
