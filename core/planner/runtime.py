"""A budget at run time: fields left to ``"auto"`` are set at the first step by ``ciuic.plan``.

``CiuicConfig(budget="8GiB", weights="auto", activations="auto", loss="auto")`` (any of the
three; the other fields as given): ``apply_`` applies the config with those fields at their
defaults, and the first ``step_scope(inputs=batch)`` prices, for the live model (its config,
dtype and PEFT LoRA config) and that batch's shape, the configs that differ only in those fields
(``ciuic.plan(..., config=...)``), then sets the one the planner picks with ``handle.update``
before the step runs. ``handle.plan`` keeps the plan (``handle.plan.table()``); a plan where
nothing fits applies its lowest-peak config and warns, and the OOM recovery takes it from
there. The Lightning strategy and the Hugging Face callback pass each batch to
``step_scope``.

The margin is :func:`ciuic.planner.margin_bytes` on CUDA and none elsewhere, where the budget
is enforced by the meter, which counts what the pricing counts. The pricing is of fake tensors
on a CPU (seconds for a small model, a minute or more per config for a 7B one), once per run.
The forward is priced under 16-bit autocast when autocast is on as the step enters
``step_scope``, otherwise without it (:mod:`ciuic.planner.precision`): a trainer that enters
autocast inside the step (HF ``bf16=True``) is priced without it, which at thousands of tokens
prices higher (PEFT's float32 copies of the adapters' inputs).

``checkpointing="auto"`` is not planned here: it sizes itself to ``budget`` at the first
forward, block by block (:class:`ciuic.activations.checkpoint.AutoCheckpointing`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ciuic.errors import ConfigError

if TYPE_CHECKING:
    from ciuic.api import CiuicHandle
    from ciuic.config import CiuicConfig

    from .plan_result import Plan

logger = logging.getLogger("ciuic.planner")


def batch_shape(inputs: Any) -> tuple[int, int]:
    """``(batch, tokens)`` of a training batch: its ``input_ids`` (a mapping's, or the first
    2-D integer tensor of a tuple or list), else its first 2-D tensor."""
    tensors = _tensors(inputs)
    ids = [t for t in tensors if t.dim() == 2 and not t.is_floating_point()]
    found = ids or [t for t in tensors if t.dim() == 2]
    if not found:
        raise ConfigError(
            f"inputs={type(inputs).__name__} holds no (batch, tokens) tensor: the 'auto' fields are "
            f"planned for the first batch's shape; pass step_scope(inputs=batch) a batch with input_ids."
        )
    batch, tokens = found[0].shape
    return int(batch), int(tokens)


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        first = [inputs["input_ids"]] if isinstance(inputs.get("input_ids"), torch.Tensor) else []
        return first + [t for v in inputs.values() for t in _tensors(v)]
    if isinstance(inputs, (tuple, list)):
        return [t for v in inputs for t in _tensors(v)]
    return []


def live_lora(model: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """A function that wraps a fresh model with the live model's PEFT LoRA config, or ``None``
    when the model has none (full fine-tuning)."""
    peft_configs = _find_peft_configs(model)
    if not peft_configs:
        return None
    name = next(iter(peft_configs))
    peft_config = copy.deepcopy(peft_configs[name])
    return _PeftWrap(peft_config)


class _PeftWrap:
    def __init__(self, peft_config: Any) -> None:
        self.peft_config = peft_config
        self.rank = getattr(peft_config, "r", None)

    def __call__(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        wrapped: nn.Module = get_peft_model(model, copy.deepcopy(self.peft_config))
        return wrapped


def _find_peft_configs(model: nn.Module) -> dict[str, Any]:
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and configs:
            return configs
    return {}


def plan_first_step(handle: CiuicHandle, requested: CiuicConfig, inputs: Any) -> Plan:
    """Plan the ``"auto"`` fields of ``requested`` for this batch and set them (``handle.update``)."""
    from .search import plan

    assert handle.model is not None
    batch, tokens = batch_shape(inputs)
    device_type = _device_type(handle.model)
    precision = "mixed" if torch.is_autocast_enabled(device_type) else "true"
    fields = ", ".join(requested.planned())
    logger.info(
        "ciuic: planning %s for %d x %d tokens within budget=%d B", fields, batch, tokens, requested.budget
    )
    result = plan(
        _hf_model(handle.model),
        seq_len=tokens,
        batch=batch,
        budget=requested.budget,
        lora=live_lora(handle.model),
        precision=precision,
        config=requested,
        margin=None if device_type == "cuda" else 0,  # off CUDA the meter enforces exactly what it counts
    )
    failed = [c.error for c in result.candidates if c.error]
    if len(failed) == len(result.candidates):
        why = failed[0] if failed else "nothing was priced"
        raise ConfigError(
            f"{fields}='auto': the planner could not price this model ({why}); give {fields} values "
            f"instead of 'auto'."
        )
    chosen = result.config
    if not result.fits:
        warnings.warn(
            f"ciuic: no config with {fields} planned fits budget={requested.budget:,} B for {batch} x "
            f"{tokens} tokens: the lowest priced peak, {result.predicted_peak_bytes:,} B, is applied "
            f"({_described(chosen, requested)}); the OOM recovery escalates from there.\n{result.table()}",
            UserWarning,
            stacklevel=3,
        )
    handle.update(chosen)
    logger.info("ciuic: planned %s\n%s", _described(chosen, requested), result.table())
    return result


def _described(config: CiuicConfig, requested: CiuicConfig) -> str:
    plain = config.to_dict()
    return ", ".join(f"{name}={plain[name]!r}" for name in requested.planned())


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside the usual wrappers (PEFT, a module holding it)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict") and hasattr(module, "get_input_embeddings"):
            return _unpeft(module)
    raise ConfigError(
        f"model={type(model).__name__} holds no transformers causal LM: the 'auto' fields are planned "
        f"from its config; give the fields values instead of 'auto'."
    )


def _unpeft(module: nn.Module) -> nn.Module:
    base = getattr(module, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "config") else module
