"""A Lightning LoRA job on the tiny DeepSeek-V3, as a user would write it (no Ciuic inside)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.models import deepseek_v3, lora, progressions

VOCAB = 64

ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
"""LoRA targets without the MLPs (PEFT then leaves the fused experts alone)."""


class LoraModule(pl.LightningModule):
    """LoRA fine-tuning of a causal LM; ``training_step`` calls ``self.model(...)``."""

    def __init__(
        self, lr: float = 1e-2, seed: int = 0, schedule: bool = False, targets: tuple[str, ...] | None = None
    ) -> None:
        super().__init__()
        self.lr = lr
        self.schedule = schedule
        model = deepseek_v3(vocab_size=VOCAB, seed=seed)
        self.model = lora(model) if targets is None else lora(model, targets=targets)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if not self.schedule:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.05 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader(samples: int, *, batch_size: int = 4, seq_len: int = 32, seed: int = 0) -> DataLoader:
    """``samples`` progressions in fixed order (no shuffling: runs are comparable step by step)."""
    tokens = progressions(batch_size=samples, seq_len=seq_len, vocab_size=VOCAB, seed=seed)
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer; ``kwargs`` override."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(**options)
