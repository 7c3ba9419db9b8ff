"""CiuicAdamW as frameworks call it: closure, schedulers, zero_grad, param groups, state_dict,
gradient accumulation in backward, clipping, the constructor's arguments and ``build_optimizer``."""

from __future__ import annotations

import gc
import inspect
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import ciuic
from ciuic import ConfigError, MemoryMeter
from ciuic.optim import CiuicAdamW
from tests.core.optim.helpers import clone, regression, same_bits, train

MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "offload": {"offload": True},
    "step_in_backward": {"step_in_backward": True},
}


def states_equal(a: CiuicAdamW, b: CiuicAdamW) -> bool:
    params = [
        (p, q)
        for ga, gb in zip(a.param_groups, b.param_groups, strict=True)
        for p, q in zip(ga["params"], gb["params"], strict=True)
    ]
    pairs = [(a.state[p], b.state[q]) for p, q in params]
    return all(
        sa.keys() == sb.keys()
        and all(torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k] for k, v in sa.items())
        for sa, sb in pairs
    )


# -- state_dict -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_mid_run_continues_bitwise(bits: int, mode: str, dtype: torch.dtype) -> None:
    kwargs = {"state_bits": bits, **MODES[mode]}
    model, loss = regression(dtype)
    resumed = clone(model)
    opt = CiuicAdamW(model.parameters(), lr=3e-3, **kwargs)
    train(model, loss, opt, range(6))

    first = CiuicAdamW(resumed.parameters(), lr=3e-3, **kwargs)
    train(resumed, loss, first, range(3))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    restored, _ = regression(dtype, seed=1)  # other weights, overwritten by the checkpoint
    restored.load_state_dict(saved["model"])
    second = CiuicAdamW(restored.parameters(), lr=3e-3, **kwargs)
    second.load_state_dict(saved["opt"])
    train(restored, loss, second, range(3, 6))

    assert same_bits(model, restored)
    assert states_equal(opt, second)
    codes = [t for s in second.state.values() for k, t in s.items() if k.endswith("_codes")]
    assert all(t.dtype == torch.uint8 for t in codes) and (bits == 32) == (not codes)


def test_loading_a_state_with_other_bits_is_refused() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), state_bits=8)
    train(model, loss, opt, range(1))
    with pytest.raises(
        ConfigError, match=r"state_bits=8.*state_bits=4.*build the optimizer with state_bits=8"
    ):
        CiuicAdamW(model.parameters(), state_bits=4).load_state_dict(opt.state_dict())
    with pytest.raises(ConfigError, match="same state_bits and min_quantized_numel"):
        CiuicAdamW(model.parameters(), state_bits=8, min_quantized_numel=1).load_state_dict(opt.state_dict())
    torch_opt = torch.optim.AdamW(model.parameters())
    train(model, loss, torch_opt, range(1))
    with pytest.raises(ConfigError, match="state_bits=None"):
        CiuicAdamW(model.parameters()).load_state_dict(torch_opt.state_dict())


# -- how frameworks drive it ------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_closure_is_called_and_its_loss_returned(mode: str) -> None:
    model, loss = regression()
    twin = clone(model)
    opt = CiuicAdamW(model.parameters(), state_bits=8, **MODES[mode])
    train(twin, loss, CiuicAdamW(twin.parameters(), state_bits=8), range(2))
    for step in range(2):

        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            value = loss(model, step)
            value.backward()
            return value

        returned = opt.step(closure)
        assert isinstance(returned, torch.Tensor) and returned.requires_grad
    assert same_bits(model, twin)


def test_lr_scheduler_drives_the_learning_rate_like_torch_adamw() -> None:
    model, loss = regression()
    twin = clone(model)
    ours = CiuicAdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (ours, ref)]
    for step in range(8):
        for m, o, s in zip((model, twin), (ours, ref), schedulers, strict=True):
            train(m, loss, o, range(step, step + 1))
            s.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_learning_rate_zero_and_no_weight_decay_leave_parameters_bitwise_unchanged() -> None:
    # The group's lr is read at every update, not captured at construction.
    model, loss = regression()
    before = clone(model)
    opt = CiuicAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, state_bits=4, step_in_backward=True)
    opt.param_groups[0]["lr"] = 0.0
    train(model, loss, opt, range(2))
    assert same_bits(model, before)


def test_zero_grad_sets_to_none_or_zero() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), state_bits=8)
    loss(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", list(MODES))
def test_add_param_group_trains_the_new_group_with_its_own_lr(mode: str) -> None:
    model, loss = regression()
    first, rest = model[0], nn.ModuleList(list(model)[1:])
    opt = CiuicAdamW(first.parameters(), lr=1e-2, state_bits=8, **MODES[mode])
    opt.add_param_group({"params": list(rest.parameters()), "lr": 0.0, "weight_decay": 0.0})
    frozen = clone(rest)
    opt.param_groups[1]["lr"] = 1e-2
    before = clone(rest)
    assert same_bits(frozen, before)
    train(model, loss, opt, range(2))
    assert not same_bits(rest, before)
    assert all(p in opt.state for p in rest.parameters())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match="'amsgrad' is not supported"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "amsgrad": True})


