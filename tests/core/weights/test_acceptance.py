"""Acceptance figures of issue 4 on DeepSeek-V3 (MoE) and Qwen2 (R1-Distill) architectures."""

from __future__ import annotations

import pytest
import torch

import ciuic
from ciuic import CiuicConfig
from ciuic.weights import QuantizedExperts, dense_weights, snr_db
from ciuic.weights.linear import is_bnb_linear
from tests.core.weights.helpers import frozen_deepseek, frozen_qwen2, measure_conversion
from tests.models import progressions

BUILDERS = {"deepseek_v3": frozen_deepseek, "qwen2": frozen_qwen2}
MAX_RATIO_VS_BF16 = {"nf4": 0.29, "fp4": 0.29, "int8": 0.53}
MIN_SNR_DB = {"nf4": 18.0, "fp4": 17.5, "int8": 35.0}
# Relative L2 error of the logits of the whole (random-weight) model, measured 0.19-0.32
# (4-bit) and 0.017-0.022 (int8) on these models; the bounds leave ~25% headroom.
MAX_LOGITS_REL_ERROR = {"nf4": 0.40, "fp4": 0.40, "int8": 0.03}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_parameter_bytes_measured_by_memory_meter(arch: str, fmt: str) -> None:
    model = BUILDERS[arch]()
    measured = measure_conversion(model, lambda m: ciuic.apply_(m, CiuicConfig(weights=fmt)))
    details = measured["result"].applied[0].details
    ratio = measured["after"] / measured["before"]
    print(f"{arch} {fmt}: {measured['before']:,} B bf16 -> {measured['after']:,} B ({ratio:.4f}x)")
    # The meter's figures are the technique's report, byte for byte, scales included.
    assert measured["before"] == details["bf16_bytes"] == 2 * details["converted_elements"]
    assert measured["after"] == details["stored_bytes"]
    assert ratio <= MAX_RATIO_VS_BF16[fmt]


def test_deepseek_coverage_includes_fused_experts() -> None:
    model = frozen_deepseek()
    handle = ciuic.apply_(model, CiuicConfig(weights="nf4"))
    details = handle.applied[0].details
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert len(experts) == 1  # one MoE layer after the dense one
    expert_elements = sum(m.num_experts * s.numel() for m in experts for s in m.shapes.values())
    assert expert_elements > 0.3 * details["converted_elements"]
    assert details["coverage"] >= 0.95
    assert details["converted_elements"] / details["frozen_elements"] >= 0.95
    skipped = dict(handle.applied[0].skipped)
    # only the head and the input embeddings are left dense, each with a reason
    assert set(skipped) == {"lm_head", "model.embed_tokens"}
    assert "head='int8' or 'nf4'" in skipped["lm_head"]
    assert "embeddings='int8' or 'nf4'" in skipped["model.embed_tokens"]
    assert all(not is_bnb_linear(m) for m in model.model.layers[1].mlp.gate.modules())  # router untouched


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_snr_of_each_converted_tensor_and_logits_error(arch: str, fmt: str) -> None:
    model = BUILDERS[arch]()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = progressions(batch_size=2, seq_len=16)
    with torch.no_grad():
        reference = model(ids).logits
    handle = ciuic.apply_(model, CiuicConfig(weights=fmt))
    snrs = {}
    for name in handle.applied[0].changed:
        for param, dense in dense_weights(model.get_submodule(name)).items():
            snrs[f"{name}.{param}"] = snr_db(original[f"{name}.{param}"], dense)
    assert len(snrs) == handle.applied[0].details["converted_modules"] + (arch == "deepseek_v3")
    print(f"{arch} {fmt}: min SNR {min(snrs.values()):.2f} dB")
    assert min(snrs.values()) >= MIN_SNR_DB[fmt]
    with torch.no_grad():
        error = _rel(model(ids).logits, reference)
    print(f"{arch} {fmt}: logits relative L2 error {error:.4f}")
    assert error <= MAX_LOGITS_REL_ERROR[fmt]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_remove_dequantizes_back_to_the_original_dense_modules(fmt: str) -> None:
    model = frozen_deepseek()
    modules = dict(model.named_modules())
    handle = ciuic.apply_(model, CiuicConfig(weights=fmt))
    converted = {name: dense_weights(model.get_submodule(name)) for name in handle.applied[0].changed}
    ciuic.remove_(model)
    assert dict(model.named_modules()) == modules  # the very same module objects are back
    for name, tensors in converted.items():
        for param, dense in tensors.items():
            restored = model.get_submodule(name).get_parameter(param)
            assert restored.dtype == torch.bfloat16 and restored.device.type == "cpu"
            assert not restored.requires_grad
            assert torch.equal(restored, dense.to(torch.bfloat16))
    assert not hasattr(model, "is_loaded_in_4bit") and not hasattr(model, "is_loaded_in_8bit")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_state_dict_round_trip_is_bitwise(fmt: str) -> None:
    ids = progressions(batch_size=2, seq_len=16)
    source = frozen_deepseek()
    ciuic.apply_(source, CiuicConfig(weights=fmt))
    with torch.no_grad():
        expected = source(ids).logits  # after a forward: bitsandbytes has moved/repacked state
    state = source.state_dict()
    target = frozen_deepseek(seed=7)
    ciuic.apply_(target, CiuicConfig(weights=fmt))
    with torch.no_grad():
        target(ids)  # the loader must also work once a forward has run
    assert str(target.load_state_dict(state)) == "<All keys matched successfully>"
    with torch.no_grad():
        assert torch.equal(target(ids).logits, expected)


def test_peft_flags_are_set_and_restored() -> None:
    model = frozen_deepseek()
    ciuic.apply_(model, CiuicConfig(weights="nf4"))
    assert model.is_loaded_in_4bit is True and model.model.is_loaded_in_4bit is True
    assert not getattr(model, "is_loaded_in_8bit", False)
    ciuic.remove_(model)
    ciuic.apply_(model, CiuicConfig(weights="int8"))
    assert model.is_loaded_in_8bit is True and not getattr(model, "is_loaded_in_4bit", False)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_memory_meter_tracking_a_converted_model_counts_the_bitsandbytes_scales(fmt: str) -> None:
    """``MemoryMeter.track(model)`` counts ``parameters()``, ``buffers()`` and the tensors
    bitsandbytes keeps as plain attributes: the 4-bit ``quant_state`` (absmax, code) and
    LLM.int8's ``SCB``. A model converted before the meter then measures what it stores."""
    from ciuic import MemoryMeter
    from ciuic.weights.linear import linear_storage_bytes

    model = frozen_deepseek()
    ciuic.apply_(model, CiuicConfig(weights=fmt))
    with MemoryMeter(track=(model,), device="cpu") as meter:
        pass
    layers = [m for m in model.modules() if is_bnb_linear(m)]
    packed = sum(m.weight.untyped_storage().nbytes() for m in layers)
    scales = sum(linear_storage_bytes(m) for m in layers) - packed
    every_tensor = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    assert scales > 0
    assert meter.current_bytes == sum(every_tensor.values()) + scales
