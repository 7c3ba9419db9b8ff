"""Bench for ``weights=...``: bytes, fidelity and step cost of frozen-weight conversion.

Run: ``python bench/weights.py`` (about ten seconds on a 2-core CPU). Two bf16 models built
offline at hidden size 256: DeepSeek-V3 architecture (MLA, one dense layer then an MoE layer with
4 fused routed experts and a shared expert) and Qwen2 (the DeepSeek-R1-Distill shape). Prints:

1. bytes: parameter bytes of the converted weights, measured with ``MemoryMeter`` around the
   conversion (scales included), over their bf16 bytes; the share of frozen linear + expert
   elements converted; the lowest per-tensor SNR; the logits' relative L2 error;
2. cost: time of a LoRA forward+backward step on the converted model over the bf16 model's,
   measured in this run on this CPU (a ratio, not a time; bitsandbytes' CPU path dequantizes
   every weight at every use, a GPU runs fused kernels).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

import ciuic
from ciuic import MemoryMeter
from ciuic.demo import progression_batches, tiny_deepseek_v3
from ciuic.weights import Codec, WeightOptions, dense_weights, quantize_linear, snr_db

HIDDEN = 256
VARIANTS: dict[str, WeightOptions] = {
    "nf4": WeightOptions(format="nf4"),
    "nf4+dq": WeightOptions(format="nf4", double_quant=True),
    "fp4": WeightOptions(format="fp4"),
    "int8": WeightOptions(format="int8"),
    "2:4": WeightOptions(format="none", prune="2:4"),
    "nf4+2:4": WeightOptions(format="nf4", prune="2:4"),
}
TARGETS = {
    "deepseek_v3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "deepseek_v3": lambda: tiny_deepseek_v3(hidden_size=HIDDEN),
    "qwen2": qwen2,
}


def frozen(arch: str) -> nn.Module:
    return BUILDERS[arch]().to(torch.bfloat16).requires_grad_(False)


def measure(arch: str, options: WeightOptions) -> dict[str, float]:
    for fmt in ("nf4", "int8"):  # bitsandbytes' one-time tables, not part of any model
        Codec(fmt).encode(torch.zeros(256))
        quantize_linear(nn.Linear(64, 64), fmt)
    model = frozen(arch)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = next(progression_batches(batch_size=2, seq_len=16, vocab_size=64))
    with torch.no_grad():
        reference = model(ids).logits
    before = [weakref.ref(t) for t in (*model.parameters(), *model.buffers())]
    with MemoryMeter(track=(model,), device="cpu") as meter:
        dense = meter.current_bytes
        applied = ciuic.apply_(model, ciuic.CiuicConfig(weights=options)).applied[0]
        spike = torch.empty(meter.peak_bytes + 1, dtype=torch.uint8)  # a peak after the conversion
        del spike
    kept = {id(t) for t in (r() for r in before) if t is not None}
    untouched = sum(
        t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()) if id(t) in kept
    )
    snrs = [
        snr_db(originals[f"{name}.{param}"], tensor)
        for name in applied.changed
        for param, tensor in dense_weights(model.get_submodule(name)).items()
    ]
    with torch.no_grad():
        logits = model(ids).logits
    error = float((logits.double() - reference.double()).norm() / reference.double().norm())
    return {
        "ratio": (meter.peak_by_category["parameters"] - untouched) / (dense - untouched),
        "coverage": applied.details["coverage"],
        "snr": min(snrs),
        "logits": error,
    }


def step_seconds(arch: str, weights: str, steps: int = 10) -> float:
    model = frozen(arch)
    if weights != "none":
        ciuic.apply_(model, ciuic.CiuicConfig(weights=weights))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS[arch])))
    batches = progression_batches(batch_size=8, seq_len=64, vocab_size=64)
    best = float("inf")
    for _ in range(steps):
        ids = next(batches)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print("## bytes and fidelity (bf16 models, hidden 256; bytes from MemoryMeter, scales included)")
    header = ("model", "variant", "bytes/bf16", "converted", "min SNR dB", "logits err")
    print(f"{header[0]:<12} {header[1]:<8} " + " ".join(f"{h:>10}" for h in header[2:]))
    for arch in BUILDERS:
        for name, options in VARIANTS.items():
            row = measure(arch, options)
            print(
                f"{arch:<12} {name:<8} {row['ratio']:>10.4f} {row['coverage']:>10.1%} "
                f"{row['snr']:>10.2f} {row['logits']:>10.4f}"
            )
    print("\n## cost: LoRA forward+backward time over the bf16 model's (this CPU, best of 10)")
    print(f"{'model':<12} {'nf4':>6} {'int8':>6}")
    for arch in BUILDERS:
        base = step_seconds(arch, "none")
        print(
            f"{arch:<12} {step_seconds(arch, 'nf4') / base:>5.2f}x {step_seconds(arch, 'int8') / base:>5.2f}x"
        )


if __name__ == "__main__":
    main()
