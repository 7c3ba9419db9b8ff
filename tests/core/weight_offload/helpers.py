"""What the weight-offload tests share: the model, training runs, byte counts."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import ciuic
from ciuic import CiuicConfig, MemoryMeter
from ciuic.weight_offload import WeightStreamer
from tests.models import deepseek_v3, lora, progressions

LAYERS = 4  # one dense decoder layer, then three MoE layers
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def model_of(targets: tuple[str, ...] | None = None, **kwargs: int) -> nn.Module:
    """The tiny DeepSeek-V3 with PEFT LoRA on ``targets`` (default: ``ciuic.lora_targets``,
    attention, the dense MLP, shared and routed experts)."""
    return lora(deepseek_v3(num_layers=LAYERS, **kwargs), targets=targets)


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of frozen weights, by the meter: what it counts as parameters (parameters, buffers,
    quantization state) less the trainable parameters and the non-persistent buffers."""
    with MemoryMeter(device="cpu", track=(module,)) as meter:
        pass
    return meter.peak_by_category["parameters"] - trainable_bytes(module) - transient_bytes(module)


def trainable_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def transient_bytes(module: nn.Module) -> int:
    """Bytes of non-persistent buffers (the rotary ``inv_freq``): not weights, not offloaded."""
    return sum(
        b.numel() * b.element_size()
        for m in module.modules()
        for name, b in m.named_buffers(recurse=False)
        if name in m._non_persistent_buffers_set
    )


def train(
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


def same_bits(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def outside_bytes(streamer: WeightStreamer) -> int:
    return max(u.nbytes for u in streamer.units if u.block is None)


def train_on(model: nn.Module, config: CiuicConfig, device: str) -> tuple[list[torch.Tensor], MemoryMeter]:
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
