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
from ciuic import CiuicConfig, registry
from tests.models import deepseek_v3, lora, progressions


def _examples() -> dict[str, tuple[str, CiuicConfig]]:
    """Every registered technique's example configs, named, with the technique they request."""
    examples = {}
    for name, technique in registry.registered_techniques().items():
        for data in technique.examples:
            label = "_".join(f"{k}_{v if isinstance(v, str) else '_'.join(v)}" for k, v in data.items())
            examples[label] = (name, CiuicConfig.from_dict(data))
    return examples


EXAMPLES = _examples()
CONFIGS = {label: config for label, (_, config) in EXAMPLES.items()}
CONFIGS.update({f"preset_{p}": CiuicConfig.preset(p) for p in ("balanced", "max")})
LOSSY_AFTER_REMOVE = {label for label, config in CONFIGS.items() if config.weights.enabled}


def test_every_registered_technique_has_examples_that_request_it() -> None:
    for name, technique in registry.registered_techniques().items():
        assert technique.examples, f"technique {name!r} registers no example config"
        served = {t for t, _ in EXAMPLES.values()}
        assert name in served
    for technique, config in EXAMPLES.values():
        assert technique in {t.name for t in registry.requested_techniques(config)}


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


@pytest.mark.parametrize("label", list(EXAMPLES))
def test_a_model_with_nothing_to_serve_is_refused_naming_the_field(label: str) -> None:
    """On a model without what the technique works on (a bare trainable ``nn.Linear``: no frozen
    weights, no ``lm_head``, no blocks) a technique either refuses before training, naming its
    field, or acts on it (compression and offload of saved tensors serve any module); never a
    silent no-op."""
    technique, config = EXAMPLES[label]
    field = next(iter(config.requested()))
    try:
        handle = ciuic.apply_(nn.Linear(8, 8), config)
    except ciuic.errors.CiuicError as error:
        assert field in str(error)
        return
    record = handle.record(technique)
    assert record is not None and record.changed, handle.report()
