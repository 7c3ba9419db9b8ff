"""``ciuic plan`` on the command line."""

from __future__ import annotations

import json

import pytest

from ciuic.cli import build_parser, main
from ciuic.planner.shapes import shape_data


def test_plan_arguments_parse() -> None:
    args = build_parser().parse_args(
        [
            "plan",
            "--model",
            "deepseek-r1-distill-qwen-7b",
            "--seq",
            "4096",
            "--lora-rank",
            "16",
            "--budget",
            "8GiB",
        ]
    )
    assert (args.model, args.seq, args.batch, args.lora_rank, args.budget, args.json) == (
        "deepseek-r1-distill-qwen-7b",
        4096,
        1,
        16,
        "8GiB",
        False,
    )


def test_plan_json_on_a_local_config(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = shape_data("deepseek-r1-distill-qwen-1.5b")
    data.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    (tmp_path / "config.json").write_text(json.dumps(data))
    status = main(
        ["plan", "--model", str(tmp_path), "--seq", "32", "--lora-rank", "4", "--budget", "2GiB", "--json"]
    )
    out, err = capsys.readouterr()
    assert status == 0
    result = json.loads(out)
    assert result["fits"] is True
    assert set(result) >= {"fits", "config", "predicted_peak_bytes", "breakdown", "candidates"}
    assert "ciuic plan: priced 1:" in err  # plain progress lines: stderr is no terminal here


def test_plan_bad_budget_is_one_error_line(capsys) -> None:  # type: ignore[no-untyped-def]
    status = main(["plan", "--model", "deepseek-r1-distill-qwen-7b", "--seq", "8", "--budget", "lots"])
    assert status == 2
    assert capsys.readouterr().err.startswith("ciuic plan: error: budget=")


@pytest.mark.slow
def test_acceptance_qwen_7b_in_8gib(capsys) -> None:  # type: ignore[no-untyped-def]
    """Issue #14: the 7B at 4,096 tokens in 8 GiB, a config of predicted peak <= 6.5 GiB (the
    search takes about 80 s on an idle 2-core CPU: the ``seconds`` of the JSON, not asserted)."""
    status = main(
        [
            "plan",
            "--model",
            "deepseek-r1-distill-qwen-7b",
            "--seq",
            "4096",
            "--batch",
            "1",
            "--lora-rank",
            "16",
            "--budget",
            "8GiB",
            "--json",
            "--no-progress",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["fits"]
    assert result["predicted_peak_bytes"] <= 6.5 * 2**30
    assert result["precision"] == "mixed"


@pytest.mark.slow
def test_acceptance_llama_8b_16k_in_24gib(capsys) -> None:  # type: ignore[no-untyped-def]
    status = main(
        [
            "plan",
            "--model",
            "deepseek-r1-distill-llama-8b",
            "--seq",
            "16384",
            "--batch",
            "1",
            "--lora-rank",
            "16",
            "--budget",
            "24GiB",
            "--json",
            "--no-progress",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["fits"]
    assert result["predicted_peak_bytes"] <= 24 * 2**30
