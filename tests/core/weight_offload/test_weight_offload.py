"""``offload={"weights"}``: the device holds about two decoder blocks of frozen weights, the host
holds all of them, training is bitwise the run without the offload, routed experts are fetched
only when picked, ``remove_`` gives the weights back bitwise."""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import pytest
import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.activations import find_blocks
from ciuic.weight_offload import WeightStreamer
from ciuic.weights.experts import QuantizedExperts
from tests.gpu import requires_cuda
from tests.models import COPIES, deepseek_v3, llama, lora, progressions

LAYERS = 4  # one dense decoder layer, then three MoE layers
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _model(targets: tuple[str, ...] | None = None, **kwargs: int) -> nn.Module:
    model = deepseek_v3(num_layers=LAYERS, **kwargs)
    return lora(model) if targets is None else lora(model, targets=targets)


def _frozen_bytes(module: nn.Module) -> int:
    """Bytes of frozen weights, by the meter: what it counts as parameters (parameters, buffers,
    quantization state) less the trainable parameters and the non-persistent buffers."""
    with MemoryMeter(device="cpu", track=(module,)) as meter:
        pass
    return meter.peak_by_category["parameters"] - _trainable(module) - _transient(module)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _transient(module: nn.Module) -> int:
    """Bytes of non-persistent buffers (the rotary ``inv_freq``): not weights, not offloaded."""
    return sum(
        b.numel() * b.element_size()
        for m in module.modules()
        for name, b in m.named_buffers(recurse=False)
        if name in m._non_persistent_buffers_set
    )


def _train(
    model: nn.Module, config: CiuicConfig, steps: int = 3, *, metered: bool = False
) -> tuple[list[torch.Tensor], MemoryMeter]:
    handle = ciuic.apply_(model, config)
    optimizer = ciuic.build_optimizer(
        [p for p in model.parameters() if p.requires_grad], handle.config, lr=1e-2
    )
    losses = []
    meter = MemoryMeter(device="cpu", track=(model, optimizer))
    with meter if metered else contextlib.nullcontext():
        for step in range(steps):
            ids = progressions(batch_size=2, seq_len=16, seed=step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    return losses, meter


def _same_bits(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "nf4": {"weights": "nf4"},
    "checkpointing": {"checkpointing": "full"},
    "step_in_backward": {"step_in_backward": True},
    "nf4_checkpointing_step_in_backward": {
        "weights": "nf4",
        "checkpointing": "full",
        "step_in_backward": True,
    },
    "activations_int8_offloaded": {"activations": "int8", "offload": {"activations"}},
    "int8": {"weights": "int8"},
}


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_routed_expert_rows_train_bitwise_like_the_run_without_offload(checkpointing: str) -> None:
    model, twin = _model(ATTENTION), _model(ATTENTION)  # experts without LoRA: QuantizedExperts
    expected, _ = _train(model, CiuicConfig(weights="nf4", checkpointing=checkpointing))
    losses, _ = _train(twin, CiuicConfig(weights="nf4", checkpointing=checkpointing, offload={"weights"}))
    assert ciuic.handle_of(twin).record("weight_offload").details["expert_modules"]
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert _same_bits(twin, model)


def test_demo_lora_with_trained_head_and_embeddings_is_bitwise_the_run_without_offload() -> None:
    """``ciuic.demo.add_lora`` trains copies of ``lm_head`` and ``embed_tokens``
    (``modules_to_save``): they stay on the device, the frozen originals go to the host."""
    from ciuic.demo import add_lora

    model, twin = add_lora(deepseek_v3(num_layers=LAYERS)), add_lora(deepseek_v3(num_layers=LAYERS))
    expected, _ = _train(model, CiuicConfig())
    losses, _ = _train(twin, CiuicConfig(offload={"weights"}))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert _same_bits(twin, model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_is_bitwise_the_run_without_offload(variant: str) -> None:
    fields = dict(VARIANTS[variant])
    offload = set(fields.pop("offload", set()))
    model, twin = _model(), _model()
    expected, _ = _train(model, CiuicConfig(offload=offload, **fields))
    losses, _ = _train(twin, CiuicConfig(offload=offload | {"weights"}, **fields))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert _same_bits(twin, model)  # every parameter (frozen ones read from the host copies)
    ciuic.remove_(model)
    ciuic.remove_(twin)
    assert _same_bits(twin, model)


@pytest.mark.parametrize("weights", ["none", "nf4"])
def test_device_holds_at_most_two_and_a_half_blocks_and_the_host_all_weights(weights: str) -> None:
    model, twin = _model(), _model()
    _, plain = _train(twin, CiuicConfig(weights=weights), metered=True)
    frozen = _frozen_bytes(twin)  # of the model as trained: NF4 blocks and scales with weights='nf4'
    block = max(_frozen_bytes(b) for b in find_blocks(twin))  # a block's worth
    trainable = _trainable(twin) + _transient(twin)  # on the device either way
    assert plain.peak_by_category["parameters"] - trainable == frozen  # without offload: all of them
    assert frozen >= 0.8 * LAYERS * block  # the blocks are most of the weights

    _, meter = _train(model, CiuicConfig(weights=weights, offload={"weights"}), metered=True)
    on_device = meter.peak_by_category["parameters"] - trainable
    assert on_device <= 2.5 * block, meter.report()
    assert meter.peak_by_category["offloaded"] == frozen, meter.report()
    assert meter.peak_offloaded_bytes == frozen


def test_only_the_routed_experts_the_router_picked_are_fetched() -> None:
    model = _model(ATTENTION, num_experts=8)  # experts without LoRA: weights='nf4' stores them per expert
    handle = ciuic.apply_(model, CiuicConfig(weights="nf4", offload={"weights"}))
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    experts = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}
    assert sorted(experts) == sorted(streamer.expert_modules) and len(experts) == LAYERS - 1
    picked: dict[str, set[int]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, name=n: picked.setdefault(name, set()).update(args[1].flatten().tolist())
        )
        for n, m in experts.items()
    ]
    ids = progressions(batch_size=1, seq_len=2)
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    fetched: dict[str, list[int]] = {}
    for name, _, expert in streamer.expert_fetches:
        fetched.setdefault(name, []).append(expert)
    for name in experts:
        assert set(fetched[name]) == picked[name] and len(picked[name]) < 8
        # gate_up_proj and down_proj, in forward and again in backward
        assert sorted(fetched[name]) == sorted(list(picked[name]) * 4)
    ciuic.remove_(model)


