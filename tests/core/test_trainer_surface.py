"""The core as a trainer drives it (issue #10's acceptance): presets through a wrapper inside the
step scope, copies of applied models, checkpoint round trips, ``handle.update``.

Every run is the tiny DeepSeek-V3 with PEFT LoRA (PEFT first, then Ciuic), on CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ciuic
from ciuic.errors import InertTechniqueError
from ciuic.weights import dense_state_dict
from tests.models import COPIES, deepseek_v3, lora, progressions

PRESETS = ("balanced", "max")


class Wrapper(nn.Module):
    """What a LightningModule is to the model: it holds it and calls it from another method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss


def _model() -> nn.Module:
    return lora(deepseek_v3())


def _batch(step: int) -> torch.Tensor:
    return progressions(batch_size=2, seq_len=16, seed=step)


def _optimizer(model: nn.Module, config: ciuic.CiuicConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ciuic.build_optimizer(trainable, config, lr=1e-2, weight_decay=0.0)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    """One loop for every test here: forward with labels, backward, step, zero_grad."""
    losses = []
    for step in steps:
        ids = _batch(step)
        with ciuic.step_scope(model):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]


def _assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for name, value in sa[key].items():
            other = sb[key][name]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, (key, name)


@pytest.mark.parametrize("preset", ["off", *PRESETS])
def test_every_preset_acts_through_a_wrapper_inside_the_step_scope(preset: str) -> None:
    wrapper = Wrapper(_model())
    handle = ciuic.apply_(wrapper, preset)
    ids = _batch(0)
    with handle.step_scope():
        out = wrapper.model(input_ids=ids, labels=ids)
        out.loss.backward()
    activations, loss = handle.record("activations"), handle.record("loss")
    if preset == "off":
        assert activations is None and loss is None and out.logits is not None
        return
    assert out.logits is None, "the loss was not chunked"
    assert loss is not None and loss.changed
    assert activations is not None and activations.details["stats"].packed > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_without_the_scope_the_first_backward_through_a_wrapper_raises(preset: str) -> None:
    wrapper = Wrapper(_model())
    ciuic.apply_(wrapper, preset)
    with pytest.raises(InertTechniqueError, match="step_scope"):
        wrapper.training_step(_batch(0)).backward()


@pytest.mark.parametrize(
    ("preset", "how"),
    [("max", "deepcopy"), ("max", "pickle"), ("max", "torch_save"), ("balanced", "deepcopy")],
)
def test_a_copy_of_an_applied_model_trains_bitwise_like_the_original(preset: str, how: str) -> None:
    model = _model()
    handle = ciuic.apply_(model, preset)
    _train(model, _optimizer(model, handle.config), range(1))
    twin = COPIES[how](model)
    twin_handle = ciuic.handle_of(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin
    losses = _train(model, _optimizer(model, handle.config), range(1, 3))
    twin_losses = _train(twin, _optimizer(twin, handle.config), range(1, 3))
    assert all(torch.equal(a, b) for a, b in zip(losses, twin_losses, strict=True))
    _assert_same(_trainable(model), _trainable(twin))
    ciuic.remove_(twin)
    assert ciuic.handle_of(model) is handle  # removing from the copy leaves the original applied


@pytest.mark.parametrize("preset", PRESETS)
def test_checkpoint_round_trip_continues_bitwise(preset: str, tmp_path) -> None:
    """Save model and optimizer at step 10, rebuild from scratch, apply_, load, go on to 20."""
    reference = _model()
    handle = ciuic.apply_(reference, preset)
    reference_opt = _optimizer(reference, handle.config)
    _train(reference, reference_opt, range(20))

    model = _model()
    ciuic.apply_(model, preset)
    optimizer = _optimizer(model, handle.config)
    _train(model, optimizer, range(10))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    del model, optimizer

    resumed = _model()  # from scratch, as a restarted job does
    ciuic.apply_(resumed, preset)
    resumed_opt = _optimizer(resumed, handle.config)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ciuic.saved_config(checkpoint["model"]) == handle.config
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, range(10, 20))
    _assert_same(_trainable(resumed), _trainable(reference))
    _assert_same_optimizer(resumed_opt, reference_opt)


def test_dense_export_of_an_applied_model_loads_into_a_plain_model() -> None:
    """The dense export loads into a plain transformers model; its logits match the dequantized
    model's (the model after remove_)."""
    model = deepseek_v3().requires_grad_(False)  # a frozen base, as a QLoRA job's before PEFT
    ciuic.apply_(model, "max")
    dense = dense_state_dict(model)
    plain = deepseek_v3(seed=1)
    plain.load_state_dict(dense, strict=True)
    ciuic.remove_(model)
    ids = _batch(0)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)


def test_update_changes_only_the_techniques_whose_fields_differ() -> None:
    """balanced -> max with balanced's weights: only the activation technique is re-applied."""
    model = _model()
    handle = ciuic.apply_(model, "balanced")
    optimizer = _optimizer(model, handle.config)
    _train(model, optimizer, range(1))
    modules = dict(model.named_modules())
    weights, loss = handle.record("weights"), handle.record("loss")
    target = ciuic.CiuicConfig.preset("max", weights=handle.config.weights)
    assert handle.update(target) == ["activations"]
    assert handle.record("weights") is weights and handle.record("loss") is loss
    assert dict(model.named_modules()) == modules  # no module was swapped
    assert handle.config == target
    record = handle.record("activations")
    assert record is not None and record.details["codec"] == "int4" and record.details["offload"]
    assert "step_in_backward" in handle.report()  # deferred: the optimizer was left as it is
    _train(model, optimizer, range(1, 2))
    assert record.details["stats"].packed > 0


def test_update_from_balanced_to_max_requantizes_nothing_already_stored() -> None:
    """balanced -> max also stores head and embeddings in int8: the weights are re-applied, and
    the NF4 codes of the layers both presets quantize come back bitwise."""
    model = _model()
    handle = ciuic.apply_(model, "balanced")
    optimizer = _optimizer(model, handle.config)
    _train(model, optimizer, range(1))
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    assert handle.update("max") == ["weights", "loss", "activations"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tables = [m for n, m in model.named_modules() if n.endswith(("lm_head", "embed_tokens"))]
    assert {type(m).__name__ for m in tables} == {"QuantizedHead", "QuantizedEmbedding"}
    _train(model, optimizer, range(1, 2))
