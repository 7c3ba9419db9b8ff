import copy

import pytest
import torch
from torch import nn

import ciuic
from ciuic import registry
from ciuic.registry import Applied, Technique


@pytest.fixture
def techniques(monkeypatch):
    """An empty registry for the test; returns a function that registers a technique."""
    monkeypatch.setattr(registry, "_TECHNIQUES", {})
    monkeypatch.setattr(registry, "_OPTIMIZER_FACTORY", [])
    monkeypatch.setattr(registry, "_DISCOVERED", True)
    return registry.register_technique


def _scaling_technique(name, factor, order, log, field="activations"):
    """Multiplies every Linear output by ``factor`` through forward hooks."""

    def apply(model, config):
        handles = [
            m.register_forward_hook(lambda _m, _i, out: out * factor)
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]
        log.append(name)

        def undo():
            log.append(f"undo {name}")
            for handle in handles:
                handle.remove()

        return Applied(name, changed=[f"{len(handles)} linears"], undo=undo, details={"factor": factor})

    return Technique(
        name=name,
        fields=(field,),
        order=order,
        is_requested=lambda c: getattr(c, field) != "none",
        apply=apply,
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_apply_then_remove_restores_outputs_and_gradients_bitwise(techniques):
    log = []
    techniques(_scaling_technique("scale", 3.0, 30, log))
    model, reference = _model(), _model()
    x = torch.randn(4, 8)
    handle = ciuic.apply_(model, ciuic.CiuicConfig(activations="int8"))
    assert [r.technique for r in handle.applied] == ["scale"]
    assert not torch.equal(model(x), reference(x))
    assert ciuic.remove_(model) == handle.config
    model(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_techniques_apply_in_order_and_undo_in_reverse(techniques):
    log = []
    techniques(_scaling_technique("late", 2.0, 30, log, field="activations"))
    techniques(_scaling_technique("early", 2.0, 10, log, field="weights"))
    model = _model()
    ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4", activations="int4"))
    ciuic.remove_(model)
    assert log == ["early", "late", "undo late", "undo early"]


def test_failing_technique_leaves_model_unchanged(techniques):
    log = []
    techniques(_scaling_technique("first", 5.0, 10, log, field="weights"))

    def explode(model, config):
        raise RuntimeError("boom")

    techniques(Technique("broken", ("activations",), 30, lambda c: c.weights != "none", explode))
    model, reference = _model(), _model()
    with pytest.raises(RuntimeError, match="boom"):
        ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4"))
    x = torch.randn(3, 8)
    assert torch.equal(model(x), reference(x))
    assert log == ["first", "undo first"]
    ciuic.apply_(model, ciuic.CiuicConfig())  # not marked as applied after the failure


def test_unserved_requests_are_skipped_with_reason_and_warning(techniques):
    model = _model()
    with pytest.warns(UserWarning, match="weights skipped: no installed technique serves weights='nf4'"):
        handle = ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4", optimizer="adamw8bit", budget="1GiB"))
    assert [k for k, _ in handle.skipped] == ["weights"]
    assert [k for k, _ in handle.deferred] == ["optimizer", "budget"]
    report = handle.report()
    assert "skipped  weights: no installed technique" in report
    assert "deferred optimizer: served by ciuic.build_optimizer" in report


def test_offload_requests_are_per_member(techniques):
    config = ciuic.CiuicConfig(offload={"activations", "optimizer"})
    assert registry.request_keys(config) == ["offload.activations", "offload.optimizer"]
    with pytest.warns(UserWarning, match="offload.activations skipped"):
        handle = ciuic.apply_(_model(), config)
    assert [k for k, _ in handle.skipped] == ["offload.activations"]
    assert [k for k, _ in handle.deferred] == ["offload.optimizer"]


def test_apply_twice_and_remove_unapplied_raise(techniques):
    model = _model()
    handle = ciuic.apply_(model, "off")
    assert ciuic.handle_of(model) is handle
    assert "nothing requested" in handle.report()
    with pytest.raises(ciuic.ApplyError, match=r"already applied to this Sequential: call ciuic\.remove_"):
        ciuic.apply_(model, ciuic.CiuicConfig())
    ciuic.remove_(model)
    assert ciuic.handle_of(model) is None
    with pytest.raises(ciuic.ApplyError, match="not applied to this Sequential"):
        ciuic.remove_(model)


def test_apply_accepts_preset_names_and_dicts_and_rejects_others(techniques):
    assert ciuic.apply_(_model(), {"loss": "standard"}).config == ciuic.CiuicConfig()
    with pytest.raises(ciuic.ConfigError, match="preset='fastest' is unknown"):
        ciuic.apply_(_model(), "fastest")
    with pytest.raises(ciuic.ConfigError, match="is not a CiuicConfig"):
        ciuic.apply_(_model(), 42)  # type: ignore[arg-type]
    with pytest.raises(ciuic.ApplyError, match=r"is not a torch\.nn\.Module"):
        ciuic.apply_(object(), ciuic.CiuicConfig())  # type: ignore[arg-type]


def test_unknown_technique_lists_registered(techniques):
    techniques(_scaling_technique("scale", 1.0, 30, []))
    assert registry.get_technique("scale").order == 30
    with pytest.raises(
        ciuic.UnknownTechniqueError, match="'prune' is not registered: registered techniques are scale"
    ):
        registry.get_technique("prune")


def test_build_optimizer_plain_adamw_and_unavailable(techniques):
    params = list(_model().parameters())
    optimizer = ciuic.build_optimizer(params, ciuic.CiuicConfig(), lr=0.5, weight_decay=0.0)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(
        ciuic.TechniqueUnavailableError, match="step_in_backward=True needs the ciuic optimizer"
    ):
        ciuic.build_optimizer(params, ciuic.CiuicConfig(step_in_backward=True))


def test_build_optimizer_uses_registered_factory(techniques):
    calls = []

    def factory(params, config, **kwargs):
        calls.append((config.optimizer, kwargs))
        return torch.optim.SGD(params, lr=kwargs["lr"])

    registry.register_optimizer_factory(factory)
    optimizer = ciuic.build_optimizer(_model().parameters(), "max", lr=0.1)
    assert isinstance(optimizer, torch.optim.SGD)
    assert calls == [("adamw4bit", {"lr": 0.1})]


def test_discover_imports_every_subpackage(monkeypatch):
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    registry.discover()
    import sys

    assert "ciuic.memory" in sys.modules


def test_handle_is_not_stored_on_the_model(techniques):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    ciuic.apply_(model, ciuic.CiuicConfig())
    assert model.state_dict().keys() == before.keys()
    assert not [k for k in vars(model) if "ciuic" in k]
