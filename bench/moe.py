"""Bench for DeepSeek MoE QLoRA: quantized routed experts under PEFT's expert LoRA.

Run: ``python bench/moe.py [--steps 100] [--lr 1e-3] [--seeds 0,1,2]`` (about half a minute a
seed on a 2-core CPU). On the tiny DeepSeek-V3 of ``tests/core/weights/test_moe_lora.py``
(hidden 256, 3 layers, 8 routed experts + 1 shared, bf16) with LoRA r=8 from
``ciuic.lora_targets`` (MLA attention, dense MLP, shared and routed experts), ``weights="nf4"``,
it prints:

1. per order (``get_peft_model`` then ``apply_``; ``apply_`` then ``get_peft_model``): the
   share of frozen weight elements converted and the weight bytes (scales included, LoRA
   adapters excluded, by ``MemoryMeter``) against the dense bf16 model;
2. training parity, one row per base-model seed (``--seeds``, default 0): final loss (mean of
   the last 10 steps) of the NF4 LoRA run and of the dense bf16 LoRA run, same adapters and
   batches, AdamW (lr ``--lr``, default the test's 1e-3), and of plain PEFT's run on the
   dequantized NF4 weights (the NF4 run in exact arithmetic, so the gap to it is Ciuic's own);
3. the adapter round trip (``round_trip_errors``, of the first seed's model): mean |logit| gap
   between the NF4 model and its saved adapter loaded by plain PEFT into the dense bf16 model,
   beside the NF4 error of the adapted model (plain PEFT on the dense against the dequantized
   weights), without LoRA, and the bf16 rounding between Ciuic's NF4 forward and plain PEFT on
   the dequantized weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed

from tests.core.weights import test_moe_lora as moe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=moe.LR)
    parser.add_argument("--seeds", default="0", help="base-model seeds of the loss runs, e.g. 0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bf16 = moe._weight_bytes(moe._peft(moe._base()))
    print("order                 coverage  weight bytes  vs bf16")
    for order, build in (("peft then apply_", moe._order_a), ("apply_ then peft", moe._order_b)):
        model, handle = build()
        coverage = handle.applied[0].details["coverage"]
        stored = moe._weight_bytes(model)
        row = f"{order:<20} {coverage:>9.2%} {stored:>13,} {stored / bf16:>8.3f}x"
        print(f"{row}  (bf16: {bf16:,} B)", flush=True)
    print()
    trained, seeds = [], [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        model, losses, dense_losses = moe.train_pair(args.steps, args.lr, seed)
        trained.append(model)
        final, dense_final = moe.final_loss(losses), moe.final_loss(dense_losses)
        control = moe.final_loss(moe.dequantized_losses(args.steps, args.lr, seed))
        print(
            f"seed {seed}, {args.steps} LoRA steps, lr {args.lr:g}: nf4 final loss {final:.4f}, bf16 "
            f"{dense_final:.4f}, gap {abs(final - dense_final) / dense_final:.2%} (first step "
            f"{losses[0]:.4f}); plain PEFT on the dequantized weights {control:.4f}, gap "
            f"{abs(final - control) / control:.2%}",
            flush=True,
        )
    errors = moe.round_trip_errors(trained[0], seeds[0])
    print(
        f"adapter in plain PEFT on bf16: mean |logit gap| {errors['adapter']:.4f}; NF4 error with "
        f"this adapter {errors['nf4']:.4f} (ratio {errors['adapter'] / errors['nf4']:.3f}), "
        f"without LoRA {errors['nf4_without_lora']:.4f}; bf16 rounding (NF4 model vs its "
        f"dequantized weights in plain PEFT) {errors['rounding']:.4f}"
    )


if __name__ == "__main__":
    main()
