"""The example script and the LightningCLI YAML run (a few steps, offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import ciuic
from ciuic import ConfigError
from ciuic_lightning import CiuicStrategy
from tests.models import assert_moe_lora_quantized

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "lightning_lora_deepseek", EXAMPLES / "lightning_lora_deepseek.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(EXAMPLES / "lightning_cli.yaml"),
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.samples=16",
        *extra,
    ]


def test_yaml_adds_only_the_strategy_block() -> None:
    job = yaml.safe_load((EXAMPLES / "lightning_cli.yaml").read_text())
    assert job["trainer"]["strategy"] == {
        "class_path": "ciuic_lightning.CiuicStrategy",
        "init_args": {"config": "balanced"},
    }


def test_lightning_cli_yaml_runs(tmp_path: Path) -> None:
    cli = _example().cli(_cli_args(tmp_path, "--trainer.strategy.init_args.activations=int4"))
    assert isinstance(cli.trainer.strategy, CiuicStrategy)
    assert cli.trainer.global_step == 2
    expected = ciuic.CiuicConfig.preset("balanced", activations="int4")
    handle = ciuic.handle_of(cli.model)
    assert handle is not None and handle.config == expected
    assert_moe_lora_quantized(cli.model)


def test_lightning_cli_bad_value_is_core_error_before_the_first_step(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as core:
        ciuic.CiuicConfig(weights="nf5")
    # jsonargparse reports why each type of Trainer(strategy=...) refused the value: core's
    # message, whole, is the reason given for CiuicStrategy. Nothing was trained.
    with pytest.raises(ValueError) as error:
        _example().cli(_cli_args(tmp_path, "--trainer.strategy.init_args.weights=nf5"))
    assert str(core.value) in str(error.value)


def test_example_script_runs_offline(tmp_path: Path) -> None:
    trainer = _example().main(["--steps", "3", "--root", str(tmp_path)])
    assert trainer.global_step == 3
    assert isinstance(trainer.strategy, CiuicStrategy)
    assert trainer.strategy.ciuic_config == ciuic.CiuicConfig.preset("balanced")
