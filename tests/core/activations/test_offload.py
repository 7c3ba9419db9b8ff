"""Activation offload: host copies counted as ``offloaded``, prefetch one block ahead, CUDA streams."""

from __future__ import annotations

import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.activations.offload import Offloader
from tests.gpu import requires_cuda
from tests.models import deepseek_v3, lora, progressions


def test_host_copy_round_trip_is_counted_as_offloaded() -> None:
    offloader = Offloader(torch.device("cpu"))
    with MemoryMeter(device="cpu") as meter:
        x = torch.randn(256, 64).t()
        stored = offloader.store((x, torch.arange(10)))
        offloader.prefetch(stored)
        back = offloader.fetch(stored)
    assert torch.equal(back[0], x) and torch.equal(back[1], torch.arange(10))
    assert stored.nbytes == 256 * 64 * 4 + 10 * 8
    assert meter.peak_offloaded_bytes == stored.nbytes
    assert (offloader.prefetches, offloader.fetches) == (1, 1)


def _offloaded_step(device: str, config: CiuicConfig | None) -> tuple[torch.Tensor, object, MemoryMeter]:
    model = lora(deepseek_v3()).to(device)
    handle = ciuic.apply_(model, config) if config is not None else None
    ids = progressions(batch_size=2, seq_len=128).to(device)
    with MemoryMeter(device=device, track=(model,)) as meter, torch.autocast(device, dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return grads, handle, meter


def test_backward_prefetches_the_block_before() -> None:
    _, handle, _ = _offloaded_step("cpu", CiuicConfig(offload={"activations"}))
    assert handle is not None
    stats = handle.applied[0].details["stats"]
    # every saved tensor that backward used came back (a few saved ones it never reads)
    assert 0.9 * (stats.packed + stats.deduplicated) <= stats.fetched <= stats.packed + stats.deduplicated
    # all but the last block's (and what follows it) were already on their way back
    assert stats.prefetched >= 0.5 * stats.packed


@requires_cuda
def test_cuda_offload_is_lossless_and_leaves_little_on_the_device() -> None:
    exact, _, exact_meter = _offloaded_step("cuda", None)
    got, _, meter = _offloaded_step("cuda", CiuicConfig(offload={"activations"}))
    assert torch.equal(got, exact)
    assert meter.peak_by_category["activations"] <= 0.1 * exact_meter.peak_by_category["activations"]
    assert meter.peak_offloaded_bytes >= 0.9 * exact_meter.peak_by_category["activations"]


@requires_cuda
def test_cuda_host_copies_are_pinned_and_async() -> None:
    offloader = Offloader(torch.device("cuda"))
    x = torch.randn(1024, 1024, device="cuda")
    reference = x.cpu()  # an independent copy, made before any offload
    stored = offloader.store((x,))
    assert all(h.is_pinned() for h in stored.host) and stored.ready is not None
    del x  # the allocator must not reuse the memory before the copy has read it
    torch.full((1024, 1024), float("nan"), device="cuda")  # what a reuse would write there
    offloader.prefetch(stored)
    back = offloader.fetch(stored)[0]
    torch.cuda.synchronize()
    assert back.device.type == "cuda"
    assert torch.equal(stored.host[0], reference) and torch.equal(back.cpu(), reference)


@requires_cuda
def test_cuda_compress_then_offload() -> None:
    exact, _, _ = _offloaded_step("cuda", None)
    got, _, meter = _offloaded_step("cuda", CiuicConfig(activations="int8", offload={"activations"}))
    assert torch.nn.functional.cosine_similarity(got, exact, dim=0) >= 0.999
    assert meter.peak_offloaded_bytes > 0


def test_model_without_blocks_offloads_too() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    stats = ciuic.apply_(model, CiuicConfig(offload={"activations"})).applied[0].details["stats"]
    x = torch.randn(64, 64, requires_grad=True)
    with MemoryMeter(device="cpu", track=(model,)) as meter:
        model(x).sum().backward()
    assert meter.peak_by_category["activations"] == 0 and meter.peak_offloaded_bytes > 0
    ciuic.remove_(model)
    assert stats.offloaded == 3  # the inputs of both linear layers and of GELU


def _held_after_forward(config: CiuicConfig | None, grad: bool = True) -> int:
    """Device bytes live once the forward is done (its graph alive), tracked from the start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    if config is not None:
        ciuic.apply_(model, config)
    x = torch.randn(512, 256)
    with MemoryMeter(device="cpu", track=(model,)) as meter, torch.set_grad_enabled(grad):
        y = model(x)
        held = meter.current_bytes
    del y
    return held


def test_compressed_and_offloaded_leaves_no_codes_on_the_device() -> None:
    # issue #10, 9a: the packed entry kept the Encoded object (device codes) beside the host copy
    nothing_saved = _held_after_forward(None, grad=False)  # parameters and the output
    compressed = _held_after_forward(CiuicConfig(activations="int8"))
    assert compressed - nothing_saved >= 3 * 512 * 256  # the codes of three saved inputs, at least
    # on CPU the codes and their scales both go to host memory: nothing packed stays behind
    assert _held_after_forward(CiuicConfig(activations="int8", offload={"activations"})) == nothing_saved
