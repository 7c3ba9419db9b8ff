"""``CiuicAdamW``'s state dict through ``torch.distributed.checkpoint`` (one process, gloo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ciuic import ConfigError
from ciuic.optim import CiuicAdamW
from tests.core.optim.helpers import clone, regression, same_bits, train
from tests.core.optim.test_optimizer import states_equal


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def trained(kwargs: dict[str, Any]) -> tuple[torch.nn.Module, CiuicAdamW, torch.nn.Module, CiuicAdamW]:
    """A model trained 6 steps, and a twin trained 3 (with their optimizers)."""
    model, loss = regression()
    half = clone(model)
    opt = CiuicAdamW(model.parameters(), lr=3e-3, **kwargs)
    train(model, loss, opt, range(6))
    first = CiuicAdamW(half.parameters(), lr=3e-3, **kwargs)
    train(half, loss, first, range(3))
    return model, opt, half, first


def rebuilt(kwargs: dict[str, Any]) -> tuple[torch.nn.Module, CiuicAdamW]:
    """A model built from scratch (other weights) and a fresh optimizer over it."""
    model, _ = regression(seed=1)
    return model, CiuicAdamW(model.parameters(), lr=3e-3, **kwargs)


MODES = [{"state_bits": bits, "step_in_backward": sib} for bits in (32, 8, 4) for sib in (False, True)]


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize(
    "kwargs", MODES, ids=[f"{m['state_bits']}bit-sib{m['step_in_backward']}" for m in MODES]
)
def test_get_and_set_optimizer_state_dict_continue_bitwise(kwargs: dict[str, Any]) -> None:
    model, opt, half, first = trained(kwargs)
    saved = get_optimizer_state_dict(half, first)
    assert set(saved) == {"state", "param_groups"}
    assert set(saved["state"]) == {name for name, _ in half.named_parameters()}  # keyed by FQN
    assert all(group["state_bits"] == kwargs["state_bits"] for group in saved["param_groups"])

    restored, second = rebuilt(kwargs)
    restored.load_state_dict(half.state_dict())
    set_optimizer_state_dict(restored, second, saved)
    _, loss = regression()
    train(restored, loss, second, range(3, 6))
    assert same_bits(model, restored)
    assert states_equal(opt, second)


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("bits", [8, 4])
def test_dcp_save_and_load_round_trip_continues_bitwise(tmp_path: Path, bits: int) -> None:
    kwargs = {"state_bits": bits, "step_in_backward": True}
    model, opt, half, first = trained(kwargs)
    dcp.save(
        {"model": half.state_dict(), "optim": get_optimizer_state_dict(half, first)}, checkpoint_id=tmp_path
    )

    restored, second = rebuilt(kwargs)
    target = {"model": restored.state_dict(), "optim": get_optimizer_state_dict(restored, second)}
    dcp.load(target, checkpoint_id=tmp_path)
    restored.load_state_dict(target["model"])
    set_optimizer_state_dict(restored, second, target["optim"])
    _, loss = regression()
    train(restored, loss, second, range(3, 6))
    assert same_bits(model, restored)
    assert states_equal(opt, second)


@pytest.mark.usefixtures("process_group")
def test_set_optimizer_state_dict_refuses_other_state_bits() -> None:
    _, _, half, first = trained({"state_bits": 8})
    saved = get_optimizer_state_dict(half, first)
    restored, _ = rebuilt({})
    other = CiuicAdamW(restored.parameters(), state_bits=4)
    with pytest.raises(ConfigError, match=r"saved with state_bits=8.*build the optimizer with state_bits=8"):
        set_optimizer_state_dict(restored, other, saved)
