"""PEFT LoRA on quantized fused experts: PEFT's ``lora.ParamWrapper`` around a
:class:`~ciuic.weights.experts.QuantizedExperts`.

PEFT adapts transformers-5 fused experts (``target_parameters``) with nested ``ParamWrapper``
modules, one per parameter, whose forward parametrizes the whole dense 3-D parameter
(``W + scaling * lhs @ rhs``). Over quantized experts that would rebuild every expert's dense
weight on every forward. :class:`QuantizedParamWrapper` (the same object, its class swapped, as
``swap_lora_wrapper`` does for linears) instead hands the active adapters' low-rank factors,
collected down the nested chain, to ``QuantizedExperts.forward``, which adds each routed
expert's delta on that expert's tokens only. The adapter parameters, their names and PEFT's saved
file are unchanged, so an adapter trained here loads into plain PEFT on the dense model.

This module imports peft: import it only when a PEFT wrapper is present.
"""

from __future__ import annotations

from typing import Any

import torch

# Imported only where PEFT already wrapped the experts (expert_slot.py imports it lazily).
from peft.tuners.lora.layer import ParamWrapper  # noqa: TID253
from torch import nn

from ciuic.errors import ApplyError

from .experts import QuantizedExperts


class QuantizedParamWrapper(ParamWrapper):
    """PEFT's ``lora.ParamWrapper`` over :class:`QuantizedExperts`: LoRA added per routed expert.

    Not built directly: :func:`swap_chain` turns PEFT's wrappers into this class (and
    :func:`unswap_chain` back). Merging is refused: the base weights are quantized.

    Example:
        >>> import torch, ciuic
        >>> from peft import LoraConfig, get_peft_model
        >>> from ciuic.demo import tiny_deepseek_v3
        >>> model = get_peft_model(tiny_deepseek_v3(), LoraConfig(**ciuic.lora_targets(tiny_deepseek_v3())))
        >>> _ = ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4"))
        >>> type(model.base_model.model.model.layers[1].mlp.experts).__name__
        'QuantizedParamWrapper'
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if not isinstance(base, QuantizedExperts):
            raise ApplyError(
                f"{type(self).__name__} wraps {type(base).__name__}, not QuantizedExperts: call "
                f"ciuic.remove_(model) to restore PEFT's own ParamWrapper."
            )
        lora = collect_factors(self)
        out: torch.Tensor = base(x, *args, lora=lora, **kwargs)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ApplyError(
            f"cannot merge the LoRA of {self.parameter_name!r} into quantized experts (weights stored "
            f"NF4/FP4/int8). Merge on the dense model: ciuic.remove_(model) first, or load the saved "
            f"adapter into the bf16 model with PeftModel.from_pretrained and merge_and_unload there."
        )


def collect_factors(wrapper: nn.Module) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """``{parameter_name: [(lhs, rhs, scaling), ...]}`` of the active, unmerged adapters of every
    ``ParamWrapper`` from ``wrapper`` down its nested chain (PEFT's ``get_delta_factors``)."""
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    module: Any = wrapper
    while isinstance(module, ParamWrapper):
        if not module.disable_adapters:
            for name in module.active_adapters:
                if name in module.lora_A:
                    factors.setdefault(module.parameter_name, []).append(module.get_delta_factors(name))
        module = module.base_layer
    return factors


def chain_of(module: nn.Module) -> list[nn.Module]:
    """The nested ``ParamWrapper`` modules from ``module`` down to (not including) its base."""
    chain: list[nn.Module] = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain


def swap_chain(module: nn.Module) -> list[nn.Module]:
    """Turn PEFT's ``ParamWrapper`` chain at ``module`` into :class:`QuantizedParamWrapper` if its
    base is a :class:`QuantizedExperts`; returns the wrappers whose class changed."""
    chain = chain_of(module)
    if not chain or not isinstance(chain[-1].get_submodule("base_layer"), QuantizedExperts):
        return []
    swapped: list[nn.Module] = [w for w in chain if type(w) is ParamWrapper]
    for wrapper in swapped:
        wrapper.__class__ = QuantizedParamWrapper
    return swapped


def unswap_chain(module: nn.Module) -> None:
    """Turn every :class:`QuantizedParamWrapper` of the chain at ``module`` back into PEFT's class."""
    peft_class: type = ParamWrapper
    for wrapper in chain_of(module):
        if type(wrapper) is QuantizedParamWrapper:
            wrapper.__class__ = peft_class
