"""The ``ciuic`` command.

``ciuic demo`` runs the main job (LoRA fine-tuning of a small DeepSeek-V3-architecture model,
built offline) under a preset or a config file and prints the memory table of the run;
``ciuic config`` prints a preset as a YAML/JSON file to start from; ``ciuic plan`` finds the
cheapest config whose priced peak fits a budget (``ciuic.plan``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from .config import FIELDS, CiuicConfig
from .errors import CiuicError


def _fields_help() -> str:
    lines = ["config fields (YAML/JSON keys, or CiuicConfig keywords):"]
    for spec in FIELDS.values():
        lines.append(f"  {spec.name:<17} {spec.doc}")
        lines.append(f"  {'':<17} allowed: {spec.allowed}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ciuic`` command (exposed for tests and docs)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ciuic",
        description="Make DeepSeek fine-tuning fit in GPU memory by configuration.",
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ciuic {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="LoRA fine-tune a small DeepSeek-V3 model built offline and print its memory table",
        description="LoRA fine-tuning of a small DeepSeek-V3-architecture model (MLA attention, MoE "
        "layers) built offline, on generated data it visibly learns, in a plain PyTorch loop; "
        "ends with the MemoryMeter table of the whole run.",
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_source(demo)
    demo.add_argument("--steps", type=_positive_int, default=200, help="training steps (default: 200)")
    demo.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step (default: 8)")
    demo.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per sequence (default: 64)")
    demo.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: 1e-2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of model and data (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    config = commands.add_parser(
        "config",
        help="print a config file (from a preset) to start from",
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_source(config)
    config.add_argument(
        "--format", choices=("yaml", "json"), default="yaml", help="output format (default: yaml)"
    )
    _add_plan(commands)
    return parser


def _add_plan(commands: argparse._SubParsersAction) -> None:
    from .planner import SHAPES

    plan = commands.add_parser(
        "plan",
        help="find the cheapest config whose priced peak fits a memory budget",
        description="Prices candidate configs by running the training step of the full-size model "
        "on fake tensors (no GPU, no memory) and prints each one's peak by category, whether it "
        "fits the budget less the margin for what a fake step cannot see (CUDA context, allocator "
        "fragmentation, NCCL buffers), and its expected slowdown (a cost model calibrated on the "
        "bench scripts).",
        epilog="shipped shapes: " + ", ".join(SHAPES),
    )
    plan.add_argument("--model", required=True, help="a shipped shape name, or a config.json path or folder")
    plan.add_argument("--seq", type=_positive_int, required=True, help="tokens per sample")
    plan.add_argument("--batch", type=_positive_int, default=1, help="samples per step (default: 1)")
    plan.add_argument(
        "--lora-rank", type=int, default=16, help="LoRA rank; 0: full fine-tuning (default: 16)"
    )
    plan.add_argument("--budget", required=True, help="accelerator memory, e.g. 8GiB or 24GB")
    plan.add_argument(
        "--precision",
        choices=("mixed", "true"),
        default="mixed",
        help="mixed: the forward under autocast in the model's 16-bit dtype (HF bf16=True, Lightning "
        "bf16-mixed); true: no autocast (default: mixed)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan.add_argument("--no-progress", action="store_true", help="hide the progress output")


def _add_config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=CiuicConfig.PRESETS, default="off", help="named config (default: off)"
    )
    source.add_argument("--config", metavar="FILE", help="a .yaml/.yml/.json config file instead of a preset")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give an integer >= 1")
    return value


def _load_config(args: argparse.Namespace) -> CiuicConfig:
    if args.config:
        return CiuicConfig.from_file(args.config)
    return CiuicConfig.preset(args.preset)


def _run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    config = _load_config(args)
    # Third-party chatter that a demo user cannot act on; ciuic's own warnings stay visible.
    warnings.filterwarnings("ignore", module=r"peft(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", message="ciuic.apply_:")  # the report below lists the skips
    result = run_demo(
        config,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(result.summary())


def _print_config(args: argparse.Namespace) -> None:
    config = _load_config(args)
    if args.format == "json":
        print(json.dumps(config.to_dict(), indent=2))
    else:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")


def _run_plan(args: argparse.Namespace) -> None:
    from .planner import plan
    from .planner.progress import PlanProgress

    warnings.filterwarnings("ignore", module=r"peft(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", message="ciuic.apply_:")  # the table says what each config does
    with PlanProgress(sys.stderr, enabled=not args.no_progress) as progress:
        result = plan(
            args.model,
            seq_len=args.seq,
            batch=args.batch,
            budget=args.budget,
            lora=args.lora_rank or None,
            precision=args.precision,
            progress=progress,
        )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ciuic`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            _run_demo(args)
        elif args.command == "plan":
            _run_plan(args)
        else:
            _print_config(args)
    except (CiuicError, OSError) as error:
        print(f"ciuic {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