def test_sparse_gradients_are_refused() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = CiuicAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse gradient"):
        opt.step()


# -- step in backward -------------------------------------------------------------------------
def test_step_in_backward_accumulates_then_steps_on_the_last_micro_batch() -> None:
    model, loss = regression()
    twin = clone(model)
    opt = CiuicAdamW(model.parameters(), state_bits=8, step_in_backward=True, accumulation_steps=3)
    ref = CiuicAdamW(twin.parameters(), state_bits=8)
    for window in range(2):
        for micro in range(3):
            step = 3 * window + micro
            loss(twin, step).backward()
            loss(model, step).backward()
            held = [p.grad is not None for p in model.parameters()]
            assert all(held) if micro < 2 else not any(held)
        ref.step()
        ref.zero_grad()
        opt.step()
        opt.zero_grad()
    assert same_bits(model, twin)
    assert states_equal(opt, ref)


def test_a_parameter_idle_in_the_last_micro_batch_still_steps() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = CiuicAdamW([a, b], lr=0.1, step_in_backward=True, accumulation_steps=2)
    (a * b).sum().backward()  # micro-batch 1: both
    a.sum().backward()  # micro-batch 2: a only
    assert a.grad is None and b.grad is None
    assert opt.state[b]["step"] == 1 and not torch.equal(b, torch.ones(3))


def test_step_in_backward_applies_gradients_set_by_hand_at_step() -> None:
    a = nn.Parameter(torch.ones(3))
    opt = CiuicAdamW([a], lr=0.1, step_in_backward=True)
    a.grad = torch.ones(3)
    opt.step()
    assert a.grad is None and opt.state[a]["step"] == 1 and (a < 1).all()


def test_global_norm_clipping_is_refused_with_step_in_backward() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), step_in_backward=True)
    with pytest.raises(ConfigError, match=r"step_in_backward=True.*Set step_in_backward=False"):
        opt.clip_grad_norm_(1.0)
    # without it, clipping works on this optimizer's parameters as torch's does
    model, loss = regression()
    twin = clone(model)
    plain = CiuicAdamW(model.parameters())
    loss(model, 0).backward()
    loss(twin, 0).backward()
    norm = plain.clip_grad_norm_(0.01)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01))
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters(), strict=True)
    )


def test_hooks_do_not_keep_the_optimizer_alive() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), step_in_backward=True)
    del opt
    gc.collect()
    loss(model, 0).backward()  # the hooks find no optimizer: gradients stay, as without one
    assert all(p.grad is not None for p in model.parameters())


# -- every constructor argument is used or rejected -------------------------------------------
def _one_step(model: nn.Module, **kwargs: Any) -> tuple[CiuicAdamW, MemoryMeter]:
    _, loss = regression()
    with MemoryMeter(track=(model,)) as meter:
        opt = CiuicAdamW(model.parameters(), **kwargs)
        loss(model, 0).backward()
        loss(model, 1).backward()
        opt.step()
    return opt, meter


def _state_bytes(opt: CiuicAdamW) -> int:
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


