"""Selective checkpointing: which blocks, lossless gradients, and the 'auto' decision."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.activations import checkpointed_indices, find_blocks
from ciuic.activations.checkpoint import _fixed_bytes
from ciuic.errors import ApplyError
from tests.models import deepseek_v3, lora, progressions


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    """A plain PyTorch model (no Hugging Face layer class)."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    with MemoryMeter(device="cpu", track=(model,)) as meter:
        model(x).sum().backward()
    return [p.grad for p in model.parameters()], meter.peak_by_category["activations"]


@pytest.mark.parametrize(("checkpointing", "chosen"), [("full", [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3])])
def test_plain_blocks_every_n_are_lossless(checkpointing: object, chosen: list[int]) -> None:
    x = torch.randn(128, 64, requires_grad=True)
    exact_grads, exact_bytes = _step(Stack(), x)
    model = Stack()
    handle = ciuic.apply_(model, CiuicConfig(checkpointing=checkpointing))
    assert checkpointed_indices(find_blocks(model)) == chosen
    grads, saved = _step(model, x)
    assert all(torch.equal(a, b) for a, b in zip(grads, exact_grads, strict=True))
    assert saved < exact_bytes
    assert handle.applied[0].details["checkpointing"] == {"checkpointed": chosen}
    ciuic.remove_(model)
    assert checkpointed_indices(find_blocks(model)) == []


def test_no_blocks_is_an_error_naming_the_fix() -> None:
    with pytest.raises(ApplyError, match=r"checkpointing='full'.*no decoder blocks"):
        ciuic.apply_(nn.Linear(4, 4), CiuicConfig(checkpointing="full"))


def test_auto_without_budget_on_cpu_is_skipped_with_a_reason() -> None:
    handle = ciuic.apply_(Stack(), CiuicConfig(checkpointing="auto"))
    assert handle.applied[0].skipped == [
        ("checkpointing='auto'", "budget=None on CPU: no limit to fit, nothing checkpointed")
    ]


def _auto(budget: int) -> tuple[nn.Module, dict[str, object]]:
    model = lora(deepseek_v3())
    handle = ciuic.apply_(model, CiuicConfig(checkpointing="auto", budget=budget))
    ids = progressions(batch_size=2, seq_len=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    return model, handle.applied[0].details["checkpointing"]


def test_auto_checkpoints_the_fewest_blocks_that_fit() -> None:
    model, measured = _auto(2**40)  # everything fits: nothing checkpointed
    assert measured["checkpointed"] == []
    kept, inputs = measured["saved_per_block"], measured["inputs_per_block"]
    assert all(k > 10 * i for k, i in zip(kept, inputs, strict=True))  # a block keeps far more than its input
    everything = _fixed_bytes(model) + measured["saved_outside"] + sum(kept)
    assert _auto(everything)[1]["checkpointed"] == []
    # one byte less: recomputing the first block is enough (the last one would not help: when
    # backward recomputes it, every block before it still holds its tensors)
    assert _auto(everything - 1)[1]["checkpointed"] == [0]
    with pytest.warns(UserWarning, match="over budget=1"):
        assert _auto(1)[1]["checkpointed"] == [0, 1]


def test_auto_is_lossless() -> None:
    exact = lora(deepseek_v3())
    ids = progressions(batch_size=2, seq_len=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact(input_ids=ids, labels=ids).loss.backward()
    with pytest.warns(UserWarning):
        model, decision = _auto(1)
    assert decision["checkpointed"] == [0, 1]
    got = [p.grad for p in model.parameters() if p.requires_grad]
    want = [p.grad for p in exact.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_checkpointed_block_inputs_are_compressed() -> None:
    ids = progressions(batch_size=2, seq_len=128)
    grads = {}
    for name, config in {
        "exact": None,
        "int8+full": CiuicConfig(activations="int8", checkpointing="full"),
    }.items():
        model = lora(deepseek_v3())
        handle = ciuic.apply_(model, config) if config else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        if handle is not None:
            assert handle.applied[0].details["stats"].by_codec.get("int8", 0) >= 2  # the block inputs
    cosine = torch.nn.functional.cosine_similarity(grads["int8+full"], grads["exact"], dim=0)
    assert cosine >= 0.999


def test_blocks_are_the_outer_list_not_the_experts_inside() -> None:
    class MoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(16))

    class MoeModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(MoeBlock() for _ in range(3))

    model = MoeModel()
    assert find_blocks(model) == tuple(model.layers)
    hf = lora(deepseek_v3())
    assert [type(b).__name__ for b in find_blocks(hf)] == ["DeepseekV3DecoderLayer"] * 2


def test_checkpointed_plain_blocks_survive_deepcopy() -> None:
    x = torch.randn(128, 64, requires_grad=True)
    exact_grads, _ = _step(Stack(), x)
    model = Stack()
    ciuic.apply_(model, CiuicConfig(checkpointing=2))
    clone = copy.deepcopy(model)
    assert all(b.forward.module is b for b in (clone.blocks[0], clone.blocks[2]))  # the copy's own
    grads, _ = _step(clone, x)
    assert all(torch.equal(a, b) for a, b in zip(grads, exact_grads, strict=True))
    ciuic.remove_(model)
