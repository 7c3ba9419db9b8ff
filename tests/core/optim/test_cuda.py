"""On a GPU: host-offloaded states (pinned memory, side-stream copies) equal on-device ones bitwise."""

from __future__ import annotations

import pytest
import torch

from ciuic.optim import FORMATS, CiuicAdamW, quantize_blockwise
from tests.core.optim.helpers import clone, regression, same_bits, train
from tests.gpu import requires_cuda

pytestmark = requires_cuda


def cuda_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step)).cuda()
    return model(x).pow(2).mean()


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("step_in_backward", [False, True])
def test_cuda_offload_equals_on_device_bitwise(bits: int, step_in_backward: bool) -> None:
    model = regression()[0].cuda()
    twin = clone(model)
    kwargs = {"state_bits": bits, "min_quantized_numel": 1} if bits != 32 else {}
    on_device = CiuicAdamW(model.parameters(), step_in_backward=step_in_backward, **kwargs)
    on_host = CiuicAdamW(twin.parameters(), step_in_backward=step_in_backward, offload=True, **kwargs)
    train(model, cuda_loss, on_device, range(5))
    train(twin, cuda_loss, on_host, range(5))
    torch.cuda.synchronize()
    assert same_bits(model, twin)
    for state in on_host.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "cpu" and value.is_pinned()


@pytest.mark.parametrize(("bits", "moment"), [(8, 0), (8, 1), (4, 0), (4, 1)])
def test_codes_are_the_same_on_cpu_and_cuda(bits: int, moment: int) -> None:
    fmt = FORMATS[bits][moment]
    x = torch.randn(100_003) if moment == 0 else torch.rand(100_003)
    out = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        _, mid, lookup = fmt.tables(device)
        codes, absmax = quantize_blockwise(
            x.to(device), mid, block_size=fmt.block_size, bits=bits, lookup=lookup
        )
        out.append((codes.cpu(), absmax.cpu()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
def test_cuda_failed_backward_is_rolled_back_and_the_retry_equals_an_uninterrupted_step(
    offload: bool,
) -> None:
    # On CUDA the engine may drop the dying backward's callback on its device thread, after the
    # exception reached us: call rollback() as a recovery loop does, then retry.
    from tests.core.optim.test_recovery import Boom, Trap, backward_trapped_at_the_middle_layer, window

    model = regression()[0].cuda()
    twin = clone(model)
    kwargs = {"state_bits": 8, "min_quantized_numel": 1, "step_in_backward": True, "offload": offload}
    opt, ref = CiuicAdamW(model.parameters(), **kwargs), CiuicAdamW(twin.parameters(), **kwargs)
    window(model, cuda_loss, opt, 0)
    window(twin, cuda_loss, ref, 0)
    before = clone(model)
    trap = Trap(opt)
    with pytest.raises(Boom):
        backward_trapped_at_the_middle_layer(model, cuda_loss, 1, trap)
    opt.rollback()
    torch.cuda.synchronize()
    assert trap.stepped == 2 and same_bits(model, before)
    window(model, cuda_loss, opt, 1)
    window(twin, cuda_loss, ref, 1)
    torch.cuda.synchronize()
    assert same_bits(model, twin)
