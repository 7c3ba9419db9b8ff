"""``examples/hf_lora_deepseek.py`` runs offline by default and with ``--data`` (a few steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import ciuic
from tests.models import assert_moe_lora_quantized

ROOT = Path(__file__).resolve().parents[2]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "hf_lora_deepseek", ROOT / "examples" / "hf_lora_deepseek.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_run(tmp_path: Path) -> None:
    trainer = _example().main(["--steps", "3", "--output-dir", str(tmp_path)])
    assert trainer.state.global_step == 3
    assert ciuic.handle_of(trainer.model).config == ciuic.CiuicConfig.preset("balanced")
    assert_moe_lora_quantized(trainer.model)


def test_jsonl_data_and_max(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"{n} + {n} = {2 * n}"}) for n in range(40)))
    argv = [
        "--data",
        str(data),
        "--preset",
        "max",
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--output-dir",
        str(tmp_path),
    ]
    trainer = _example().main(argv)
    assert trainer.state.global_step == 2
    assert type(trainer.optimizer.optimizer).__name__ == "CiuicAdamW"
