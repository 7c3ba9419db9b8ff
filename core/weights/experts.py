"""Fused MoE experts stored block-wise quantized, dequantized one expert at a time.

transformers 5 stores the routed experts of DeepSeek-V2/V3 (and Qwen-MoE, Mixtral) as two 3-D
parameters, ``gate_up_proj (E, 2*I, H)`` and ``down_proj (E, H, I)``, not as ``nn.Linear``:
``BitsAndBytesConfig`` and LoRA ``target_modules`` pass them by, yet they hold most of the
weights of a DeepSeek model. :class:`QuantizedExperts` replaces such a module: it keeps each
tensor as packed bitsandbytes blocks (a row per expert) and, in forward, dequantizes only the
experts the router picked, one at a time, so at most one expert's dense weight is alive.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .functional import Codec, frozen_linear, is_fake

EXPERT_PARAMS = ("gate_up_proj", "down_proj")

LoraFactors = Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor, float]]]
"""Per expert tensor name, the ``(lhs (E, out, r), rhs (E, r, in), scaling)`` of each active
LoRA adapter (PEFT's ``ParamWrapper.get_delta_factors``): expert ``e``'s delta is
``scaling * lhs[e] @ rhs[e]``."""


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
        self._add_placeholders(torch.empty((), dtype=self.dtype, device=source.gate_up_proj.device))

    # -- placeholders: what PEFT's target_parameters sees -----------------------------------
    def _add_placeholders(self, scalar: torch.Tensor) -> None:
        """Register ``gate_up_proj``/``down_proj`` as frozen 0-stride parameters of the dense
        shape, dtype and device over one element of storage: PEFT finds its ``target_parameters``
        with ``named_parameters(recurse=False)`` and sizes its adapters from them, so the
        quantized module can be wrapped after conversion. Their values are never read; they are
        kept out of ``state_dict`` and rebuilt (never materialized) by ``.to()``/``to_empty``."""
        for name in EXPERT_PARAMS:
            placeholder = scalar.expand(self.num_experts, *self.shapes[name])
            self._parameters[name] = nn.Parameter(placeholder, requires_grad=False)

    def _drop_placeholders(self) -> torch.Tensor:
        first = self._parameters.pop(EXPERT_PARAMS[0])
        self._parameters.pop(EXPERT_PARAMS[1])
        assert first is not None
        return torch.empty((), dtype=first.dtype, device=first.device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedExperts:
        scalar = self._drop_placeholders()
        try:
            super()._apply(fn, recurse)
            scalar = fn(scalar)
        finally:
            self._add_placeholders(scalar)
        if scalar.is_floating_point():
            self.dtype = scalar.dtype
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        scalar = self._drop_placeholders()
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._add_placeholders(scalar)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        scalar = self._drop_placeholders()
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            self._add_placeholders(scalar)

    def _forward_routing(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """The routing of the forward pass, also when a checkpoint recomputes it in backward.

        A recompute from inputs that activation compression made lossy (``activations="int4"``
        with ``checkpointing``) can route a few tokens differently; the recomputed graph must be
        the forward's (torch's checkpoint refuses tensors of other shapes), so the forward's
        ``top_k_index`` (``T x k`` integers per MoE layer, the latest forward's) is reused.
        """
        if torch._C._current_graph_task_id() == -1:  # a forward, not a recompute in backward
            self.__dict__["_routing"] = top_k_index.detach() if torch.is_grad_enabled() else None
            return top_k_index
        routing = self.__dict__.get("_routing")
        return routing if routing is not None and routing.shape == top_k_index.shape else top_k_index

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy/pickle would clone the expanded placeholders into dense tensors
        state = self.__dict__.copy()
        state.pop("_routing", None)
        params = state["_parameters"] = dict(state["_parameters"])
        first = params.pop(EXPERT_PARAMS[0])
        params.pop(EXPERT_PARAMS[1])
        state["_placeholder_scalar"] = torch.empty((), dtype=first.dtype, device=first.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        scalar = state.pop("_placeholder_scalar")
        super().__setstate__(state)
        self._add_placeholders(scalar)

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
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        lora: LoraFactors | None = None,
    ) -> torch.Tensor:
        """transformers' eager expert loop, each expert's weights dequantized when used; with
        ``lora``, each routed expert's low-rank delta is added on its tokens alone (no dense
        delta, no dense expert stack)."""
        factors = lora or {}
        top_k_index = self._forward_routing(top_k_index)

        def project(name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
            out = frozen_linear(x, self._weight_fn(name, expert))
            for lhs, rhs, scaling in factors.get(name, ()):
                delta = (x.to(rhs.dtype) @ rhs[expert].transpose(0, 1)) @ lhs[expert].transpose(0, 1)
                out = out + (scaling * delta).to(out.dtype)
            return out

        return expert_loop(hidden_states, top_k_index, top_k_weights, self.num_experts, self.act_fn, project)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}=({self.num_experts}, {s[0]}, {s[1]})" for n, s in self.shapes.items())
        return f"format={self.codec.format}, {shapes}"


Project = Callable[[str, int, torch.Tensor], torch.Tensor]
"""``project(name, expert, x)``: ``x`` through expert ``expert``'s tensor ``name``."""