EFFECTS: dict[str, tuple[dict[str, Any], Callable[[nn.Module, CiuicAdamW, MemoryMeter, nn.Module], bool]]] = {
    # argument: (a non-default setting, what it changes against the defaults)
    "lr": ({"lr": 0.5}, lambda m, o, meter, ref: not same_bits(m, ref)),
    "betas": ({"betas": (0.5, 0.6)}, lambda m, o, meter, ref: not same_bits(m, ref)),
    "eps": ({"eps": 10.0}, lambda m, o, meter, ref: not same_bits(m, ref)),
    "weight_decay": ({"weight_decay": 0.5}, lambda m, o, meter, ref: not same_bits(m, ref)),
    "state_bits": (
        {"state_bits": 4},
        lambda m, o, meter, ref: _state_bytes(o) < _state_bytes(o_default(ref)),
    ),
    "min_quantized_numel": (
        {"state_bits": 8, "min_quantized_numel": 1},
        lambda m, o, meter, ref: all("exp_avg_codes" in s for s in o.state.values()),
    ),
    "step_in_backward": (
        {"step_in_backward": True},
        lambda m, o, meter, ref: o.state and m[0].weight.grad is None,
    ),
    "accumulation_steps": (
        {"step_in_backward": True, "accumulation_steps": 2},
        lambda m, o, meter, ref: all(s["step"] == 1 for s in o.state.values()),  # 2 backwards, 1 update
    ),
    "fp32_states": ({"fp32_states": True}, lambda m, o, meter, ref: _bf16_moments_dtype(fp32_states=True)),
    "recoverable": (
        {"step_in_backward": True, "recoverable": False},
        lambda m, o, meter, ref: meter.peak_by_category["optimizer"] == _state_bytes(o),  # no undo log
    ),
    "offload": (
        {"offload": True},
        lambda m, o, meter, ref: meter.peak_offloaded_bytes >= _state_bytes(o) > 0 and same_bits(m, ref),
    ),
}

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"lr": -1.0}, "lr=-1.0"),
    ({"lr": torch.tensor(0.1)}, "tensor learning rates"),
    ({"betas": (1.0, 0.9)}, r"betas=\(1.0, 0.9\)"),
    ({"betas": (0.9,)}, "two floats"),
    ({"eps": -1e-8}, "eps=-1e-08"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"state_bits": 16}, "state_bits=16.*32, 8 or 4"),
    ({"state_bits": True}, "state_bits=True"),
    ({"state_bits": 8, "min_quantized_numel": 0}, "min_quantized_numel=0"),
    ({"min_quantized_numel": 10}, "no effect with state_bits=32"),
    ({"step_in_backward": "yes"}, "step_in_backward='yes'"),
    ({"step_in_backward": True, "accumulation_steps": 0}, "accumulation_steps=0"),
    ({"accumulation_steps": 2}, "only applies with step_in_backward=True"),
    ({"offload": "optimizer"}, "offload='optimizer'.*True or False"),
    ({"fp32_states": 1}, "fp32_states=1 is invalid"),
    ({"step_in_backward": True, "recoverable": None}, "recoverable=None is invalid"),
    ({"recoverable": False}, "no effect with step_in_backward=False"),
    ({"state_bits": 8, "fp32_states": True}, "no effect with state_bits=8"),
]


def _bf16_moments_dtype(*, fp32_states: bool) -> bool:
    """Whether a bf16 parameter's moments are fp32 (fp32_states only shows on non-fp32 params)."""
    param = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    param.grad = torch.ones(3, dtype=torch.bfloat16)
    opt = CiuicAdamW([param], fp32_states=fp32_states)
    opt.step()
    return opt.state[param]["exp_avg"].dtype == torch.float32


def o_default(ref: nn.Module) -> CiuicAdamW:
    return _one_step(clone(ref), state_bits=8)[0]


def test_every_constructor_argument_has_an_effect_or_is_refused() -> None:
    names = [n for n in inspect.signature(CiuicAdamW.__init__).parameters if n not in ("self", "params")]
    assert sorted(names) == sorted(EFFECTS), "document the effect of every CiuicAdamW argument here"
    for name in names:
        setting, changed = EFFECTS[name]
        model, _ = regression()
        reference = clone(model)
        _one_step(reference)
        opt, meter = _one_step(model, **setting)
        assert changed(model, opt, meter, reference), name
    refused = {key for setting, _ in INVALID for key in setting}
    assert refused >= set(names) - {"params"}, "give an invalid example of every argument"


@pytest.mark.parametrize(("kwargs", "message"), INVALID, ids=[str(k) for k, _ in INVALID])
def test_invalid_arguments_raise_config_error_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CiuicAdamW([nn.Parameter(torch.zeros(2))], **kwargs)


# -- build_optimizer --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"optimizer": "adamw8bit"}, (8, False, False)),
        ({"optimizer": "adamw4bit"}, (4, False, False)),
        ({"step_in_backward": True}, (32, True, False)),
        ({"offload": {"optimizer"}}, (32, False, True)),
        ("max", (4, True, True)),
    ],
)
def test_build_optimizer_maps_the_config(config: Any, expected: tuple[int, bool, bool]) -> None:
    params = [nn.Parameter(torch.zeros(3))]
    opt = ciuic.build_optimizer(params, config, lr=0.1, weight_decay=0.0)
    assert isinstance(opt, CiuicAdamW)
    assert (opt.state_bits, opt.step_in_backward, opt.offload) == expected
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.0


def test_build_optimizer_without_requests_is_torch_adamw() -> None:
    assert (
        type(ciuic.build_optimizer([nn.Parameter(torch.zeros(3))], ciuic.CiuicConfig())) is torch.optim.AdamW
    )


def test_build_optimizer_refuses_unknown_or_conflicting_arguments() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match=r"amsgrad=True.*allowed are lr, betas"):
        ciuic.build_optimizer(params, {"optimizer": "adamw8bit"}, amsgrad=True)
    with pytest.raises(ConfigError, match="state_bits=8 is set by the config"):
        ciuic.build_optimizer(params, {"optimizer": "adamw4bit"}, state_bits=8)


def test_public_name() -> None:
    assert ciuic.optim.CiuicAdamW is CiuicAdamW
    assert issubclass(CiuicAdamW, torch.optim.Optimizer)
