"""The fine-tuning script the tests run, plain or with ``CiuicCallback``: the real
``transformers.Trainer`` on CPU, PEFT LoRA on the tiny DeepSeek-V3, generated progressions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import ciuic
from tests.models import deepseek_v3, lora, progressions

BATCH = 4
LR = 1e-2
"""The scripts' AdamW learning rate (the peak of the default linear schedule)."""
SEQ = 32


class Progressions(torch.utils.data.Dataset):
    """``count`` rows of the learnable progressions task, as the ``Trainer`` takes them."""

    def __init__(self, count: int, *, seq_len: int = SEQ, seed: int = 0) -> None:
        self.ids = progressions(batch_size=count, seq_len=seq_len, seed=seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def arguments(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """The script's ``TrainingArguments`` (CPU, no loggers, fixed seed, a log every 10 steps)."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": BATCH,
        "learning_rate": LR,
        "max_steps": 10,
        "logging_steps": 10,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def build(
    output_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    *,
    trainer_class: type[Trainer] = Trainer,
    samples: int | None = None,
    seq_len: int = SEQ,
    trainer_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> Trainer:
    """The script up to ``train()``: model, data, arguments, ``Trainer``."""
    args = arguments(output_dir, **overrides)
    count = samples or args.max_steps * BATCH * args.gradient_accumulation_steps
    return trainer_class(
        model=lora(deepseek_v3()),
        args=args,
        train_dataset=Progressions(count, seq_len=seq_len),
        callbacks=list(callbacks),
        **(trainer_kwargs or {}),
    )


def losses(trainer: Trainer) -> list[float]:
    """The logged training losses, in order."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def measured_train(trainer: Trainer, **train_kwargs: Any) -> ciuic.MemoryReading:
    """``trainer.train()`` inside a ``MemoryMeter`` (the model built before it is tracked)."""
    with ciuic.MemoryMeter(device="cpu", track=(trainer.model,)) as meter:
        trainer.train(**train_kwargs)
    return meter.reading()


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained (LoRA) parameters, detached copies."""
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
