"""A model with activations applied survives deepcopy, pickle and torch.save: the copy's next
step is bitwise the original's, and its hooks act on the copy."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig
from ciuic.activations import SavedTensorHooks, checkpointed_indices, find_blocks
from tests.models import COPIES, deepseek_v3, lora, progressions

CONFIG = CiuicConfig(activations="int8", offload={"activations"}, checkpointing=2)




def _hooks_of(model: nn.Module) -> SavedTensorHooks:
    found = [getattr(h, "__self__", None) for h in model._forward_pre_hooks.values()]
    hooks = [h for h in found if isinstance(h, SavedTensorHooks)]
    assert len(hooks) == 1
    return hooks[0]


def _step(model: nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids = progressions(batch_size=2, seq_len=64, seed=seed)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _equal(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


@pytest.mark.parametrize("how", list(COPIES))
def test_copy_steps_bitwise_like_the_original(how: str) -> None:
    model = lora(deepseek_v3())
    ciuic.apply_(model, CONFIG)
    _step(model, seed=0)  # the generators have moved on: the copy must take their state
    clone = COPIES[how](model)
    hooks, clone_hooks = _hooks_of(model), _hooks_of(clone)
    assert clone_hooks is not hooks and clone_hooks.model is clone
    assert checkpointed_indices(find_blocks(clone)) == [0]
    packed = hooks.stats.packed
    copied = _step(clone, seed=1)
    assert hooks.stats.packed == packed  # the copy's hooks act on the copy only
    assert clone_hooks.stats.packed > packed and clone_hooks.stats.offloaded > 0
    assert _equal(copied, _step(model, seed=1))


def test_undo_survives_the_copy() -> None:
    model = lora(deepseek_v3())
    record = ciuic.apply_(model, CONFIG).applied[0]
    undo = pickle.loads(pickle.dumps((model, record.undo)))
    clone, clone_undo = undo
    clone_undo()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in clone.modules())
    assert checkpointed_indices(find_blocks(clone)) == []
    assert checkpointed_indices(find_blocks(model)) == [0]  # the original is left as it was
    ciuic.remove_(model)


def test_generator_state_dict_gives_bitwise_continuation() -> None:
    model = lora(deepseek_v3())
    ciuic.apply_(model, CONFIG)
    _step(model, seed=0)
    hooks = _hooks_of(model)
    saved = copy.deepcopy(hooks.state_dict())
    first = _step(model, seed=1)
    assert not _equal(_step(model, seed=1), first)  # the stochastic rounding moved on
    hooks.load_state_dict(saved)
    assert _equal(_step(model, seed=1), first)
    ciuic.remove_(model)
