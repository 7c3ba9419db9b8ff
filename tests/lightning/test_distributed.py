"""2-process DDP and FSDP runs on CPU (gloo) with the same Ciuic config on every rank.

Lightning launches the second rank by re-running the command, so each run is
``tests/lightning/distributed_job.py`` in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ciuic

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _run(strategy: str, preset: str, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "tests.lightning.distributed_job",
        strategy,
        preset,
        str(STEPS),
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize(
    ("strategy", "class_name"), [("ciuic_ddp", "CiuicDDPStrategy"), ("ciuic_fsdp", "CiuicFSDPStrategy")]
)
def test_two_ranks_apply_the_config_and_agree(tmp_path: Path, strategy: str, class_name: str) -> None:
    ranks = _run(strategy, "balanced", tmp_path)
    expected = ciuic.CiuicConfig.preset("balanced").to_dict()
    for rank, record in enumerate(ranks):
        assert (record["rank"], record["world_size"], record["strategy"]) == (rank, 2, class_name)
        assert record["config"] == expected  # applied on this rank
        assert record["optimizer"] == "CiuicAdamW"
        assert len(record["losses"]) == STEPS
    # Every rank reads the same batches: equal configs and synchronized gradients give equal losses.
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
    if strategy == "ciuic_ddp":  # FSDP ranks each hold their own shard
        assert ranks[0]["params"] == ranks[1]["params"]
