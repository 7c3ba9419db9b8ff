"""Pricing a config by running the training step: ``price`` runs real training steps of a model
under ``FakeTensorMode`` (no memory, no GPU) inside a :class:`ciuic.MemoryMeter` and returns the
peak and its breakdown by category.

The same code runs on real tensors (``fake=False``): that is how the tests hold the fake figure
to the measured one, config by config.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ciuic.api import apply_, as_config, build_optimizer, remove_, step_scope
from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError
from ciuic.memory import CATEGORIES, MemoryMeter, MemoryReading

from .build import ModelSource, build_model, extrapolation_layers, fake_model, with_layers
from .precision import StepPrecision, check_precision, model_dtype

LoraSpec = int | Callable[[nn.Module], nn.Module] | None
"""A LoRA rank (PEFT adapters on the model's attention and MLP projections), a function that
wraps the model itself, or ``None`` for full fine-tuning."""


@dataclass(frozen=True)
class Pricing:
    """What one pricing found.

    Attributes:
        config: The config priced.
        reading: The meter's figures over the priced steps (peak, breakdown at the peak, host).
        seconds: Wall time of the pricing (build, apply, steps).
        fake: Whether it ran on fake tensors.
    """

    config: CiuicConfig
    reading: MemoryReading
    seconds: float
    fake: bool

    @property
    def peak_bytes(self) -> int:
        """Device bytes at the peak."""
        peak: int = self.reading.peak_bytes
        return peak

    @property
    def breakdown(self) -> dict[str, int]:
        """Device bytes by category at the peak, plus host bytes as ``offloaded``."""
        breakdown: dict[str, int] = self.reading.peak_by_category
        return breakdown


def price(
    model_or_builder: ModelSource,
    config: CiuicConfig | str | Mapping[str, Any],
    *,
    seq_len: int,
    batch: int,
    lora: LoraSpec = None,
    device: str | torch.device = "cpu",
    steps: int = 2,
    fake: bool = True,
    lr: float = 1e-4,
    extrapolate: bool = True,
    attention: str = "as_run",
    precision: str = "true",
) -> Pricing:
    """The peak memory of ``steps`` training steps of a model under ``config``.

    Each step is a forward with labels, a backward, the optimizer step (``ciuic.build_optimizer``)
    and ``zero_grad``, run inside ``ciuic.step_scope``: two steps, so that the optimizer states
    of the second are in the peak. With ``fake=True`` the model is built on ``meta`` (no random
    initialization), wrapped with LoRA, then given fake storages on ``device``: nothing is
    allocated and a full-size model prices on a CPU. Nothing fake outlives the call.

    Args:
        model_or_builder: A function returning the model, a Hugging Face config (the model is
            built from it with ``AutoModelForCausalLM.from_config``), or a Hugging Face model
            (rebuilt from its config; the model itself is left alone).
        config: The ciuic config to price (a ``CiuicConfig``, preset name or mapping).
        seq_len: Tokens per sample.
        batch: Samples per step.
        lora: A LoRA rank, a function wrapping the model, or ``None`` (full fine-tuning).
        device: The device the step runs on. A CPU-only build of torch cannot run a step on
            fake CUDA tensors; fake CPU tensors give the same bytes except where a kernel
            differs by device (attention's saved statistics, LLM.int8's training path).
        steps: Training steps to run (at least 1).
        fake: ``False`` runs the same steps on real tensors (to check a pricing).
        lr: The optimizer's learning rate (only the real run's values depend on it).
        extrapolate: For a Hugging Face config under fake tensors, price three short models
            (2-4 decoder layers past the dense ones) and extrapolate to the full depth when
            their figures are affine in the layer count (else run the full model): the same
            bytes, several times faster. Not used with ``checkpointing`` other than
            ``'none'``/``'full'``, whose choice depends on the depth.
        attention: ``'as_run'``: attention as torch dispatches it on ``device`` (on fake CPU
            tensors its math kernel, which holds a ``heads x T x T`` score matrix);
            ``'fused'``: as a GPU runs it, torch's memory-efficient kernel
            (:mod:`ciuic.planner.attention`; fake tensors and transformers models only).
        precision: ``'true'``: no autocast; ``'mixed'``: the forward under autocast in the
            model's 16-bit dtype, as HF ``bf16=True`` and Lightning ``'bf16-mixed'`` run it
            (:mod:`ciuic.planner.precision`).

    Returns:
        A :class:`Pricing`.

    Example:
        >>> from ciuic.planner import price
        >>> from transformers import Qwen2Config
        >>> small = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128,
        ...                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> price(small, "balanced", seq_len=32, batch=1, lora=8, device="cpu").peak_bytes > 0
        True
    """
    cfg = as_config(config)
    device = torch.device(device)
    _check_device(device, fake)
    _check_attention(attention, fake)
    check_precision(precision)
    started = time.perf_counter()
    run = functools.partial(
        _price_once,
        config=cfg,
        seq_len=seq_len,
        batch=batch,
        lora=lora,
        device=device,
        steps=steps,
        fake=fake,
        lr=lr,
        attention=attention,
        precision=precision,
    )
    layers = extrapolation_layers(model_or_builder, cfg) if fake and extrapolate else None
    reading = run(model_or_builder) if layers is None else _extrapolated(run, model_or_builder, layers)
    return Pricing(cfg, reading, time.perf_counter() - started, fake)


def _price_once(
    model_or_builder: ModelSource,
    *,
    config: CiuicConfig,
    seq_len: int,
    batch: int,
    lora: LoraSpec,
    device: torch.device,
    steps: int,
    fake: bool,
    lr: float,
    attention: str,
    precision: str,
) -> MemoryReading:
    with _tensor_mode(fake):
        if fake:
            model = fake_model(model_or_builder, lora=lora, device=device, attention=attention)
        else:
            model = build_model(model_or_builder, lora=lora, meta=False).to(device)
        reading = _run_steps(
            model, config, seq_len=seq_len, batch=batch, device=device, steps=steps, lr=lr,
            precision=precision,
        )
    del model
    return reading


def _extrapolated(
    run: Callable[[ModelSource], MemoryReading], source: ModelSource, layers: tuple[int, int, int, int]
) -> MemoryReading:
    """The reading of the ``layers[3]``-layer model from three short ones, when they are affine
    in the layer count (identical blocks: each adds the same bytes to every figure at the
    peak); otherwise the full model is run."""
    *points, full = layers
    readings = [run(with_layers(source, n)) for n in points]
    figures = [_figures(r) for r in readings]
    steps = [[b - a for a, b in zip(x, y, strict=True)] for x, y in itertools.pairwise(figures)]
    if steps[0] != steps[1] or any(d < 0 for d in steps[0]):
        return run(source)
    extra = (full - points[0]) // (points[1] - points[0])
    values = [a + extra * d for a, d in zip(figures[0], steps[0], strict=True)]
    return _reading(readings[0].device, values)


def _figures(reading: MemoryReading) -> list[int]:
    return [
        reading.peak_bytes,
        reading.peak_offloaded_bytes,
        *(reading.peak_by_category[c] for c in CATEGORIES),
    ]


def _reading(device: str, values: list[int]) -> MemoryReading:
    peak, offloaded, *by_category = values
    return MemoryReading(device, peak, dict(zip(CATEGORIES, by_category, strict=True)), offloaded, None)


def _check_device(device: torch.device, fake: bool) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        what = "fake CUDA tensors" if fake else "CUDA tensors"
        raise ConfigError(
            f"device={str(device)!r} needs a CUDA build of torch: this one has none, and {what} cannot run "
            f"a training step in it (indexing, host-to-device copies, CUDA generators and streams need the "
            f"CUDA runtime). Price on device='cpu' (fake CPU tensors: the same bytes except where a kernel "
            f"differs by device, see ciuic.planner)."
        )


def _check_attention(attention: str, fake: bool) -> None:
    if attention not in ("as_run", "fused"):
        raise ConfigError(f"attention={attention!r} is not allowed. Allowed: 'as_run', 'fused'.")
    if attention == "fused" and not fake:
        raise ConfigError(
            "attention='fused' prices torch's memory-efficient attention kernel, which has no CPU "
            "kernel: use it with fake=True (or attention='as_run' on real tensors)."
        )


@contextlib.contextmanager
def _tensor_mode(fake: bool) -> Iterator[None]:
    if not fake:
        yield
        return
    with FakeTensorMode():
        yield


def _run_steps(
    model: nn.Module,
    config: CiuicConfig,
    *,
    seq_len: int,
    batch: int,
    device: torch.device,
    steps: int,
    lr: float,
    precision: str,
) -> MemoryReading:
    mixed = StepPrecision(precision, model_dtype(model), device)
    handle = apply_(model, config)
    try:
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, lr=lr)
        vocab = _vocab_size(model)
        tokens = torch.randint(0, vocab, (batch, seq_len), device=device)
        with MemoryMeter(device=device, track=(model, optimizer)) as meter:
            for _ in range(steps):
                _train_step(model, optimizer, tokens, mixed)
        del optimizer
        return meter.reading()
    finally:
        del handle
        remove_(model)


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    precision: StepPrecision,
) -> None:
    with step_scope(model), precision.step():
        with precision.forward():
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise TypeError(
            f"cannot price {type(model).__name__}: it has no config.vocab_size (a causal LM is needed)."
        )
    return vocab
