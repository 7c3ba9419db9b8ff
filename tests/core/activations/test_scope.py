"""Step scope: a wrapper whose step calls an inner model packs inside the scope, and refuses
(`InertTechniqueError`) a backward that the hooks never saw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.errors import InertTechniqueError
from tests.models import progressions, qwen2


class Wrapper(nn.Module):
    """What a LightningModule looks like to ciuic: the step calls ``self.model``, not ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.training_step(ids)

    def training_step(self, batch: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.model(input_ids=batch, labels=batch).loss
        return loss


def _ids() -> torch.Tensor:
    return progressions(batch_size=2, seq_len=64)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_inside_the_scope_an_inner_call_is_packed() -> None:
    reference = Wrapper(qwen2())
    with MemoryMeter(device="cpu", track=(reference,)) as exact:
        reference.training_step(_ids()).backward()
    wrapper = Wrapper(qwen2())
    record = ciuic.apply_(wrapper, CiuicConfig(activations="int8")).applied[0]
    assert record.scope is not None
    with MemoryMeter(device="cpu", track=(wrapper,)) as meter, record.scope():
        wrapper.training_step(_ids()).backward()
    assert record.details["stats"].packed > 0
    assert meter.peak_by_category["activations"] < 0.5 * exact.peak_by_category["activations"]
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # the scope left
    ciuic.remove_(wrapper)


def test_without_the_scope_the_first_backward_says_what_to_do() -> None:
    wrapper = Wrapper(qwen2())
    record = ciuic.apply_(wrapper, CiuicConfig(activations="int8")).applied[0]
    loss = wrapper.training_step(_ids())
    with pytest.raises(InertTechniqueError, match=r"never entered.*step scope.*model\.train\(\)"):
        loss.backward()
    assert record.details["stats"].packed == 0
    with record.scope():  # the same model, now inside the scope: it packs and runs
        wrapper.training_step(_ids()).backward()
    assert record.details["stats"].packed > 0
    ciuic.remove_(wrapper)


def test_the_check_goes_once_a_backward_saw_the_hooks() -> None:
    wrapper = Wrapper(qwen2())
    record = ciuic.apply_(wrapper, CiuicConfig(activations="int8")).applied[0]
    hooks = record.details["hooks"]
    wrapper(_ids()).backward()  # the root's forward enters the hooks: no scope needed
    assert hooks._checks  # removed at the next entry, not inside backward
    wrapper(_ids()).backward()
    assert not hooks._checks and not any(p._backward_hooks for p in wrapper.parameters())
    ciuic.remove_(wrapper)


def test_root_forward_inside_the_scope_is_the_same_step() -> None:
    alone, scoped = Wrapper(qwen2()), Wrapper(qwen2())
    ciuic.apply_(alone, CiuicConfig(offload={"activations"}))
    record = ciuic.apply_(scoped, CiuicConfig(offload={"activations"})).applied[0]
    alone(_ids()).backward()
    with record.scope():
        scoped(_ids()).backward()  # entered once by the scope, not again by the root forward
        assert record.details["hooks"]._local.depth == 1
    assert all(torch.equal(a, b) for a, b in zip(_grads(alone), _grads(scoped), strict=True))
    assert record.details["stats"].offloaded > 0


def test_eval_and_no_grad_inside_the_scope_are_untouched() -> None:
    reference = Wrapper(qwen2()).eval()
    wrapper = Wrapper(qwen2())
    record = ciuic.apply_(wrapper, CiuicConfig(activations="int2")).applied[0]
    with torch.no_grad(), record.scope():
        assert torch.equal(wrapper.training_step(_ids()), reference.training_step(_ids()))
    wrapper.eval()
    with record.scope():
        loss = wrapper.training_step(_ids())
        assert torch.equal(loss, reference.training_step(_ids()))
        loss.backward()  # eval with gradients: saved exactly, and no InertTechniqueError
    assert record.details["stats"].packed == 0 and record.details["stats"].kept == 0
    ciuic.remove_(wrapper)


def test_auto_checkpointing_decides_at_the_inner_call() -> None:
    reference = Wrapper(qwen2())
    reference.training_step(_ids()).backward()
    wrapper = Wrapper(qwen2())
    record = ciuic.apply_(wrapper, CiuicConfig(checkpointing="auto", budget=1)).applied[0]
    with pytest.warns(UserWarning, match="over budget=1"):
        wrapper.training_step(_ids()).backward()
    decision = record.details["checkpointing"]
    assert decision["checkpointed"] == [0, 1]
    assert len(decision["saved_per_block"]) == 2 and min(decision["saved_per_block"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(_grads(reference), _grads(wrapper), strict=True))
    ciuic.remove_(wrapper)
