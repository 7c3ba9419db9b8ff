"""Model shapes that ship with Ciuic, and full-size models built from them without memory.

A *shape* is a Hugging Face ``config.json`` (architecture only, no weights). The package ships
the public configs of the DeepSeek models Ciuic targets (:data:`SHAPES`), so that
``ciuic plan --model deepseek-r1-distill-qwen-7b`` works offline; any local ``config.json``, a
folder holding one, or a loaded transformers config works too. :func:`empty_model` builds the
full-size model on the ``meta`` device: its parameters have shapes and dtypes but no storage,
and no random initialization runs (a meta tensor's init is a no-op), so even DeepSeek-V3
(671B parameters) builds in a second.

Example:
    >>> from ciuic.planner.shapes import load_shape, empty_model, count_parameters
    >>> config = load_shape("deepseek-r1-distill-qwen-7b")
    >>> config.hidden_size, config.num_hidden_layers
    (3584, 28)
    >>> round(count_parameters(empty_model(config)) / 1e9, 2)
    7.62
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciuic.errors import ConfigError

SHAPES = (
    "deepseek-r1-distill-qwen-1.5b",
    "deepseek-r1-distill-qwen-7b",
    "deepseek-r1-distill-qwen-14b",
    "deepseek-r1-distill-qwen-32b",
    "deepseek-r1-distill-llama-8b",
    "deepseek-r1-distill-llama-70b",
    "deepseek-v2-lite",
    "deepseek-v3",
    "deepseek-coder-6.7b",
)
"""The shipped shapes (``core/planner/shapes/<name>.json``), by their lower-case hub name."""


def shape_data(source: str | Path) -> dict[str, Any]:
    """The ``config.json`` content of a shipped name, a ``config.json`` path or a folder.

    Names match case-insensitively and may carry the hub owner (``deepseek-ai/...``).

    Raises:
        ConfigError: ``source`` is neither a shipped name nor a readable config file.
    """
    name = str(source).lower().removeprefix("deepseek-ai/")
    if name in SHAPES:
        text = resources.files("ciuic.planner").joinpath(f"shapes/{name}.json").read_text()
        return dict(json.loads(text))
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model={str(source)!r} is neither a shipped shape nor a config.json file or folder. "
            f"Allowed: {', '.join(SHAPES)}, or the path of a transformers config.json (or its folder)."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"model={str(source)!r}: {path} is not a readable JSON config ({error}).") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(
            f"model={str(source)!r}: {path} has no 'model_type': is it a transformers config.json?"
        )
    return data


def load_shape(source: Any) -> Any:
    """A transformers ``PretrainedConfig`` from a shipped name, a path, or a config itself."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    data = shape_data(source)
    model_type = data.pop("model_type")
    data.pop("auto_map", None)  # remote code is never run: the transformers class of model_type is used
    data.pop("quantization_config", None)  # a checkpoint's storage format, not the architecture
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as error:
        raise ConfigError(
            f"model={str(source)!r}: transformers cannot build model_type={model_type!r} ({error})."
        ) from None


def empty_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device, without initialization.

    Args:
        config: A transformers config, a shipped shape name or a ``config.json`` path.
        dtype: The parameters' dtype (default: the config's, bf16 for the shipped shapes).
    """
    from transformers import AutoModelForCausalLM

    shape = load_shape(config)
    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(
            shape, dtype=dtype or getattr(shape, "dtype", None) or torch.bfloat16
        )
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
