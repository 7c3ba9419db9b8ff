"""LoRA fine-tuning of a DeepSeek model with the Hugging Face ``Trainer`` and ``CiuicCallback``.

The script is an ordinary ``Trainer`` + PEFT LoRA script; the ciuic part is one argument,
``callbacks=[CiuicCallback(config)]``. By default it runs offline in well under a minute on a CPU:
a small DeepSeek-V3-architecture model built from scratch, learning generated arithmetic
progressions. For real use::

    python examples/hf_lora_deepseek.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
        --data train.jsonl --preset balanced --steps 1000 --bf16

``--model`` is a hub id or a local folder (with its tokenizer); ``--data`` a local ``.txt`` (one
example per line) or ``.jsonl`` (a ``"text"`` field per line) file, cut into ``--seq-len`` token
blocks. ``--config ciuic.yaml`` takes the fields from a file (``ciuic config --preset max``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

import ciuic
from ciuic.demo import progression_batches, tiny_deepseek_v3
from ciuic_hf import CiuicCallback


class Blocks(torch.utils.data.Dataset):
    """Rows of token ids as the ``Trainer`` takes them (the labels are the inputs: causal LM)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or local folder (default: a tiny DeepSeek-V3 built offline)")
    parser.add_argument(
        "--data", type=Path, help="local .txt or .jsonl file (default: generated progressions)"
    )
    parser.add_argument("--preset", default="balanced", choices=ciuic.CiuicConfig.PRESETS)
    parser.add_argument("--config", type=Path, help="a ciuic config file (.yaml/.json); replaces --preset")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--memory", default="auto", help="CiuicCallback(memory=...): auto, peak, meter, off")
    parser.add_argument("--output-dir", type=Path, help="checkpoints and logs (default: a temporary folder)")
    return parser.parse_args(argv)


def load_model(name: str | None) -> tuple[torch.nn.Module, Any]:
    """The model and its tokenizer (``None`` for the offline tiny model)."""
    if name is None:
        return tiny_deepseek_v3(), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # attention, MLPs and the fused routed experts, found by inspecting the model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, **ciuic.lora_targets(model)))


def load_data(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> Blocks:
    """``--data`` cut into blocks of ``--seq-len`` tokens, or the generated progressions."""
    rows = args.steps * args.batch_size * args.accumulation
    if args.data is None:
        batches = progression_batches(batch_size=rows, seq_len=args.seq_len, vocab_size=vocab_size)
        return Blocks(next(batches))
    lines = args.data.read_text(encoding="utf-8").splitlines()
    if args.data.suffix == ".jsonl":
        lines = [json.loads(line)["text"] for line in lines if line.strip()]
    if tokenizer is None:  # the tiny model has no tokenizer: its bytes, folded into its vocabulary
        ids = [b % vocab_size for line in lines for b in (line + "\n").encode()]
    else:
        ids = [i for line in lines for i in tokenizer(line + "\n")["input_ids"]]
    blocks = len(ids) // args.seq_len
    if blocks == 0:
        raise SystemExit(f"--data {args.data} has {len(ids)} tokens, fewer than --seq-len {args.seq_len}.")
    return Blocks(torch.tensor(ids[: blocks * args.seq_len]).view(blocks, args.seq_len))


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = parse(argv)
    if args.model is None and not torch.cuda.is_available():
        torch.set_num_threads(1)  # the tiny model gains nothing from threads, and loses a lot on a busy CPU
    config = (
        ciuic.CiuicConfig.from_file(args.config) if args.config else ciuic.CiuicConfig.preset(args.preset)
    )
    model, tokenizer = load_model(args.model)
    model = add_lora(model, args.lora_rank)
    data = load_data(args, tokenizer, model.config.vocab_size)
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="ciuic-hf-"))
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=args.lr,
        bf16=args.bf16,
        # A step in backward frees each gradient before the Trainer could clip them all.
        max_grad_norm=0.0 if config.step_in_backward else 1.0,
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        callbacks=[CiuicCallback(config, memory=args.memory)],  # the one line ciuic adds
    )
    trainer.train()
    print(ciuic.handle_of(trainer.model).report())
    return trainer


if __name__ == "__main__":
    main()