def expert_loop(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    project: Project,
) -> torch.Tensor:
    """transformers' eager fused-experts loop over the routed experts, one at a time.

    Under ``FakeTensorMode`` the routing cannot be read (it is data-dependent), so
    :func:`balanced_routes` stands in for it.
    """
    final = torch.zeros_like(hidden_states)
    for expert, token_idx, top_k_pos in _routes(top_k_index, num_experts):
        gate_up = project("gate_up_proj", expert, hidden_states[token_idx])
        gate, up = gate_up.chunk(2, dim=-1)
        out = project("down_proj", expert, act_fn(gate) * up)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _routes(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    if is_fake(top_k_index):
        yield from balanced_routes(top_k_index, num_experts)
        return
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for row in hit:
        expert = int(row[0])
        if expert == num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert])
        yield expert, token_idx, top_k_pos


def balanced_routes(
    top_k_index: torch.Tensor, num_experts: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The routing assumed where it cannot be read (fake tensors): balanced, every expert gets
    ``ceil(T * k / E)`` of the ``T`` tokens' ``k`` choices. A real router is less even, so this
    prices the per-expert temporaries of an average expert, not of the busiest one.

    Example:
        >>> import torch
        >>> [len(tokens) for _, tokens, _ in balanced_routes(torch.zeros(5, 2, dtype=torch.long), 4)]
        [3, 3, 3, 3]
    """
    tokens, k = top_k_index.shape
    per_expert = math.ceil(tokens * k / num_experts)
    token_idx = torch.arange(per_expert, device=top_k_index.device) % max(tokens, 1)
    top_k_pos = torch.zeros(per_expert, dtype=torch.long, device=top_k_index.device)
    for expert in range(num_experts):
        yield expert, token_idx, top_k_pos


def _dense_expert_forward(module: Any) -> Callable[..., torch.Tensor]:
    def project(name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(module, name)[expert])

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return expert_loop(hidden, top_k_index, top_k_weights, module.num_experts, module.act_fn, project)

    return forward


@contextlib.contextmanager
def fake_routing(model: nn.Module) -> Iterator[None]:
    """Within the block, every dense fused-experts module of ``model`` runs :func:`expert_loop`
    instead of its own forward (whose routing ops are data-dependent), so a forward under
    ``FakeTensorMode`` goes through with :func:`balanced_routes`. On real tensors the loop
    reads the real routing (transformers' eager computation). :class:`QuantizedExperts`
    needs no such switch. Restores the modules' forwards on exit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Experts(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_experts, self.act_fn = 2, nn.SiLU()
        ...         self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
        ...         self.down_proj = nn.Parameter(torch.randn(2, 4, 4))
        >>> experts = Experts()
        >>> with fake_routing(experts):
        ...     experts(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)).shape
        torch.Size([3, 4])
    """
    patched = [m for m in model.modules() if not isinstance(m, QuantizedExperts) and _is_dense_experts(m)]
    for module in patched:
        module.forward = _dense_expert_forward(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _is_dense_experts(module: nn.Module) -> bool:
    return fused_experts_layout_problem(module) is None


DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"
"""The attribute ``torch.nn.parallel.DistributedDataParallel`` reads on the module it wraps:
names of parameters and buffers it neither broadcasts nor reduces."""


def placeholder_names(module: nn.Module) -> list[str]:
    """The names, relative to ``module``, of the data-less expert parameters that
    :class:`QuantizedExperts` shows PEFT (one element of storage expanded to the dense shape).

    Wrappers that write into or flatten every parameter must leave them out: DDP's broadcast of
    the module states refuses 0-stride tensors, FSDP cannot flatten them.
    """
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, QuantizedExperts):
            names += [f"{prefix}.{name}" if prefix else name for name in EXPERT_PARAMS]
    return names


def ignore_placeholders_in_ddp(module: nn.Module) -> list[str]:
    """Add :func:`placeholder_names` of ``module`` to the names DDP leaves alone when it wraps
    ``module``; returns the names added (for :func:`unignore_in_ddp`)."""
    present = list(getattr(module, DDP_IGNORE_ATTR, ()))
    added = [name for name in placeholder_names(module) if name not in present]
    if added:
        setattr(module, DDP_IGNORE_ATTR, present + added)
    return added


def unignore_in_ddp(module: nn.Module, names: Sequence[str]) -> None:
    """Undo :func:`ignore_placeholders_in_ddp` (names another party added are kept)."""
    present = list(getattr(module, DDP_IGNORE_ATTR, ()))
    kept = [name for name in present if name not in set(names)]
    if kept:
        setattr(module, DDP_IGNORE_ATTR, kept)
    elif DDP_IGNORE_ATTR in module.__dict__:
        delattr(module, DDP_IGNORE_ATTR)
