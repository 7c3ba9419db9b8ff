import contextlib
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
        is_requested=lambda c: getattr(c, field) != getattr(ciuic.CiuicConfig(), field),
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


def test_discover_imports_every_technique_package_and_each_registers_itself():
    import pkgutil

    packages = sorted(m.name for m in pkgutil.iter_modules(ciuic.__path__) if m.ispkg)
    loaded = _modules_after("import ciuic")
    assert {f"ciuic.{name}" for name in packages} <= loaded
    modules = {t.apply.__module__.split(".")[1] for t in registry.registered_techniques().values()}
    assert modules <= set(packages)
    assert {"weights", "activations", "loss"} <= set(registry.registered_techniques())


def _modules_after(statement):
    import subprocess
    import sys

    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


class _Holder(nn.Module):
    """A module holding the model, as a LightningModule does."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_handle_is_stored_on_the_model_and_found_through_wrappers(techniques):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    handle = ciuic.apply_(model, ciuic.CiuicConfig())
    assert model.state_dict().keys() == before.keys()
    assert vars(model)["_ciuic_handle"] is handle
    holder = _Holder(model)
    assert ciuic.handle_of(holder) is handle
    ddp_like = nn.Module()
    ddp_like.module = holder
    assert ciuic.handle_of(ddp_like) is handle
    assert ciuic.handle_of(_model()) is None
    with pytest.raises(
        ciuic.ApplyError, match=r"already applied to this Module \(to the Sequential it holds\)"
    ):
        ciuic.apply_(ddp_like, ciuic.CiuicConfig())
    assert ciuic.remove_(holder) == handle.config
    assert ciuic.handle_of(model) is None
    ciuic.apply_(holder, ciuic.CiuicConfig())
    with pytest.raises(ciuic.ApplyError, match="already applied to a model that holds this Sequential"):
        ciuic.apply_(model, ciuic.CiuicConfig())  # an inner model of an applied holder


def test_applied_config_is_written_into_the_state_dict_and_survives_torch_save(techniques, tmp_path):
    model = _model()
    config = ciuic.CiuicConfig(activations="int8", budget="1GiB")
    with pytest.warns(UserWarning, match="activations skipped"):
        ciuic.apply_(model, config)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt")
    assert ciuic.saved_config(loaded) == config
    assert ciuic.saved_config(_model().state_dict()) is None
    wrapped = _Holder(model)
    assert ciuic.saved_config(wrapped.state_dict(), prefix="model.") == config
    _model().load_state_dict(loaded)  # a plain model loads it: the metadata is not a key
    ciuic.remove_(model)
    assert ciuic.saved_config(model.state_dict()) is None


def test_step_scope_is_a_null_context_without_scoped_techniques(techniques):
    import contextlib

    model = _model()
    assert isinstance(ciuic.step_scope(model), contextlib.nullcontext)
    handle = ciuic.apply_(model, ciuic.CiuicConfig())
    assert isinstance(handle.step_scope(), contextlib.nullcontext)


class _Scoped:
    """A picklable scope factory recording enters and exits."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    @contextlib.contextmanager
    def __call__(self):
        self.log.append(f"enter {self.name}")
        try:
            yield
        finally:
            self.log.append(f"exit {self.name}")


def test_step_scope_enters_every_technique_scope_in_order(techniques):
    log = []
    for name, order, field in (("late", 30, "activations"), ("early", 10, "weights")):
        tech = _scaling_technique(name, 1.0, order, log, field=field)
        scoped = _Scoped(name, log)

        def apply(model, config, _apply=tech.apply, _scoped=scoped):
            record = _apply(model, config)
            record.scope = _scoped
            return record

        techniques(Technique(tech.name, tech.fields, tech.order, tech.is_requested, apply))
    model = _model()
    ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4", activations="int8"))
    log.clear()
    with pytest.raises(RuntimeError, match="in the step"), ciuic.step_scope(_Holder(model)):
        log.append("step")
        raise RuntimeError("in the step")
    assert log == ["enter early", "enter late", "step", "exit late", "exit early"]


def test_update_reapplies_only_what_changed_and_what_came_after(techniques):
    log = []
    techniques(_scaling_technique("early", 2.0, 10, log, field="weights"))
    techniques(_scaling_technique("middle", 3.0, 20, log, field="loss"))
    techniques(_scaling_technique("late", 5.0, 30, log, field="activations"))
    model = _model()
    x = torch.randn(2, 8)
    reference = model(x).detach()
    handle = ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4", activations="int8"))
    log.clear()
    assert handle.update(handle.config.replace(activations="int4")) == ["late"]
    assert log == ["undo late", "late"]
    log.clear()
    assert handle.update(handle.config.replace(loss="chunked")) == ["middle", "late"]
    assert log == ["undo late", "middle", "late"]
    assert handle.config.loss == "chunked"
    assert not torch.equal(model(x), reference)
    log.clear()
    assert handle.update(handle.config) == []
    assert log == []
    assert handle.update(handle.config.replace(optimizer="adamw8bit")) == []
    assert [k for k, _ in handle.deferred] == ["optimizer", "optimizer"]
    assert "build a new one with ciuic.build_optimizer" in handle.report()
    ciuic.remove_(model)
    assert torch.equal(model(x), reference)


def test_failed_update_restores_the_previous_config(techniques):
    log = []
    techniques(_scaling_technique("early", 2.0, 10, log, field="weights"))

    def explode(model, config):
        raise RuntimeError("no room")

    techniques(Technique("late", ("activations",), 30, lambda c: c.activations != "none", explode))
    model = _model()
    handle = ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4"))
    log.clear()
    with pytest.raises(RuntimeError, match="no room"):
        handle.update(handle.config.replace(activations="int8"))
    assert log == []
    assert handle.config == ciuic.CiuicConfig(weights="nf4")
    assert [r.technique for r in handle.applied] == ["early"]
