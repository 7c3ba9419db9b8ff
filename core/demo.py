"""``ciuic demo``: LoRA fine-tuning of a small DeepSeek-V3-architecture model, built offline.

Everything here is generated locally: the model comes from a ``DeepseekV3Config`` (MLA
attention, MoE layers with routed and shared experts) with random weights, and the data is a
next-token task a small model can visibly learn (arithmetic progressions modulo the vocabulary:
from the first two tokens the model must infer the step and continue the sequence). The
training loop is plain PyTorch, so what the demo shows is what ``ciuic.apply_`` does to any loop.

transformers and peft are imported inside the functions (they are the ``hf`` extra).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .api import apply_, build_optimizer, remove_
from .config import CiuicConfig
from .errors import TechniqueUnavailableError
from .memory import MemoryMeter, MemoryReading

LORA_TARGETS = (
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""MLA attention and MLP projections of DeepSeek-V2/V3 by name. :func:`add_lora` uses
:func:`ciuic.lora_targets` instead, which also reaches the fused routed experts (3-D
parameters in transformers 5) and targets by weight the MLP linears this PEFT drops from
``target_modules`` (huggingface/peft#3711)."""


def tiny_deepseek_v3(
    *,
    vocab_size: int = 64,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_experts: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised ``DeepseekV3ForCausalLM`` small enough for a CPU.

    The first layer is dense and the others are MoE (``num_experts`` routed experts, two per
    token, and one shared expert), as in the full-size model.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    heads = 4
    config = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size // 2,
        num_hidden_layers=num_layers,
        first_k_dense_replace=1,
        n_routed_experts=num_experts,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=hidden_size // 2,
        kv_lora_rank=hidden_size // 4,
        qk_rope_head_dim=hidden_size // (2 * heads),
        qk_nope_head_dim=hidden_size // (2 * heads),
        v_head_dim=hidden_size // (2 * heads),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(config)


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    targets: tuple[str, ...] | None = None,
    modules_to_save: tuple[str, ...] = ("lm_head", "embed_tokens"),
) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on ``targets`` (default: :func:`ciuic.lora_targets`,
    attention, MLPs and routed experts).

    ``modules_to_save`` are trained in full (PEFT keeps a trainable copy), as is usual when the
    task brings tokens the base model never learned; everything else is frozen.
    """
    from peft import LoraConfig, get_peft_model

    from .lora_targets import lora_targets

    found = lora_targets(model) if targets is None else {"target_modules": list(targets)}
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, modules_to_save=list(modules_to_save), **found)
    return get_peft_model(model, lora)


def progression_batches(
    *, batch_size: int, seq_len: int, vocab_size: int, max_step: int = 3, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Endless batches of arithmetic progressions ``(start + step * t) % vocab_size``.

    ``start`` is uniform over the vocabulary and ``step`` over ``1..max_step``; every token
    after the second is determined by the first two, so a model that learns the rule drives the
    loss well below the ``log(vocab_size)`` of guessing.
    """
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq_len)
    while True:
        start = torch.randint(0, vocab_size, (batch_size, 1), generator=generator)
        step = torch.randint(1, max_step + 1, (batch_size, 1), generator=generator)
        yield (start + step * positions) % vocab_size


@dataclass
class DemoResult:
    """What a demo run measured."""

    config: CiuicConfig
    losses: list[float]
    memory: MemoryReading
    apply_report: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The text ``ciuic demo`` prints at the end."""
        first = sum(self.losses[:10]) / len(self.losses[:10])
        last = sum(self.losses[-10:]) / len(self.losses[-10:])
        lines = [self.apply_report, *(f"note: {n}" for n in self.notes)]
        lines.append(
            f"loss: {first:.3f} (first 10 steps) -> {last:.3f} (last 10 steps); "
            f"chance level is {math.log(self._vocab):.3f}"
        )
        lines.append(f"{len(self.losses)} steps in {self.seconds:.1f} s")
        lines.append(self.memory.report())
        return "\n".join(lines)

    _vocab: int = 64


def run_demo(
    config: CiuicConfig,
    *,
    steps: int = 200,
    batch_size: int = 8,
    seq_len: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Fine-tune the tiny DeepSeek-V3 model with LoRA under ``config`` and measure it.

    The whole training run happens inside one :class:`MemoryMeter`, so the table at the end is
    the peak of the run, broken down by category.
    """
    from tqdm.auto import tqdm

    vocab = 64
    model = add_lora(tiny_deepseek_v3(vocab_size=vocab, seed=seed))
    handle = apply_(model, config)
    notes: list[str] = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = build_optimizer(trainable, config, lr=lr)
    except TechniqueUnavailableError as error:
        notes.append(f"{error} Using torch.optim.AdamW for this demo.")
        optimizer = torch.optim.AdamW(trainable, lr=lr)
    batches = progression_batches(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab, seed=seed)
    losses: list[float] = []
    started = time.perf_counter()
    with MemoryMeter(device="cpu", track=(model, optimizer)) as meter:
        bar = tqdm(range(steps), desc=f"ciuic demo ({_short(config)})", disable=not progress)
        for _ in bar:
            tokens = next(batches)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - started
    report = handle.report()
    remove_(model)
    return DemoResult(config, losses, meter.reading(), report, seconds, notes, _vocab=vocab)


def _short(config: CiuicConfig) -> str:
    requested: dict[str, Any] = config.requested()
    return ", ".join(f"{k}={v}" for k, v in requested.items()) or "off"
