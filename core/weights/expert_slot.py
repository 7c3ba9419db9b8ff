"""Keep PEFT's wrappers around :class:`~ciuic.weights.experts.QuantizedExperts` swapped.

PEFT may wrap the experts after they were quantized (``apply_`` then ``get_peft_model``). A
forward pre-hook on the module holding the experts (``mlp`` of a DeepSeek MoE layer) swaps a
new ``ParamWrapper`` chain to :class:`~ciuic.weights.expert_lora.QuantizedParamWrapper` before
its first forward: one ``getattr`` per MoE layer and step when there is nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


def is_peft_param_wrapper(module: object) -> bool:
    """Whether ``module`` is PEFT's own ``lora.ParamWrapper`` (not Ciuic's subclass)."""
    cls = type(module)
    return cls.__name__ == "ParamWrapper" and cls.__module__.startswith("peft.")


@dataclass
class SwapHook:
    """Forward pre-hook: swap PEFT's ``ParamWrapper`` chain at ``holder.<attr>`` (picklable)."""

    attr: str

    def __call__(self, holder: nn.Module, args: Any) -> None:
        child = getattr(holder, self.attr, None)
        if isinstance(child, nn.Module) and is_peft_param_wrapper(child):
            from .expert_lora import swap_chain

            swap_chain(child)


def install_swap_hook(holder: nn.Module, attr: str) -> None:
    """Swap the chain at ``holder.<attr>`` now and before every forward of ``holder``."""
    hook = SwapHook(attr)
    hook(holder, ())
    holder.register_forward_pre_hook(hook)


def remove_swap_hook(holder: nn.Module, attr: str) -> None:
    """Remove the hook and turn the chain at ``holder.<attr>`` back into PEFT's classes."""
    for key, hook in list(holder._forward_pre_hooks.items()):
        if isinstance(hook, SwapHook) and hook.attr == attr:
            del holder._forward_pre_hooks[key]
    child = getattr(holder, attr, None)
    if child is not None and type(child).__name__ == "QuantizedParamWrapper":
        from .expert_lora import unswap_chain

        unswap_chain(child)
