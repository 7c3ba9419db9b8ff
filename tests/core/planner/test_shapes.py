"""The shipped shapes: real architecture numbers, parameter counts of the public models."""

from __future__ import annotations

import json

import pytest

from ciuic.errors import ConfigError
from ciuic.planner import SHAPES, count_parameters, empty_model, load_shape

# Published sizes (hub model cards, billions of parameters) and the count within 0.5%.
PUBLISHED = {
    "deepseek-r1-distill-qwen-1.5b": 1.78,
    "deepseek-r1-distill-qwen-7b": 7.62,
    "deepseek-r1-distill-qwen-14b": 14.8,
    "deepseek-r1-distill-qwen-32b": 32.8,
    "deepseek-r1-distill-llama-8b": 8.03,
    "deepseek-r1-distill-llama-70b": 70.6,
    "deepseek-v2-lite": 15.7,
    "deepseek-v3": 671.0,
    "deepseek-coder-6.7b": 6.74,
}

# hidden, layers, heads, kv heads, intermediate, vocab
ARCHITECTURE = {
    "deepseek-r1-distill-qwen-1.5b": (1536, 28, 12, 2, 8960, 151936),
    "deepseek-r1-distill-qwen-7b": (3584, 28, 28, 4, 18944, 152064),
    "deepseek-r1-distill-qwen-14b": (5120, 48, 40, 8, 13824, 152064),
    "deepseek-r1-distill-qwen-32b": (5120, 64, 40, 8, 27648, 152064),
    "deepseek-r1-distill-llama-8b": (4096, 32, 32, 8, 14336, 128256),
    "deepseek-r1-distill-llama-70b": (8192, 80, 64, 8, 28672, 128256),
    "deepseek-v2-lite": (2048, 27, 16, 16, 10944, 102400),
    "deepseek-v3": (7168, 61, 128, 128, 18432, 129280),
    "deepseek-coder-6.7b": (4096, 32, 32, 32, 11008, 32256),
}


@pytest.mark.parametrize("name", SHAPES)
def test_parameter_count_matches_the_published_size(name: str) -> None:
    count = count_parameters(empty_model(name))
    assert count == pytest.approx(PUBLISHED[name] * 1e9, rel=0.005)


def test_exact_counts_of_the_acceptance_shapes() -> None:
    assert count_parameters(empty_model("deepseek-r1-distill-qwen-7b")) == 7_615_616_512
    assert count_parameters(empty_model("deepseek-r1-distill-llama-8b")) == 8_030_261_248


@pytest.mark.parametrize("name", SHAPES)
def test_architecture_numbers(name: str) -> None:
    c = load_shape(name)
    got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert (*got, c.intermediate_size, c.vocab_size) == ARCHITECTURE[name]
    assert c.tie_word_embeddings is False


def test_moe_fields() -> None:
    lite, v3 = load_shape("deepseek-v2-lite"), load_shape("deepseek-v3")
    assert (lite.n_routed_experts, lite.num_experts_per_tok, lite.moe_intermediate_size) == (64, 6, 1408)
    assert (lite.n_shared_experts, lite.first_k_dense_replace, lite.q_lora_rank, lite.kv_lora_rank) == (
        2,
        1,
        None,
        512,
    )
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.moe_intermediate_size) == (256, 8, 2048)
    assert (v3.n_shared_experts, v3.first_k_dense_replace, v3.q_lora_rank, v3.kv_lora_rank) == (
        1,
        3,
        1536,
        512,
    )
    assert (v3.n_group, v3.topk_group, v3.routed_scaling_factor) == (8, 4, 2.5)


def test_meta_build_has_no_storage() -> None:
    model = empty_model("deepseek-v3")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_local_config_file_or_folder_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ciuic.planner.shapes import shape_data

    (tmp_path / "config.json").write_text(json.dumps(shape_data("deepseek-r1-distill-qwen-1.5b")))
    assert load_shape(tmp_path).hidden_size == 1536
    assert load_shape(tmp_path / "config.json").hidden_size == 1536
    assert load_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B").hidden_size == 1536


def test_unknown_model_names_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="deepseek-r1-distill-qwen-7b"):
        load_shape("qwen-9b")


def test_shapes_are_package_data() -> None:
    from pathlib import Path  # the package data is declared in setup.py

    setup = (Path(__file__).parents[3] / "setup.py").read_text()
    assert '"ciuic.planner": ["shapes/*.json"]' in setup
