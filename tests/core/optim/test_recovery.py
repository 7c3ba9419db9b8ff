"""A failed step leaves nothing half done: a backward that dies under ``step_in_backward`` is
undone bitwise and the retried step equals an uninterrupted one; what cannot work is refused."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ciuic import ConfigError, MemoryMeter
from ciuic.optim import CiuicAdamW, check_trainer_settings
from tests.core.optim.helpers import clone, regression, same_bits
from tests.core.optim.test_optimizer import states_equal


class Boom(RuntimeError):
    """The injected failure."""


class Trap:
    """Raises ``error`` when armed, after noting how many parameters had stepped in this backward."""

    def __init__(self, opt: CiuicAdamW | None = None, error: type[BaseException] = Boom) -> None:
        self.opt, self.error, self.armed, self.stepped = opt, error, True, -1

    def __call__(self, *_: Any) -> None:
        if self.armed:
            self.stepped = len(self.opt._undo) if self.opt is not None else -1
            raise self.error("injected mid-backward")


def backward_trapped_at_the_middle_layer(
    model: nn.Module, loss_fn: Callable[[nn.Module, int], torch.Tensor], step: int, trap: Trap
) -> None:
    """A backward that raises from a tensor hook on the middle layer's output."""

    def arm(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        out.register_hook(trap)

    handle = model[2].register_forward_hook(arm)
    try:
        loss = loss_fn(model, step)
    finally:
        handle.remove()
    loss.backward()


def window(
    model: nn.Module, loss_fn: Callable[[nn.Module, int], torch.Tensor], opt: CiuicAdamW, first: int
) -> None:
    """One optimizer step as a trainer runs it: the window's backwards, then step and zero_grad."""
    for micro in range(opt.accumulation_steps):
        loss_fn(model, first + micro).backward()
    opt.step()
    opt.zero_grad()


def snapshot(opt: CiuicAdamW) -> dict[int, dict[str, Any]]:
    return {id(p): copy.deepcopy(s) for p, s in opt.state.items()}


def same_state(opt: CiuicAdamW, saved: dict[int, dict[str, Any]]) -> bool:
    now = snapshot(opt)
    return now.keys() == saved.keys() and all(
        now[k].keys() == saved[k].keys()
        and all(
            torch.equal(v, saved[k][n]) if isinstance(v, torch.Tensor) else v == saved[k][n]
            for n, v in now[k].items()
        )
        for k in now
    )


SOURCES = [  # (state_bits, offload, where the failure comes from)
    *((bits, offload, "activation") for bits in (32, 8, 4) for offload in (False, True)),
    (8, False, "param_hook"),  # an out-of-memory error from a hook on a parameter, fired first
]

CASES = [  # (accumulation_steps, micro-batch that fails)
    (1, 0),
    (3, 2),  # the last micro-batch: some parameters have stepped
    (3, 1),  # an earlier one: nothing stepped, gradients half accumulated
]


@pytest.mark.parametrize(("accumulation", "fail_at"), CASES, ids=["acc1", "acc3-last", "acc3-earlier"])
@pytest.mark.parametrize(
    ("bits", "offload", "how"),
    SOURCES,
    ids=[f"{b}bit-{(o and 'offload') or 'device'}-{h}" for b, o, h in SOURCES],
)
def test_failed_backward_is_undone_and_the_retry_equals_an_uninterrupted_step(
    bits: int, offload: bool, accumulation: int, fail_at: int, how: str
) -> None:
    model, loss = regression()
    twin = clone(model)
    kwargs = {
        "state_bits": bits,
        "offload": offload,
        "step_in_backward": True,
        "accumulation_steps": accumulation,
    }
    trap = Trap(error=Boom if how == "activation" else torch.OutOfMemoryError)
    if how == "param_hook":  # registered first, so it fires before the optimizer's hook
        trap.armed = False
        model[2].weight.register_post_accumulate_grad_hook(trap)
    opt, ref = CiuicAdamW(model.parameters(), **kwargs), CiuicAdamW(twin.parameters(), **kwargs)
    trap.opt = opt
    window(model, loss, opt, 0)  # states exist before the failing step
    window(twin, loss, ref, 0)
    before, states = clone(model), snapshot(opt)

    for micro in range(fail_at):
        loss(model, accumulation + micro).backward()
    with pytest.raises(trap.error):
        if how == "activation":
            backward_trapped_at_the_middle_layer(model, loss, accumulation + fail_at, trap)
        else:
            trap.armed = True
            loss(model, accumulation + fail_at).backward()
    trap.armed = False
    # the last layer's weight and bias (and with the parameter hook, the middle layer's bias)
    # had stepped, in the window's last micro-batch only
    assert trap.stepped == ({"activation": 2, "param_hook": 3}[how] if fail_at == accumulation - 1 else 0)
    # nothing called: the optimizer undid the backward as the exception unwound
    assert same_bits(model, before)
    assert same_state(opt, states)
    assert all(p.grad is None for p in model.parameters())
    assert opt._micro_batch == 0 and opt._backward is None
    opt.rollback()  # what a recovery loop calls: idempotent
    assert same_bits(model, before)

    window(model, loss, opt, accumulation)  # the retried step: the whole window again
    window(twin, loss, ref, accumulation)
    assert same_bits(model, twin)
    assert states_equal(opt, ref)


def test_without_the_undo_log_a_failure_is_reported_and_the_next_step_runs() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), step_in_backward=True, recoverable=False)
    window(model, loss, opt, 0)
    trap = Trap(opt)
    with pytest.warns(RuntimeWarning, match="2 parameter.*recoverable=False"), pytest.raises(Boom):
        backward_trapped_at_the_middle_layer(model, loss, 1, trap)
    with pytest.raises(ConfigError, match=r"could not undo 2 parameter.*recoverable=True"):
        opt.rollback()
    opt.rollback()  # reported once
    assert opt._micro_batch == 0 and all(p.grad is None for p in model.parameters())
    window(model, loss, opt, 1)  # it runs; the last layer had stepped once more, as reported
    assert sorted(s["step"] for s in opt.state.values()) == [2, 2, 2, 2, 3, 3]


