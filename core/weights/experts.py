"""Fused MoE experts stored block-wise quantized, dequantized one expert at a time.

transformers 5 stores the routed experts of DeepSeek-V2/V3 (and Qwen-MoE, Mixtral) as two 3-D
parameters, ``gate_up_proj (E, 2*I, H)`` and ``down_proj (E, H, I)``, not as ``nn.Linear``:
``BitsAndBytesConfig`` and LoRA ``target_modules`` pass them by, yet they hold most of the
weights of a DeepSeek model. :class:`QuantizedExperts` replaces such a module: it keeps each
tensor as packed bitsandbytes blocks (a row per expert) and, in forward, dequantizes only the
experts the router picked, one at a time, so at most one expert's dense weight is alive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .functional import Codec, frozen_linear

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def fused_experts_layout_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a fused-experts module :class:`QuantizedExperts` can replace, or None.

    Expected: 3-D ``gate_up_proj (E, 2*I, H)`` and ``down_proj (E, H, I)`` parameters, an
    ``act_fn``, ``num_experts``, and transformers' default layout flags (concatenated gate/up,
    not transposed, no bias).
    """
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return "no fused gate_up_proj/down_proj parameters"
    if gate_up.dim() != 3 or down.dim() != 3:
        return f"gate_up_proj/down_proj are {gate_up.dim()}-D/{down.dim()}-D, not 3-D"
    experts, two_inter, hidden = gate_up.shape
    if down.shape != (experts, hidden, two_inter // 2) or two_inter % 2:
        return f"shapes {tuple(gate_up.shape)} and {tuple(down.shape)} are not (E, 2I, H) and (E, H, I)"
    if not hasattr(module, "act_fn") or getattr(module, "num_experts", experts) != experts:
        return "no act_fn/num_experts attributes"
    flags = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True}
    odd = [name for name, default in flags.items() if getattr(module, name, default) != default]
    if odd:
        return f"unsupported layout flags {', '.join(odd)}"
    return None


class QuantizedExperts(nn.Module):
    """Fused routed experts with block-wise NF4/FP4/int8 weights (drop-in for the eager forward).

    Buffers per tensor ``p`` in ``gate_up_proj``, ``down_proj``: ``{p}_data`` (uint8, one row per
    expert) and ``{p}_absmax`` (fp32 scales, one row per expert); both are in ``state_dict``.
    The forward is transformers' eager expert loop with each expert's weight dequantized when
    used (:func:`ciuic.weights.functional.frozen_linear`).

    Args:
        experts: The dense fused-experts module (left untouched; copy its tensors first).
        format: ``'nf4'``, ``'fp4'`` or ``'int8'``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Experts(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_experts, self.act_fn = 2, nn.SiLU()
        ...         self.gate_up_proj = nn.Parameter(torch.randn(2, 64, 32), requires_grad=False)
        ...         self.down_proj = nn.Parameter(torch.randn(2, 32, 32), requires_grad=False)
        >>> q = QuantizedExperts(Experts(), "nf4")
        >>> q(torch.randn(5, 32), torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1)).shape
        torch.Size([5, 32])
    """

    shapes: dict[str, torch.Size]
    dtype: torch.dtype
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, experts: nn.Module, format: str) -> None:
        super().__init__()
        problem = fused_experts_layout_problem(experts)
        if problem is not None:
            raise ValueError(f"experts={type(experts).__name__} cannot be quantized: {problem}.")
        source: Any = experts  # a transformers experts module: attributes are not typed
        self.codec = Codec(format)
        self.act_fn = source.act_fn
        self.shapes: dict[str, torch.Size] = {}
        self.dtype = source.gate_up_proj.dtype
        self.num_experts = int(source.gate_up_proj.shape[0])
        for name in EXPERT_PARAMS:
            dense = getattr(experts, name)
            self.shapes[name] = dense.shape[1:]
            data, absmax = self.codec.encode(dense)
            self.register_buffer(f"{name}_data", data.view(self.num_experts, -1))
            self.register_buffer(f"{name}_absmax", absmax.view(self.num_experts, -1))

    @staticmethod
    def layout_problem(experts: nn.Module, format: str) -> str | None:
        """Why ``experts`` cannot be stored in ``format`` expert by expert, or None."""
        problem = fused_experts_layout_problem(experts)
        if problem is not None:
            return problem
        block = Codec(format).blocksize
        for name in EXPERT_PARAMS:
            per_expert = getattr(experts, name)[0].numel()
            if per_expert % block:
                return f"{name} has {per_expert} weights per expert, not a multiple of the block size {block}"
        return None

    row_source: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    """Where :meth:`expert_weight` reads an expert's ``(data, absmax)`` rows when set (the
    weight offload sets it per instance to copy only the picked experts from host memory)."""

    def expert_weight(self, name: str, expert: int) -> torch.Tensor:
        """The dense ``(out, in)`` weight of one expert, dequantized now."""
        if self.row_source is not None:
            data, absmax = self.row_source(name, expert)
        else:
            data, absmax = getattr(self, f"{name}_data")[expert], getattr(self, f"{name}_absmax")[expert]
        return self.codec.decode(data, absmax, self.shapes[name], self.dtype)

    def dense(self, name: str) -> torch.Tensor:
        """The whole dequantized 3-D tensor ``name`` (for ``remove_`` and fidelity checks)."""
        return torch.stack([self.expert_weight(name, e) for e in range(self.num_experts)])

    def _weight_fn(self, name: str, expert: int) -> Callable[[], torch.Tensor]:
        return functools.partial(self.expert_weight, name, expert)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' eager expert loop, each expert's weights dequantized when used."""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for row in hit:
            expert = int(row[0])
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert])
            gate_up = frozen_linear(hidden_states[token_idx], self._weight_fn("gate_up_proj", expert))
            gate, up = gate_up.chunk(2, dim=-1)
            out = frozen_linear(self.act_fn(gate) * up, self._weight_fn("down_proj", expert))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}=({self.num_experts}, {s[0]}, {s[1]})" for n, s in self.shapes.items())
        return f"format={self.codec.format}, {shapes}"
