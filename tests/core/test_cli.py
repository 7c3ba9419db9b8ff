import json
import subprocess
import sys

import pytest
import yaml

import ciuic
from ciuic import CiuicConfig
from ciuic.cli import main
from ciuic.config import FIELDS


def test_version_and_help_through_the_installed_command():
    version = subprocess.run(["ciuic", "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"ciuic {ciuic.__version__}"
    helptext = subprocess.run(
        [sys.executable, "-m", "ciuic.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in helptext
    for spec in FIELDS.values():
        assert spec.name in helptext


@pytest.mark.parametrize("preset", CiuicConfig.PRESETS)
def test_config_command_prints_a_loadable_preset(preset, capsys, tmp_path):
    assert main(["config", "--preset", preset]) == 0
    assert CiuicConfig.from_dict(yaml.safe_load(capsys.readouterr().out)) == CiuicConfig.preset(preset)
    assert main(["config", "--preset", preset, "--format", "json"]) == 0
    assert CiuicConfig.from_dict(json.loads(capsys.readouterr().out)) == CiuicConfig.preset(preset)


def test_bad_config_file_is_a_clean_error(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weights: nf5\n")
    assert main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "weights='nf5' is not allowed. Allowed: 'none', 'int8', 'nf4', 'fp4', or a mapping" in err
    assert main(["demo", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["demo", "--steps", "0"])
    assert caught.value.code == 2
    assert "--steps: 0 is not allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--preset", "fastest"])


def test_demo_command_runs_and_prints_the_memory_table(capsys, tmp_path):
    path = tmp_path / "c.json"
    CiuicConfig().to_file(path)
    assert main(["demo", "--config", str(path), "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "memory at the peak on cpu" in out
    assert "3 steps" in out


def test_malformed_config_file_is_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text("weights: nf4\nactivations: [int8\n")
    run = subprocess.run(
        [sys.executable, "-m", "ciuic.cli", "demo", "--config", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "is not valid YAML" in lines[0] and "line 3, column 1" in lines[0]