def test_a_closure_that_raises_is_rolled_back_by_step() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), state_bits=8, step_in_backward=True)
    before = clone(model)

    def closure() -> torch.Tensor:
        value = loss(model, 0)
        value.backward()  # every parameter steps
        raise Boom("after backward")

    with pytest.raises(Boom):
        opt.step(closure)
    assert same_bits(model, before) and not opt.state


def test_rollback_after_a_completed_backward_undoes_it_until_step() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), state_bits=4, step_in_backward=True)
    window(model, loss, opt, 0)
    before, states = clone(model), snapshot(opt)
    loss(model, 1).backward()
    assert not same_bits(model, before)
    opt.rollback()
    assert same_bits(model, before) and same_state(opt, states)
    loss(model, 1).backward()
    opt.step()  # final now: nothing left to undo
    after = clone(model)
    opt.rollback()
    assert same_bits(model, after)


def test_undo_log_is_counted_as_optimizer_memory() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), step_in_backward=True)
    window(model, loss, opt, 0)
    states = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    params = sum(p.nbytes for p in model.parameters())
    with MemoryMeter(track=(model, opt)) as meter:
        loss(model, 1).backward()
        held = meter.current_bytes
        assert opt._undo.nbytes == states + params
        opt.step()  # the step is final: the log goes
        assert opt._undo.nbytes == 0
        assert held - meter.current_bytes == states + params
    # at the peak (mid-backward) the log holds part of the copies, counted as optimizer memory
    assert states < meter.peak_by_category["optimizer"] < 2 * states + params


# -- refused: fp16 GradScaler, trainer-side clipping and accumulation --------------------------
def test_fp16_grad_scaler_is_refused_with_step_in_backward_and_the_backward_rolled_back() -> None:
    model, loss = regression()
    opt = CiuicAdamW(model.parameters(), step_in_backward=True)
    before = clone(model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss(model, 0)).backward()
    with pytest.raises(ConfigError, match=r"GradScaler.*rolled back.*bf16.*step_in_backward=False"):
        scaler.step(opt)
    assert same_bits(model, before) and not opt.state
    assert not hasattr(opt, "grad_scale")
    loss(model, 0).backward()  # without the scaler it trains
    opt.step()
    assert len(opt.state) == len(list(model.parameters()))


def test_grad_scaler_without_step_in_backward_works_as_with_torch() -> None:
    # A power-of-two loss scale is exact: the scaled run equals the unscaled one bitwise.
    model, loss = regression()
    twin = clone(model)
    opt, ref = CiuicAdamW(model.parameters(), state_bits=8), CiuicAdamW(twin.parameters(), state_bits=8)
    scaler = torch.amp.GradScaler("cpu")
    for step in range(2):
        scaler.scale(loss(model, step)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        window(twin, loss, ref, step)
    assert same_bits(model, twin)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"clip_grad_norm": 1.0},
            r"clip_grad_norm=1.0 clips nothing.*max_grad_norm=0.*step_in_backward=False",
        ),
        ({"grad_scaler": True}, r"grad_scaler=True.*bf16.*step_in_backward=False"),
        ({"grad_scaler": torch.amp.GradScaler("cpu")}, r"grad_scaler=.*GradScaler"),
        (
            {"accumulation_steps": 4},
            r"accumulation_steps=4 in the trainer.*accumulation_steps=1.*accumulation_steps=4",
        ),
        ({"clip_grad_norm": -1.0}, r"clip_grad_norm=-1.0 is invalid"),
        ({"grad_scaler": "fp16"}, r"grad_scaler='fp16' is invalid"),
        ({"accumulation_steps": 0}, r"accumulation_steps=0 is invalid"),
    ],
)
def test_trainer_settings_defeated_by_step_in_backward_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    opt = CiuicAdamW([nn.Parameter(torch.zeros(2))], step_in_backward=True)
    with pytest.raises(ConfigError, match=message):
        check_trainer_settings(opt, **settings)


def test_trainer_settings_that_work_are_accepted() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    off = {
        "clip_grad_norm": 0.0,
        "grad_scaler": torch.amp.GradScaler("cpu", enabled=False),
        "accumulation_steps": 2,
    }
    check_trainer_settings(CiuicAdamW(params, step_in_backward=True, accumulation_steps=2), **off)
    on = {"clip_grad_norm": 1.0, "grad_scaler": True, "accumulation_steps": 8}
    check_trainer_settings(CiuicAdamW(params), **on)
    check_trainer_settings(torch.optim.AdamW(params), **on)


def test_gradient_hooks_are_removed_when_the_optimizer_is_collected() -> None:
    model, _ = regression()
    opt = CiuicAdamW(model.parameters(), step_in_backward=True)
    assert all(len(p._post_accumulate_grad_hooks or {}) == 1 for p in model.parameters())
    del opt
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
