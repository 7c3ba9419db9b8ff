"""Bench for ``offload={"weights"}``: device weight bytes, host bytes and step time, with and without.

Run: ``python bench/weight_offload.py`` (about a minute on a 2-core CPU; ``--device cuda`` on a
GPU). One row per config on the tiny DeepSeek-V3 (8 decoder layers: one dense, seven MoE; PEFT
LoRA r=8 from ``ciuic.lora_targets``: attention, dense MLP, shared and routed experts), batch
4 x 64 tokens, measured with ``MemoryMeter`` over three training steps:

- ``peak``: the device peak; ``weights@peak``: frozen weight bytes on the device at that moment
  (the meter's ``parameters`` less the trainable ones; the non-persistent rotary ``inv_freq``
  stays); ``most weights``: the most frozen bytes on the device at any moment (the streamer's
  count; without offload all of them); ``blocks``: that over the largest decoder block's frozen
  bytes; ``host``: the meter's ``offloaded`` bytes (the host copies);
- ``step ratio``: time of a training step over the same config without the offload, alternating
  the two and keeping the fastest of 3 (on CPU the copies are real memcpys on the one stream).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed

import ciuic
from ciuic import MemoryMeter
from ciuic.activations import find_blocks
from tests.models import deepseek_v3, lora, progressions

LAYERS = 8
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {}),
    ("nf4", {"weights": "nf4"}),
    ("nf4 + checkpointing", {"weights": "nf4", "checkpointing": "full"}),
]


def _model(device: str) -> nn.Module:
    return lora(deepseek_v3(num_layers=LAYERS), targets=None).to(device)  # ciuic.lora_targets


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _block_bytes(model: nn.Module, device: str) -> int:
    worst = 0
    for block in find_blocks(model):
        with MemoryMeter(device=device, track=(block,)) as meter:
            pass
        worst = max(worst, meter.peak_by_category["parameters"] - _trainable(block))
    return worst


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, device: str, seed: int) -> None:
    ids = progressions(batch_size=4, seq_len=64, seed=seed).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _setup(fields: dict[str, Any], offload: bool, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model(device)
    config = ciuic.CiuicConfig(**fields, offload={"weights"} if offload else set())
    handle = ciuic.apply_(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, ciuic.build_optimizer(params, handle.config, lr=1e-3)


def _most_resident(model: nn.Module) -> int | None:
    record = ciuic.handle_of(model).record("weight_offload")
    return None if record is None else int(record.details["streamer"].max_resident_bytes)


def _measure(fields: dict[str, Any], offload: bool, device: str) -> dict[str, int]:
    model, optimizer = _setup(fields, offload, device)
    block = _block_bytes(model, device) if not offload else 0
    with MemoryMeter(device=device, track=(model, optimizer)) as meter:
        for seed in range(3):
            _step(model, optimizer, device, seed)
    reading = meter.reading()
    weights = reading.peak_by_category["parameters"] - _trainable(model)
    most = _most_resident(model)
    return {
        "peak": reading.peak_bytes,
        "weights": weights,
        "most": weights if most is None else most,
        "host": reading.peak_by_category["offloaded"],
        "block": block,
    }


def _timed(model: nn.Module, optimizer: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(model, optimizer, device, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _step_ratio(fields: dict[str, Any], device: str, repeats: int) -> float:
    runs = [_setup(fields, offload, device) for offload in (False, True)]
    for model, optimizer in runs:
        _timed(model, optimizer, device)  # warm-up
    best = [min(_timed(*runs[i], device) for _ in range(repeats)) for i in (0, 1)]
    return best[1] / best[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"tiny DeepSeek-V3, {LAYERS} layers, LoRA r=8, batch 4 x 64, on {args.device}")
    header = (
        f"{'config':<22}{'offload':>8}{'peak':>12}{'weights@peak':>14}{'most weights':>14}{'blocks':>8}"
        f"{'host':>12}{'step ratio':>12}"
    )
    print(header)
    for name, fields in ROWS:
        base = _measure(fields, False, args.device)
        off = _measure(fields, True, args.device)
        ratio = _step_ratio(fields, args.device, args.repeats)
        for label, row, r in (("no", base, "1.00"), ("weights", off, f"{ratio:.2f}")):
            blocks = row["most"] / base["block"]
            print(
                f"{name:<22}{label:>8}{row['peak']:>12,}{row['weights']:>14,}{row['most']:>14,}{blocks:>8.2f}"
                f"{row['host']:>12,}{r:>12}"
            )


if __name__ == "__main__":
    main()
