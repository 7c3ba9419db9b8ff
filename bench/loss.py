"""Bench for ``loss="chunked"``: memory, fidelity and cost against the materialized-logits loss.

Run: ``python bench/loss.py`` (about a minute on a 2-core CPU). Prints three tables:

1. memory: the loss's forward+backward peak at DeepSeek-R1-Distill-Qwen-7B size (hidden 3,584,
   vocabulary 152,064, bf16) for several context lengths, measured with ``MemoryMeter`` under
   ``FakeTensorMode`` (no real allocation), with a frozen ``lm_head`` (LoRA) and a trained one;
2. fidelity: relative L2 error of loss and gradients against an fp64 reference, in fp32 and bf16,
   for the chunked and the standard path;
3. training parity: the largest per-step relative gap between the losses of a chunked and a
   standard run of 100 steps from the same seed (fp32, AdamW), for full fine-tuning of a tiny
   Qwen2 and the demo's DeepSeek-V3 LoRA with a trained ``lm_head``, at two learning rates;
4. cost: forward+backward time of the chunked loss over the standard one, measured in this run
   on the CPU (a ratio, not a time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed

import ciuic
from ciuic.loss import LossOptions, linear_cross_entropy, reference_linear_cross_entropy
from tests.core.loss.test_hf import TRAINING, train
from tests.core.loss.test_memory import measure

HIDDEN, VOCAB = 3584, 152064
GiB = 2**30
PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "chunked": linear_cross_entropy,
    "standard": reference_linear_cross_entropy,
}


def peak_gib(loss_fn: Callable[..., torch.Tensor], tokens: int, trainable_head: bool) -> float:
    return measure(loss_fn, trainable_head=trainable_head, tokens=tokens).peak_bytes / GiB


def memory_table(token_counts: list[int]) -> None:
    print("## memory: loss forward+backward peak, GiB (hidden 3584, vocab 152064, bf16, FakeTensorMode)")
    print("Includes the gradients handed out: dL/dh, and with a trained head dL/dW (1.02 GiB).")
    print(f"{'tokens':>7} {'lm_head':>8} {'standard':>9} {'chunked':>8} {'saved':>7}")
    for tokens in token_counts:
        for trainable in (False, True):
            standard = peak_gib(reference_linear_cross_entropy, tokens, trainable)
            chunked = peak_gib(linear_cross_entropy, tokens, trainable)
            head = "trained" if trainable else "frozen"
            print(f"{tokens:>7} {head:>8} {standard:>9.2f} {chunked:>8.2f} {standard / chunked:>6.1f}x")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _errors(
    loss_fn: Callable[..., torch.Tensor], dtype: torch.dtype, shape: tuple[int, int, int]
) -> list[float]:
    tokens, hidden_size, vocab = shape
    gen = torch.Generator().manual_seed(0)
    exact = {
        "hidden": torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64),
        "weight": torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5,
    }
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[: tokens // 8] = -100
    cast = {k: v.to(dtype).requires_grad_() for k, v in exact.items()}
    truth_inputs = {k: v.detach().double().requires_grad_() for k, v in cast.items()}
    loss = loss_fn(cast["hidden"], cast["weight"], target)
    grads = torch.autograd.grad(loss, list(cast.values()))
    truth = reference_linear_cross_entropy(truth_inputs["hidden"], truth_inputs["weight"], target)
    truth_grads = torch.autograd.grad(truth, list(truth_inputs.values()))
    return [_rel(loss, truth)] + [_rel(g, t) for g, t in zip(grads, truth_grads, strict=True)]


def fidelity_table(shape: tuple[int, int, int]) -> None:
    print(f"\n## fidelity: relative L2 error vs fp64 (tokens, hidden, vocab = {shape})")
    print(f"{'dtype':>9} {'path':>9} {'loss':>9} {'dL/dh':>9} {'dL/dW':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in PATHS.items():
            errs = _errors(fn, dtype, shape)
            print(f"{str(dtype)[6:]:>9} {name:>9} " + " ".join(f"{e:>9.2e}" for e in errs))


def parity_table(steps: int, learning_rates: tuple[float, ...]) -> None:
    print(f"\n## training parity: max relative loss gap per step, chunked vs standard ({steps} steps, fp32)")
    print(f"{'model':>38} " + " ".join(f"{'lr ' + str(lr):>9}" for lr in learning_rates))
    for name, build in TRAINING.items():
        gaps = []
        for lr in learning_rates:
            standard, chunked = build(), build()
            chunks = LossOptions(kind="chunked", chunk_bytes=4096)  # 8 tokens a chunk: many per batch
            ciuic.apply_(chunked, ciuic.CiuicConfig(loss=chunks))
            expected, got = train(standard, steps, lr=lr), train(chunked, steps, lr=lr)
            gaps.append(max(abs(a - b) / b for a, b in zip(got, expected, strict=True)))
        print(f"{name:>38} " + " ".join(f"{gap:>9.1e}" for gap in gaps))


def _step_seconds(loss_fn: Callable[..., torch.Tensor], inputs: dict[str, Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(**inputs).backward()
        best = min(best, time.perf_counter() - start)
    return best


def cost_table(shape: tuple[int, int, int], repeats: int) -> None:
    tokens, hidden_size, vocab = shape
    print(f"\n## cost: forward+backward time, chunked / standard (CPU, fp32, {shape}; best of {repeats})")
    print(f"{'lm_head':>8} {'ratio':>6}")
    for trainable in (False, True):
        inputs = {
            "hidden": torch.randn(tokens, hidden_size, requires_grad=True),
            "weight": torch.randn(vocab, hidden_size, requires_grad=trainable),
            "target": torch.randint(0, vocab, (tokens,)),
        }
        standard = _step_seconds(reference_linear_cross_entropy, inputs, repeats)
        chunked = _step_seconds(linear_cross_entropy, inputs, repeats)
        print(f"{'trained' if trainable else 'frozen':>8} {chunked / standard:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    memory_table(args.tokens)
    fidelity_table((512, 256, 8192))
    parity_table(100, (3e-3, 1e-2))
    cost_table((2048, 512, 32768), args.repeats)


if __name__ == "__main__":
    main()
