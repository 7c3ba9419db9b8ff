"""What ``tests/hf/test_torchrun.py`` launches with ``torchrun --nproc_per_node 2``: the test
script's ``Trainer`` with ``CiuicCallback("balanced")`` under DDP on CPU (gloo). Each rank writes
what it applied and trained to ``<output_dir>/rank-<n>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import ciuic
from ciuic.errors import ConfigError
from ciuic_hf import CiuicCallback
from tests.hf.common import build, losses


def main(output_dir: Path) -> None:
    torch.set_num_threads(1)
    trainer = build(output_dir, [CiuicCallback("balanced")], max_steps=3, logging_steps=1, ddp_backend="gloo")
    trainer.train()
    rank = trainer.args.process_index
    handle = ciuic.handle_of(trainer.model)
    report = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "config": handle.config.to_dict() if handle is not None else None,
        "applied": [record.technique for record in handle.applied] if handle is not None else [],
        "wrapped": type(trainer.model_wrapped).__name__,
        "optimizer": type(trainer.optimizer.optimizer).__name__,
        "losses": losses(trainer),
        "lora_sum": float(
            sum(p.detach().double().sum() for p in trainer.model.parameters() if p.requires_grad)
        ),
    }
    report["refused"] = _refused_step_in_backward(output_dir / "refused")
    (output_dir / f"rank-{rank}.json").write_text(json.dumps(report))


def _refused_step_in_backward(output_dir: Path) -> str:
    """The error ``CiuicCallback("max")`` (step in backward) gives with 2 processes."""
    try:
        build(output_dir, [CiuicCallback("max")], max_grad_norm=0.0, ddp_backend="gloo")
    except ConfigError as error:
        return str(error)
    return ""


if __name__ == "__main__":
    main(Path(sys.argv[1]))
