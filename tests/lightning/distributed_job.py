"""A 2-process Lightning job on CPU (gloo), run by tests/lightning/test_distributed.py.

``python -m tests.lightning.distributed_job STRATEGY PRESET STEPS OUT``: Lightning's launcher
starts the second rank by running this same command; each rank writes ``OUT/rank<r>.json``
with its losses, the config applied on it and a digest of its trainable parameters. Every
rank reads the same batches (no distributed sampler), so equal configs give equal losses.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import StrategyRegistry

import ciuic
import ciuic_lightning  # noqa: F401  (registers strategy="ciuic_ddp", "ciuic_fsdp")
from tests.lightning.helpers import ATTENTION, LoraModule, loader, trainer


def _digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(strategy: str, preset: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    # Under FSDP, LoRA on the attention only: PEFT's LoRA of the fused MoE experts (a
    # parametrization of their 3-D weights) fails on the views FSDP1 makes of flat parameters.
    module = LoraModule(targets=ATTENTION if "fsdp" in strategy else None)
    strategy_class = StrategyRegistry[strategy]["strategy"]
    run = trainer(
        out, strategy=strategy_class(preset), devices=2, max_steps=steps, use_distributed_sampler=False
    )
    run.fit(module, loader(2 * steps, batch_size=2, seq_len=16))
    handle = ciuic.handle_of(module)
    record = {
        "rank": run.global_rank,
        "world_size": run.world_size,
        "strategy": type(run.strategy).__name__,
        "config": None if handle is None else handle.config.to_dict(),
        "losses": module.losses,
        "params": _digest(module),
        "optimizer": type(run.optimizers[0]).__name__,
    }
    Path(out, f"rank{run.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
