"""Bench for ``ciuic.planner.price``: what a config costs at DeepSeek-R1-Distill-Qwen-7B size,
and how long pricing it takes on this CPU.

Run: ``python bench/pricing.py`` (``--preset max --seq 4096 --lora-rank 16``; ``--full`` also
prices all 28 layers without depth extrapolation, several minutes on a 2-core CPU, and checks
that both give the same figures). The model is built from the shipped ``deepseek-r1-distill-qwen-7b`` shape
(hidden 3,584, 28 layers, intermediate 18,944, 28 heads, 4 KV heads, vocabulary 152,064,
bf16) on ``meta``, then run on fake CPU tensors: nothing is allocated.
"""

from __future__ import annotations

import argparse
import time

from ciuic.planner import price
from ciuic.planner.shapes import load_shape
from ciuic.units import format_bytes


def qwen_7b() -> object:
    """The DeepSeek-R1-Distill-Qwen-7B shape, bf16 (the shipped one)."""
    return load_shape("deepseek-r1-distill-qwen-7b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="max")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="also price all layers, no extrapolation")
    args = parser.parse_args()
    runs = [True, False] if args.full else [True]
    readings = []
    for extrapolate in runs:
        started = time.perf_counter()
        shape = {"seq_len": args.seq, "batch": args.batch, "lora": args.lora_rank}
        pricing = price(qwen_7b(), args.preset, **shape, extrapolate=extrapolate)
        seconds = time.perf_counter() - started
        readings.append(pricing.reading)
        how = "2-4 layers, extrapolated" if extrapolate else "all 28 layers"
        run = f"7B {args.preset}, {args.seq} tokens x {args.batch}, LoRA r={args.lora_rank} ({how})"
        print(f"{run}: {seconds:.1f} s")
        print(pricing.reading.report())
        print(f"  peak {format_bytes(pricing.peak_bytes)}")
    if args.full:
        print("extrapolated == full:", readings[0] == readings[1])


if __name__ == "__main__":
    main()
