"""LoRA fine-tuning of a DeepSeek model with PyTorch Lightning and Ciuic.

The Lightning job is an ordinary one (``LoraDeepSeek``, ``TextData``); Ciuic is one argument:
``Trainer(strategy=CiuicStrategy("balanced"))``. By default it runs offline in well under a
minute on a CPU: a small DeepSeek-V3-architecture model built in memory and generated data
(arithmetic progressions it visibly learns).

    python examples/lightning_lora_deepseek.py                        # tiny model, generated data
    python examples/lightning_lora_deepseek.py --preset max --steps 300
    python examples/lightning_lora_deepseek.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --data train.jsonl --accelerator gpu --precision bf16-true
    python examples/lightning_lora_deepseek.py fit --config examples/lightning_cli.yaml   # LightningCLI

``--model`` is a local path or a hub id (loaded with transformers), ``--data`` a local ``.txt``
(one example per line) or ``.jsonl`` (a ``"text"`` field per line) file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import ciuic
import ciuic_lightning
from ciuic.demo import progression_batches, tiny_deepseek_v3

VOCAB = 64
CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LoraDeepSeek(pl.LightningModule):
    """A causal LM with PEFT LoRA adapters; ``training_step`` calls ``self.model(...)``.

    Args:
        model: A local path or hub id, or ``None`` for the tiny offline DeepSeek-V3.
        rank: LoRA rank.
        lr: AdamW learning rate.
    """

    def __init__(self, model: str | None = None, rank: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = _with_lora(_load(model), rank)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


class TextData(pl.LightningDataModule):
    """Token batches: generated progressions, or a local text/JSONL file tokenized for ``model``.

    Args:
        data: A ``.txt`` or ``.jsonl`` file, or ``None`` for generated data.
        model: The tokenizer's path or hub id (needed with ``data``).
        batch_size: Sequences per batch.
        seq_len: Tokens per sequence.
        samples: Generated sequences (without ``data``).
    """

    def __init__(
        self,
        data: str | None = None,
        model: str | None = None,
        batch_size: int = 8,
        seq_len: int = 32,
        samples: int = 2048,
    ) -> None:
        super().__init__()
        self.data, self.model = data, model
        self.batch_size, self.seq_len, self.samples = batch_size, seq_len, samples

    def train_dataloader(self) -> DataLoader:
        tokens = self._file_tokens() if self.data else self._generated()
        return DataLoader(TensorDataset(tokens), batch_size=self.batch_size, shuffle=True)

    def _generated(self) -> torch.Tensor:
        batches = progression_batches(batch_size=self.samples, seq_len=self.seq_len, vocab_size=VOCAB)
        return next(batches)

    def _file_tokens(self) -> torch.Tensor:
        from transformers import AutoTokenizer

        if self.model is None:
            raise ValueError("--data needs --model: the tokenizer comes from the model.")
        tokenizer = AutoTokenizer.from_pretrained(self.model)
        ids = tokenizer("\n\n".join(_texts(Path(str(self.data)))))["input_ids"]
        usable = len(ids) // self.seq_len * self.seq_len
        if usable == 0:
            raise ValueError(f"--data {self.data} has fewer than seq_len={self.seq_len} tokens.")
        return torch.tensor(ids[:usable]).view(-1, self.seq_len)


def _texts(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in lines]
    return lines


def _load(model: str | None) -> torch.nn.Module:
    if model is None:
        return tiny_deepseek_v3(vocab_size=VOCAB)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16)


def _with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # attention, MLPs and the fused routed experts, found by inspecting the model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, **ciuic.lora_targets(model)))


def cli(args: list[str] | None = None) -> Any:
    """The same job under ``LightningCLI`` (``fit --config examples/lightning_cli.yaml``)."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(LoraDeepSeek, TextData, args=args, save_config_kwargs={"overwrite": True})


def main(argv: list[str] | None = None) -> pl.Trainer:
    """Train with ``Trainer(strategy=CiuicStrategy(preset))``; returns the Trainer."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="local path or hub id (default: tiny offline DeepSeek-V3)")
    parser.add_argument("--data", help="local .txt or .jsonl file (default: generated data)")
    parser.add_argument("--preset", default="balanced", help="Ciuic preset: off, balanced, max")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--root", default="lightning_logs_ciuic", help="Trainer default_root_dir")
    options = parser.parse_args(argv)
    if options.model is None and options.accelerator == "cpu":
        torch.set_num_threads(1)  # the tiny model's ops are too small to gain from more threads
    trainer = pl.Trainer(
        strategy=ciuic_lightning.CiuicStrategy(options.preset),  # the one-line change
        callbacks=[ciuic_lightning.CiuicCallback()],
        accelerator=options.accelerator,
        devices=1,
        precision=options.precision,
        max_steps=options.steps,
        default_root_dir=options.root,
        logger=False,
        enable_checkpointing=False,
    )
    data = TextData(options.data, options.model)
    trainer.fit(LoraDeepSeek(options.model), data)
    return trainer


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CLI_SUBCOMMANDS:
        cli()
    else:
        main()