def test_remove_restores_the_weights_bitwise_and_state_dict_reads_the_host_copies() -> None:
    model = _model()
    untouched = copy.deepcopy(model)
    handle = ciuic.apply_(model, CiuicConfig(offload={"weights"}))
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    assert streamer.resident_bytes == 0
    assert all(s.view.untyped_storage().nbytes() == 0 for s in streamer.slots.values())
    assert _same_bits(model, untouched)  # state_dict while offloaded: the host copies
    ids = progressions(batch_size=2, seq_len=16)
    model(input_ids=ids, labels=ids).loss.backward()
    assert streamer.resident_bytes == 0  # freed again when backward ended
    ciuic.remove_(model)
    frozen = [n for n, p in untouched.named_parameters() if not p.requires_grad]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], dict(untouched.named_parameters())[n]) for n in frozen)


def test_forward_and_backward_fetch_each_block_once() -> None:
    model = _model()
    handle = ciuic.apply_(model, CiuicConfig(offload={"weights"}))
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    ids = progressions(batch_size=2, seq_len=16)
    model(input_ids=ids, labels=ids).loss.backward()
    assert [streamer.fetches[f"block {i}"] for i in range(LAYERS)] == [2] * LAYERS
    with torch.no_grad():
        model(input_ids=ids)
    assert [streamer.fetches[f"block {i}"] for i in range(LAYERS)] == [3] * LAYERS
    blocks = handle.record("weight_offload").details["block_bytes"]
    assert streamer.max_resident_bytes <= max(a + b for a, b in itertools.pairwise(blocks)) + _outside(
        streamer
    )
    ciuic.remove_(model)


def _outside(streamer: WeightStreamer) -> int:
    return max(u.nbytes for u in streamer.units if u.block is None)


def test_a_model_without_frozen_weights_is_refused_naming_the_field() -> None:
    with pytest.raises(ciuic.ApplyError, match=r"offload=\{'weights'\}"):
        ciuic.apply_(nn.Linear(8, 8), CiuicConfig(offload={"weights"}))


def test_config_round_trips() -> None:
    config = CiuicConfig(offload={"weights", "activations"})
    assert CiuicConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["offload"] == ["activations", "weights"]


def test_runs_under_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = lora(llama(num_layers=4), targets=("q_proj", "v_proj"))
    frozen, block = _frozen_bytes(real), _frozen_bytes(find_blocks(real)[0])
    with torch.device("meta"):
        model = lora(llama(num_layers=4), targets=("q_proj", "v_proj"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        handle = ciuic.apply_(model, CiuicConfig(offload={"weights"}))
        with MemoryMeter(device="cpu", track=(model,)) as meter:
            ids = torch.zeros(1, 8, dtype=torch.long)
            model(input_ids=ids, labels=ids).loss.backward()
    streamer: WeightStreamer = handle.record("weight_offload").details["streamer"]
    assert meter.peak_by_category["offloaded"] == frozen
    assert 0 < streamer.max_resident_bytes <= 2 * block + _outside(streamer)


@requires_cuda
def test_cuda_training_is_bitwise_the_run_without_offload() -> None:
    model, twin = _model().cuda(), _model().cuda()
    expected, _ = _train_on(model, CiuicConfig(checkpointing="full"), "cuda")
    losses, meter = _train_on(twin, CiuicConfig(checkpointing="full", offload={"weights"}), "cuda")
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert _same_bits(twin, model)
    block = max(_frozen_bytes(b) for b in find_blocks(model))
    trainable = sum(p.numel() * p.element_size() for p in twin.parameters() if p.requires_grad)
    assert meter.peak_by_category["parameters"] - trainable <= 2.5 * block, meter.report()


def _train_on(model: nn.Module, config: CiuicConfig, device: str) -> tuple[list[torch.Tensor], MemoryMeter]:
    handle = ciuic.apply_(model, config)
    optimizer = ciuic.build_optimizer(
        [p for p in model.parameters() if p.requires_grad], handle.config, lr=1e-2
    )
    losses = []
    with MemoryMeter(device=device, track=(model, optimizer)) as meter:
        for step in range(3):
            ids = progressions(batch_size=2, seq_len=16, seed=step).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    return losses, meter


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_an_offloaded_model_trains_bitwise_like_the_original(how: str) -> None:
    model = _model()
    ciuic.apply_(model, CiuicConfig(offload={"weights"}))
    twin = COPIES[how](model)
    for m in (model, twin):
        ids = progressions(batch_size=2, seq_len=16)
        m(input_ids=ids, labels=ids).loss.backward()
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (model, twin)]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    streamer = ciuic.handle_of(twin).record("weight_offload").details["streamer"]
    assert streamer.resident_bytes == 0 and streamer.model is twin
    ciuic.remove_(twin)
    assert _same_bits(twin, model)
