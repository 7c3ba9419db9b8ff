"""Pricing under fake tensors equals the measured peak on real tensors, config by config.

Both runs go through ``ciuic.planner.price``: the same build, ``apply_``, optimizer and two
training steps, once on fake CPU tensors (a model built on ``meta``, LoRA-wrapped, then given
fake storages) and once on real CPU tensors, each inside a ``MemoryMeter(device="cpu")``. The
pairing is fake CPU with real CPU so both run the same kernels (attention, bitsandbytes'
training path); the DeepSeek-V3 model is bf16 because torch's fake kernel of ``_grouped_mm``
(transformers' fused-experts path) accepts only bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module

import ciuic
from ciuic.planner import price
from tests.models import LLAMA_LORA_TARGETS, deepseek_v3, lora, qwen2

RANK = 32  # LoRA matrices of 32 x 128 = 4096 elements: the 8/4-bit optimizer quantizes them
SEQ, BATCH = 16, 2


def _qwen2() -> nn.Module:
    return qwen2(hidden_size=128)


def _deepseek_v3() -> nn.Module:
    return deepseek_v3(hidden_size=128).to(torch.bfloat16)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], nn.Module]]] = {
    "qwen2": (_qwen2, lambda model: lora(model, rank=RANK, targets=LLAMA_LORA_TARGETS)),
    "deepseek_v3": (_deepseek_v3, lambda model: lora(model, rank=RANK)),
}

CONFIGS: dict[str, Any] = {
    "off": "off",
    "balanced": "balanced",
    "max": "max",
    "weights_nf4": {"weights": "nf4"},
    "weights_nf4_double_quant": {"weights": {"format": "nf4", "double_quant": True}},
    "weights_int8": {"weights": "int8"},
    "activations_int8": {"activations": "int8"},
    "activations_int4": {"activations": "int4"},
    "checkpointing_full": {"checkpointing": "full"},
    "loss_chunked": {"loss": "chunked"},
    "optimizer_adamw8bit": {"optimizer": "adamw8bit"},
    "offload_activations": {"offload": ["activations"]},
    "offload_optimizer": {"offload": ["optimizer"]},
}


def _price(model: str, config: Any, *, fake: bool) -> ciuic.planner.Pricing:
    builder, wrap = MODELS[model]
    return price(builder, config, seq_len=SEQ, batch=BATCH, lora=wrap, device="cpu", fake=fake)


ROUTED = {"deepseek_v3"}
"""Models whose MoE routing depends on values fake tensors do not have."""

FAST = {("qwen2", "balanced"), ("deepseek_v3", "max")}
"""Pairs run by default; the rest of the matrix (about 10 s a pair on an idle 2-core CPU) is slow."""

MATRIX = [
    pytest.param(
        model, config, marks=() if (model, config) in FAST else pytest.mark.slow, id=f"{model}-{config}"
    )
    for model in MODELS
    for config in CONFIGS
]


@pytest.mark.parametrize(("model", "config"), MATRIX)
def test_fake_pricing_equals_the_measured_peak(model: str, config: str) -> None:
    predicted = _price(model, CONFIGS[config], fake=True)
    measured = _price(model, CONFIGS[config], fake=False)
    assert predicted.fake and not measured.fake
    assert predicted.reading.peak_offloaded_bytes == measured.reading.peak_offloaded_bytes
    if model in ROUTED:
        # Fake tensors carry no values, so the router's picks are assumed balanced (every
        # expert gets ceil(tokens * k / experts) rows, ciuic.weights.experts.fake_routing):
        # the model and its states are exact, what one expert's rows save or hold follows the
        # assumed routing. Measured: peak 0.4% over on "max", exact or closer on the rest
        # (activations of "weights_int8" 2% over); the acceptance asks 5%.
        static = ("parameters", "gradients", "optimizer", "offloaded")
        assert {k: predicted.breakdown[k] for k in static} == {k: measured.breakdown[k] for k in static}
        assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    else:
        assert predicted.peak_bytes == measured.peak_bytes  # exact: the acceptance asks within 5%
        assert predicted.breakdown == measured.breakdown


def test_offload_and_quantization_show_in_the_priced_breakdown() -> None:
    """The fake run sees what each technique changes (not one figure for every config)."""
    off = _price("qwen2", "off", fake=True).breakdown
    nf4 = _price("qwen2", {"weights": "nf4"}, fake=True).breakdown
    offloaded = _price("qwen2", {"offload": ["activations"]}, fake=True).breakdown
    compressed = _price("qwen2", {"activations": "int4"}, fake=True)
    assert nf4["parameters"] < off["parameters"] / 2  # frozen fp32 weights packed to 4 bits
    assert offloaded["offloaded"] > 0 and off["offloaded"] == 0
    assert compressed.peak_bytes < _price("qwen2", "off", fake=True).peak_bytes


def test_pricing_leaves_no_fake_mode_nor_global_hook_behind() -> None:
    before = (
        dict(nn_module._global_forward_hooks),
        dict(nn_module._global_forward_pre_hooks),
        dict(nn_module._global_parameter_registration_hooks),
    )
    pricing = _price("qwen2", "max", fake=True)
    from torch._guards import detect_fake_mode

    assert detect_fake_mode() is None
    assert isinstance(torch.empty(1), torch.Tensor) and type(torch.empty(1)) is torch.Tensor
    after = (
        dict(nn_module._global_forward_hooks),
        dict(nn_module._global_forward_pre_hooks),
        dict(nn_module._global_parameter_registration_hooks),
    )
    assert after == before
    assert pricing.config == ciuic.CiuicConfig.preset("max")


def _price_bf16_qwen2(
    config: Any, *, fake: bool, precision: str, seq_len: int = SEQ
) -> ciuic.planner.Pricing:
    def build() -> nn.Module:
        return _qwen2().to(torch.bfloat16)

    return price(
        build,
        config,
        seq_len=seq_len,
        batch=BATCH,
        lora=MODELS["qwen2"][1],
        device="cpu",
        fake=fake,
        precision=precision,
    )


@pytest.mark.parametrize("config", ["balanced", "checkpointing_full"])
def test_mixed_precision_pricing_equals_the_measured_peak(config: str) -> None:
    """Under ``precision="mixed"`` the fake and the real step run the same autocast, exactly."""
    predicted = _price_bf16_qwen2(CONFIGS[config], fake=True, precision="mixed")
    measured = _price_bf16_qwen2(CONFIGS[config], fake=False, precision="mixed")
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.breakdown == measured.breakdown
    assert not torch.is_autocast_enabled() and not torch.is_autocast_enabled("cpu")


def test_mixed_precision_drops_peft_float32_copies_also_in_the_recompute() -> None:
    """Under autocast PEFT's fp32 adapters take the bf16 input as it is (no fp32 copy of it),
    in the forward and in a checkpointed block's recompute: the peak falls (256 tokens, where
    activations outweigh the adapters' bf16 copies that autocast caches)."""
    for config in ("off", {"checkpointing": "full"}, {"weights": "nf4", "checkpointing": "full"}):
        mixed = _price_bf16_qwen2(config, fake=True, precision="mixed", seq_len=256)
        true = _price_bf16_qwen2(config, fake=True, precision="true", seq_len=256)
        assert mixed.peak_bytes < true.peak_bytes, config
        assert mixed.breakdown["parameters"] == true.breakdown["parameters"]


