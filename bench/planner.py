"""Bench for ``ciuic.plan``: the presets against the plain QLoRA recipe, priced at full DeepSeek
shapes on fake tensors, and (on a CUDA machine) the prediction against the measured peak.

Run: ``python bench/planner.py`` (a few minutes on a 2-core CPU). Prints, for
DeepSeek-R1-Distill-Qwen-7B with LoRA rank 16, batch 1, at 1,024, 4,096 and 16,384 tokens, the
priced peak (GiB) of the QLoRA recipe (``ciuic.planner.qlora_recipe()``: NF4 weights, every block
checkpointed) and of the ``balanced`` and ``max`` presets (``ciuic.plan(..., candidates=...)``),
and the wall time of each row, with the forward under bf16 autocast as a GPU QLoRA run has it
(``ciuic.plan``'s default ``precision="mixed"``; ``--precision true`` for none). With CUDA it
also runs a real step of a small Qwen2 model per config and prints the predicted peak next to
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ciuic
from ciuic.planner import qlora_recipe

GIB = 2**30
CONFIGS = {
    "qlora recipe": qlora_recipe,
    "balanced": lambda: ciuic.CiuicConfig.preset("balanced"),
    "max": lambda: ciuic.CiuicConfig.preset("max"),
}


def preset_rows(model: str, tokens: list[int], precision: str = "mixed") -> dict[int, dict[str, float]]:
    """Priced peak in GiB per token count and config."""
    rows: dict[int, dict[str, float]] = {}
    for n in tokens:
        configs = [make() for make in CONFIGS.values()]
        result = ciuic.plan(
            model,
            seq_len=n,
            batch=1,
            budget="1TiB",
            lora=16,
            candidates=configs,
            precision=precision,
        )
        rows[n] = {
            name: (c.peak_bytes / GIB if not c.error else float("nan"))
            for name, c in zip(CONFIGS, result.candidates, strict=True)
        }
        print(f"{n:>7}" + "".join(f"{rows[n][name]:>14.2f}" for name in CONFIGS), flush=True)
    return rows


def cuda_rows() -> None:
    """Predicted (fake) peak vs torch.cuda.max_memory_allocated of the same step on the GPU."""
    from transformers import Qwen2Config

    from ciuic.planner import price

    shape = Qwen2Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    shape.dtype = torch.bfloat16
    print("\n## CUDA: predicted peak vs torch.cuda.max_memory_allocated (Qwen2 1024x4, LoRA 16, 1 x 2048)")
    print(f"{'config':<14}{'predicted MiB':>15}{'measured MiB':>14}{'ratio':>8}")
    for name, make in CONFIGS.items():
        config = make()
        predicted = price(shape, config, seq_len=2048, batch=1, lora=16, device="cpu").peak_bytes
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        price(shape, config, seq_len=2048, batch=1, lora=16, device="cuda", fake=False)
        measured = torch.cuda.max_memory_allocated() - base
        print(f"{name:<14}{predicted / 2**20:>15.1f}{measured / 2**20:>14.1f}{predicted / measured:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-r1-distill-qwen-7b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--precision", choices=("mixed", "true"), default="mixed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"## presets vs the QLoRA recipe: {args.model}, LoRA 16, batch 1, precision {args.precision}, "
        "priced peak GiB"
    )
    print(f"{'tokens':>7}" + "".join(f"{name:>14}" for name in CONFIGS))
    preset_rows(args.model, args.tokens, args.precision)
    if torch.cuda.is_available():
        cuda_rows()


if __name__ == "__main__":
    main()
