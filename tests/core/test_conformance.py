"""The same checks for every registered technique, on the tiny DeepSeek-V3 with LoRA.

Each configuration is applied with ``ciuic.apply_``; a training step runs; ``remove_`` gives back
a model with the same modules and state keys as a never-touched copy, whose training step is
bitwise equal to the copy's unless the technique is lossy by design (quantized weights come back
dequantized).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig
from tests.models import deepseek_v3, lora, progressions

CONFIGS = {
    "weights_nf4": CiuicConfig(weights="nf4"),
    "weights_int8": CiuicConfig(weights="int8"),
    "activations_int4": CiuicConfig(activations="int4"),
    "offload_activations": CiuicConfig(offload={"activations"}),
    "checkpointing_full": CiuicConfig(checkpointing="full"),
    "loss_chunked": CiuicConfig(loss="chunked"),
    "preset_balanced": CiuicConfig.preset("balanced"),
    "preset_max": CiuicConfig.preset("max"),
}
LOSSY_AFTER_REMOVE = {"weights_nf4", "weights_int8", "preset_balanced", "preset_max"}


def _step(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids = progressions(batch_size=2, seq_len=16)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_apply_step_remove(name: str) -> None:
    config = CONFIGS[name]
    model = lora(deepseek_v3())
    untouched = copy.deepcopy(model)
    handle = ciuic.apply_(model, config)
    served = {applied.technique for applied in handle.applied}
    assert served, handle.report()
    assert not [why for why in handle.skipped if "no installed technique" in str(why)], handle.report()
    loss, grads = _step(model)
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    ciuic.remove_(model)
    assert _structure(model) == _structure(untouched)
    assert list(model.state_dict()) == list(untouched.state_dict())
    if name in LOSSY_AFTER_REMOVE:
        return
    after, after_grads = _step(model)
    expected, expected_grads = _step(untouched)
    assert torch.equal(after, expected)
    assert all(torch.equal(a, b) for a, b in zip(after_grads, expected_grads, strict=True))


@pytest.mark.parametrize("name", ["weights_nf4", "loss_chunked", "checkpointing_full"])
def test_a_model_with_nothing_to_serve_is_refused_naming_the_field(name: str) -> None:
    """A model without what the technique works on (a bare trainable ``nn.Linear``: no frozen
    weights, no ``lm_head``, no blocks) is refused before training; never a silent no-op.
    Compression and offload of saved tensors serve any module, so they have no such case."""
    field = name.split("_")[0]
    with pytest.raises(ciuic.errors.CiuicError, match=field):
        ciuic.apply_(nn.Linear(8, 8), CONFIGS[name])
