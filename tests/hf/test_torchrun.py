"""The same script under ``torchrun --nproc_per_node 2`` on CPU (gloo): it completes, and every
rank applied the config, built the config's optimizer and ended with the same LoRA weights; a
config stepping in backward is refused there (DDP averages gradients after that step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ciuic

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def test_two_processes_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "hf" / "torchrun_script.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    balanced = ciuic.CiuicConfig.preset("balanced").to_dict()
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"]) == (rank, 2)
        assert report["config"] == balanced
        assert {"weights", "activations", "loss"} <= set(report["applied"])
        assert report["wrapped"] == "DistributedDataParallel"
        assert report["optimizer"] == "CiuicAdamW"
        assert len(report["losses"]) == 3
        assert report["refused"].startswith("CiuicConfig(step_in_backward=True) cannot work with 2 processes")
    assert reports[0]["lora_sum"] == reports[1]["lora_sum"]  # DDP kept the replicas equal
