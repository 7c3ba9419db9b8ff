"""Bench for ``activations=...``, ``offload={'activations'}`` and ``checkpointing=...``.

Run: ``python bench/activations.py`` (about a minute on a 2-core CPU). On the tiny
DeepSeek-V3 (MLA attention, MoE layers) with PEFT LoRA on the attention and MLP projections,
bf16 autocast, batch 2 x 256 tokens, it prints per configuration:

- saved: device bytes held for backward when the forward ends (``MemoryMeter``'s
  ``activations`` then, every byte of codes, scales and padding included; see
  ``tests/core/activations/figures.py``) and how many times smaller than with
  ``activations='none'``;
- host: bytes in host memory then (``offloaded``);
- cosine: of the LoRA gradient with the exact step's;
- time: step time over the exact step's, the median of rounds in which every configuration
  takes a turn, measured in this run on this machine (a ratio; the Python hooks cost
  relatively more on a model this small than on a large one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ciuic
from ciuic import CiuicConfig
from ciuic.activations import DEFAULT_RULES, ActivationOptions, CodecRule
from tests.core.activations.figures import Step, cosine, lora_step
from tests.models import deepseek_v3, lora, progressions

CONFIGS: dict[str, CiuicConfig] = {
    "none": CiuicConfig(),
    "fp8": CiuicConfig(activations="fp8"),
    "int8": CiuicConfig(activations="int8"),
    "int4": CiuicConfig(activations="int4"),
    "int2": CiuicConfig(activations="int2"),
    "offload": CiuicConfig(offload={"activations"}),
    "int4+offload": CiuicConfig(activations="int4", offload={"activations"}),
    "checkpoint full": CiuicConfig(checkpointing="full"),
    "int8+full+offload": CiuicConfig(activations="int8", checkpointing="full", offload={"activations"}),
    # the default rules and attention at 4 bits at least
    "int2, attention 4-bit": CiuicConfig(
        activations=ActivationOptions(
            codec="int2", rules=(*DEFAULT_RULES, CodecRule("int4", types=("*Attention",)))
        )
    ),
    # no rule at all, weight copies at 2 bits too: every tensor 2-bit
    "int2, naive": CiuicConfig(activations=ActivationOptions(codec="int2", rules=(), weight_copies="int2")),
}


def build(name: str) -> nn.Module:
    model = lora(deepseek_v3())
    if CONFIGS[name].requested():
        ciuic.apply_(model, CONFIGS[name])
    return model


def timed_step(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one unmeasured training step (forward and backward)."""
    started = time.perf_counter()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return time.perf_counter() - started


def step_time_ratios(models: dict[str, nn.Module], ids: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each configuration's step time over the exact step's.

    The configurations take turns within a round, so a load change on a shared machine hits
    them alike.
    """
    ratios: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        times = {name: timed_step(model, ids) for name, model in models.items()}
        for name in models:
            ratios[name].append(times[name] / times["none"])
    return {name: statistics.median(values) for name, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of every configuration")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = progressions(batch_size=2, seq_len=args.seq_len)
    names = list(CONFIGS)
    models = {name: build(name) for name in names}
    steps: dict[str, Step] = {name: lora_step(model, ids) for name, model in models.items()}
    ratios = step_time_ratios(models, ids, args.repeats)
    exact = steps["none"]
    print(f"## activation memory: tiny DeepSeek-V3 + LoRA, bf16 autocast, batch 2 x {args.seq_len}")
    print(f"{'config':<24}{'saved B':>11}{'smaller':>9}{'host B':>11}{'cosine':>9}{'time':>7}")
    for name in names:
        step = steps[name]
        smaller = f"{exact.saved / step.saved:.2f}x" if step.saved else "all"
        print(
            f"{name:<24}{step.saved:>11,}{smaller:>9}{step.offloaded:>11,}"
            f"{cosine(step.grads, exact.grads):>9.4f}{ratios[name]:>6.2f}x"
        )


if __name__ == "__main__":
    main()
