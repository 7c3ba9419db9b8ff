"""Dense export of a converted model: :func:`dense_state_dict`.

The converted model's own ``state_dict`` is for resuming the converted model (see
:mod:`ciuic.weights.model`); this one is for everything else: the dequantized weights under
the names the plain model uses, which the unconverted model (a fresh ``from_config`` or
``from_pretrained`` transformers model, not wrapped by PEFT) loads with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ciuic.errors import ApplyError

from .experts import QuantizedExperts
from .linear import is_bnb_linear
from .model import dense_weights
from .prune import PrunedLinear
from .tables import QuantizedEmbedding, QuantizedHead

_CONVERTED = (QuantizedExperts, PrunedLinear, QuantizedEmbedding, QuantizedHead)


def dense_state_dict(model: nn.Module, *, merge_adapters: bool = False) -> dict[str, torch.Tensor]:
    """The dense (dequantized) state dict of ``model`` under the plain model's names.

    Every converted module (bitsandbytes linears, :class:`~ciuic.weights.QuantizedExperts`,
    pruned linears, quantized head and embeddings) gives its dequantized weights, in the dtype
    they were converted from, under the original parameter names (``...q_proj.weight``,
    ``...experts.gate_up_proj``); other tensors are taken as they are (non-persistent buffers
    left out, as ``state_dict`` does). The values are those the converted model computes
    with, so the plain model that loads them computes what the dequantized model
    (``ciuic.remove_``) does, bitwise.

    For a PEFT model the keys are the base model's (``model.layers...``, no
    ``base_model.model.`` prefix, no ``base_layer``): adapters are dropped and
    ``modules_to_save`` give their original module, unless ``merge_adapters`` is set; then each
    LoRA layer's active adapters are added to its dense weight (PEFT's ``get_delta_weight``)
    and ``modules_to_save`` give their trained copy: the state dict of the merged model. For
    the adapters alone, use PEFT's ``get_peft_model_state_dict(model)``: it loads into
    ``get_peft_model(plain_model, same_lora_config)`` with ``set_peft_model_state_dict``.

    Args:
        model: A model converted by :func:`~ciuic.weights.quantize_` (or not: then this is its
            plain state dict), PEFT-wrapped or not.
        merge_adapters: Add the active LoRA adapters into the weights.

    Returns:
        Detached tensors by name; converted weights are new tensors, the others are shared
        with the model (copy them before changing the model).

    Raises:
        ApplyError: if ``merge_adapters`` meets a PEFT adapter that has no ``get_delta_weight``.

    Example:
        >>> import torch
        >>> from ciuic.weights import WeightOptions, dense_state_dict, quantize_
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64)).requires_grad_(False)
        >>> _ = quantize_(model, WeightOptions(format="nf4"))
        >>> plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> plain.load_state_dict(dense_state_dict(model), strict=True)
        <All keys matched successfully>
    """
    out: dict[str, torch.Tensor] = {}
    _collect(_peft_base(model), "", out, merge_adapters)
    return out


def _peft_base(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_base_model", None)
    if type(model).__module__.startswith("peft.") and callable(getter):
        base: nn.Module = getter()
        return base
    return model


def _collect(module: nn.Module, prefix: str, out: dict[str, torch.Tensor], merge: bool) -> None:
    base_layer = module.__dict__["_modules"].get("base_layer")
    if base_layer is not None and _is_peft(module):
        _collect(base_layer, prefix, out, merge)
        if merge:
            _merge_adapters(module, prefix, out)
        return
    if _is_modules_to_save(module):
        chosen: Any = module.original_module if not merge else _active_copy(module)
        _collect(chosen, prefix, out, merge)
        return
    if isinstance(module, _CONVERTED) or is_bnb_linear(module):
        _collect_converted(module, prefix, out)
        return
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = param.detach()
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = buffer.detach()
    for name, child in module._modules.items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, merge)


def _collect_converted(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    dtype = _dense_dtype(module)
    for name, tensor in dense_weights(module).items():
        out[prefix + name] = tensor.detach().to(dtype)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and not isinstance(module, QuantizedExperts):
        out[prefix + "bias"] = bias.detach()


def _dense_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a converted weight had; LLM.int8 keeps none, so ``quantize_linear`` records it."""
    recorded: Any = getattr(module, "ciuic_dtype", None)
    if isinstance(recorded, torch.dtype):
        return recorded
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) else None


def _merge_adapters(layer: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    delta_fn = getattr(layer, "get_delta_weight", None)
    if not callable(delta_fn):
        raise ApplyError(
            f"merge_adapters=True: the PEFT layer {type(layer).__name__} at {prefix.rstrip('.')!r} has no "
            f"get_delta_weight, so it cannot be merged. Allowed: merge_adapters=False (base weights only)."
        )
    key = prefix + str(getattr(layer, "parameter_name", "weight"))
    merged = set(getattr(layer, "merged_adapters", ()))
    for adapter in getattr(layer, "active_adapters", ()):
        if adapter in merged or adapter not in getattr(layer, "lora_A", {}):
            continue  # already in the base weight, or not this layer's adapter
        with torch.no_grad():
            delta = delta_fn(adapter)
            out[key] = (out[key].float() + delta.float().reshape(out[key].shape)).to(out[key].dtype)


def _is_peft(module: nn.Module) -> bool:
    """A PEFT layer, or Ciuic's subclass of one (``QuantizedParamWrapper``)."""
    return any(cls.__module__.startswith("peft.") for cls in type(module).__mro__)


def _is_modules_to_save(module: nn.Module) -> bool:
    return (
        type(module).__module__.startswith("peft.")
        and hasattr(module, "original_module")
        and hasattr(module, "modules_to_save")
    )


def _active_copy(wrapper: Any) -> nn.Module:
    adapter = wrapper.active_adapter
    if isinstance(adapter, list | tuple):
        adapter = adapter[0]
    module: nn.Module = wrapper.modules_to_save[adapter]
    return module
