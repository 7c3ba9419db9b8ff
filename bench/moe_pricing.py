"""Bench: DeepSeek-V2-Lite QLoRA priced at full size on a CPU (fake tensors, no memory).

Run: ``python bench/moe_pricing.py`` (``--seq 4096 --lora-rank 16 --attention fused``; about
2 minutes a row on an idle 2-core CPU, depth extrapolated). The shipped ``deepseek-v2-lite``
shape (15.7B, 27 layers, 64 routed + 2 shared experts, MLA) is built on ``meta``, wrapped with
PEFT LoRA from ``ciuic.lora_targets`` (MLA attention, dense MLP, shared and routed experts),
and priced for one sample of ``--seq`` tokens under

1. ``weights="nf4"``, ``activations="int4"``, ``checkpointing="full"``, ``loss="chunked"``,
   ``optimizer="adamw8bit"``;
2. the same with ``offload={"weights", "activations", "optimizer"}``.

Each row prints the peak and its breakdown (``MemoryMeter`` categories; ``offloaded`` is host
memory). ``--attention fused`` prices attention as a GPU's memory-efficient kernel
(``ciuic.planner.attention``); ``as_run`` keeps fake CPU's math kernel, whose score matrices a
GPU never allocates.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from torch import nn

import ciuic
from ciuic.planner import price
from ciuic.planner.shapes import load_shape
from ciuic.units import format_bytes

BASE: dict[str, Any] = dict(
    weights="nf4", activations="int4", checkpointing="full", loss="chunked", optimizer="adamw8bit"
)
OFFLOAD = {"offload": ["weights", "activations", "optimizer"]}
ROWS: dict[str, dict[str, Any]] = {
    "nf4+int4+full+chunked+adamw8bit": BASE,
    "  + offload weights, activations, optimizer": {**BASE, **OFFLOAD},
}


def lora(rank: int) -> Any:
    def wrap(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = ciuic.lora_targets(model)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, **targets))

    return wrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--attention", choices=("fused", "as_run"), default="fused")
    args = parser.parse_args()
    shape = load_shape("deepseek-v2-lite")
    print(f"DeepSeek-V2-Lite, {args.seq} tokens x 1, LoRA r={args.lora_rank}, attention={args.attention}")
    for name, config in ROWS.items():
        started = time.perf_counter()
        pricing = price(
            shape, config, seq_len=args.seq, batch=1, lora=lora(args.lora_rank), attention=args.attention
        )
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in pricing.breakdown.items())
        seconds = time.perf_counter() - started
        print(f"{name}: peak {format_bytes(pricing.peak_bytes)} ({parts}) [{seconds:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