def test_bad_precision_is_refused_naming_the_field() -> None:
    with pytest.raises(ciuic.ConfigError, match=r"precision='bf16' is not allowed\. Allowed: 'mixed'"):
        price(_qwen2_config(1), "off", seq_len=SEQ, batch=BATCH, precision="bf16")


def test_optimizer_tables_stay_real_after_a_fake_pricing() -> None:
    """The 8-bit tables are cached per device: a fake pricing must not leave fake ones there."""
    _price("qwen2", {"optimizer": "adamw8bit"}, fake=True)
    from ciuic.optim.quant import FORMATS

    qmap, _, lookup = FORMATS[8][0].tables(torch.device("cpu"))
    assert type(qmap) is torch.Tensor and type(lookup) is torch.Tensor
    assert qmap[-1].item() == 1.0


def _qwen2_config(layers: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize(
    "config",
    ["balanced", pytest.param("off", marks=pytest.mark.slow), pytest.param("max", marks=pytest.mark.slow)],
)
def test_extrapolated_depth_equals_the_full_fake_run(config: str) -> None:
    """A 7-layer config priced from 2-, 3- and 4-layer runs gives the 7-layer run's figures."""
    source = _qwen2_config(7)
    full = price(source, config, seq_len=SEQ, batch=BATCH, lora=8, extrapolate=False)
    extrapolated = price(source, config, seq_len=SEQ, batch=BATCH, lora=8)
    assert extrapolated.reading == full.reading


def test_fake_cuda_on_a_cpu_build_is_refused_before_building() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a CPU-only build of torch (this one has CUDA)")
    with pytest.raises(ciuic.ConfigError, match="device='cuda' needs a CUDA build"):
        price(_qwen2_config(1), "off", seq_len=SEQ, batch=BATCH, device="cuda")
