"""Convert the frozen weights of a built model in place: :func:`quantize_` and its undo.

What is converted: every frozen ``nn.Linear`` (PEFT's ``base_layer`` included) to a bitsandbytes
layer, every fused-experts module to :class:`~ciuic.weights.experts.QuantizedExperts`, and,
with ``prune``, linears to :class:`~ciuic.weights.prune.PrunedLinear`. What is not: trainable
modules (LoRA adapters, ``modules_to_save`` copies), router gates, ``lm_head`` and the input
embeddings unless ``head``/``embeddings`` name a format (then they become
:class:`~ciuic.weights.tables.QuantizedHead`/:class:`~ciuic.weights.tables.QuantizedEmbedding`),
names in ``skip``, and models that transformers already loaded with a ``BitsAndBytesConfig``.
Each of those is listed in ``Applied.skipped`` with the reason.

Saving and resuming. A converted model's ``state_dict`` holds the stored form (bitsandbytes'
keys and shapes for linears, codes and scales for experts, head and embeddings). Two orders
are supported:

(a) resume: build the model again (any initial weights), convert it with the same options
    (``quantize_`` or ``ciuic.apply_``; wrap it with PEFT before or after, as before), then
    ``load_state_dict`` the saved state dict: every tensor and the next forward and backward
    are bitwise those of the saved model (pruned layers take the kept count of the saved
    mask, so a fresh model's own pruning pattern does not matter);
(b) export: :func:`dense_state_dict` gives the dequantized weights under the original module
    names, which the plain (unconverted, un-wrapped) model loads with ``strict=True``. For a
    PEFT model's adapters alone use PEFT's ``get_peft_model_state_dict(model)``: it loads into
    ``get_peft_model`` of the dense model with ``set_peft_model_state_dict``.

A converted model (and the ``Applied.undo`` returned with it) survives ``copy.deepcopy``,
``pickle`` and ``torch.save``/``torch.load(weights_only=False)``; copying the model together
with its undo (as one object graph) gives an undo that dequantizes the copy.

The replaced module objects are kept for ``undo`` with their weights swapped for ``meta``
placeholders (so the dense memory is really freed); ``undo`` dequantizes into them and puts
them back, so after ``remove_`` the model holds its original module objects again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ciuic.errors import ApplyError
from ciuic.registry import Applied

from .expert_slot import install_swap_hook, is_peft_param_wrapper, remove_swap_hook
from .experts import (
    EXPERT_PARAMS,
    QuantizedExperts,
    fused_experts_layout_problem,
    ignore_placeholders_in_ddp,
    unignore_in_ddp,
)
from .functional import storage_bytes
from .linear import (
    dequantize_linear,
    is_bnb_linear,
    is_weight_param_wrapper,
    linear_storage_bytes,
    quantize_linear,
    swap_lora_wrapper,
    unswap_lora_wrapper,
)
from .options import WeightOptions
from .prune import PrunedLinear, magnitude_mask, packed_bytes
from .tables import QuantizedEmbedding, QuantizedHead, embedding_layout_problem, table_layout_problem

ROUTER_NAMES = ("gate", "router")
"""Last name components of router linears (Qwen-MoE/Mixtral ``mlp.gate``): never quantized."""
_FLAGS = ("is_loaded_in_4bit", "is_loaded_in_8bit")
_STORED = (QuantizedExperts, PrunedLinear, QuantizedEmbedding, QuantizedHead)
_MARK = "_ciuic_weights"


@dataclass
class _Conversion:
    """One replaced module: where it sits, the original (weights on meta) and its stand-in."""

    name: str
    parent: nn.Module
    attr: str
    original: nn.Module
    new: nn.Module
    params: tuple[str, ...]
    dense_bytes: int
    stored_bytes: int
    elements: int
    note: str = ""
    wrapper_class: type | None = None
    slot: tuple[nn.Module, str] | None = None  # experts: where their PEFT chain hangs (swap hook)
    tied: _Conversion | None = None  # the embedding conversion a tied head shares codes with

    def undo(self, model: nn.Module) -> None:
        for param in self.params:
            placeholder = getattr(self.original, param)
            dense = _dense_of(self.new, param).to(placeholder.dtype)
            setattr(self.original, param, nn.Parameter(dense, requires_grad=placeholder.requires_grad))
        parent, attr = self._current_place(model)
        setattr(parent, attr, self.original)
        if self.wrapper_class is not None:
            parent.__class__ = self.wrapper_class
        elif attr == "base_layer":  # PEFT wrapped the converted layer after the conversion
            unswap_lora_wrapper(parent)
        if self.slot is not None:
            remove_swap_hook(*self.slot)

    def _current_place(self, model: nn.Module) -> tuple[nn.Module, str]:
        """Where the converted module sits now: PEFT may have wrapped it since (its
        ``base_layer``), so the place recorded at conversion is checked first, then searched."""
        if getattr(self.parent, self.attr, None) is self.new:
            return self.parent, self.attr
        for module in model.modules():
            for attr, child in module.named_children():
                if child is self.new:
                    return module, attr
        raise ApplyError(
            f"cannot undo the conversion of {self.name!r}: the converted module is no longer part of "
            f"the model. Put it back (or rebuild the model) before calling remove_."
        )


@dataclass
class _Undo:
    """``Applied.undo`` of :func:`quantize_`: a picklable callable (no closure), so it survives
    ``deepcopy``/``pickle``/``torch.save`` together with the model it refers to."""

    model: nn.Module
    conversions: list[_Conversion]
    flags: list[tuple[nn.Module, dict[str, Any]]]
    frozen: list[tuple[nn.Module, str]]  # (owning module, name): PEFT may rename it since
    ties: list[tuple[nn.Module, nn.Module]]  # (original head, original embedding)
    ddp_ignored: list[str] = field(default_factory=list)  # expert placeholders hidden from DDP

    def __call__(self) -> None:
        unignore_in_ddp(self.model, self.ddp_ignored)
        for conversion in reversed(self.conversions):
            conversion.undo(self.model)
        for head, embedding in self.ties:
            head.weight = embedding.weight  # the tie that two separate dequantizations broke
        _restore_flags(self.flags)
        _unfreeze(self.frozen)
        self.conversions, self.flags, self.frozen, self.ties, self.ddp_ignored = [], [], [], [], []


@dataclass
class _Plan:
    linears: list[tuple[str, nn.Linear]] = field(default_factory=list)
    experts: list[tuple[str, nn.Module]] = field(default_factory=list)
    tables: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # embeddings first
    tied: bool = False  # lm_head shares the input embeddings' weight
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    trainable: int = 0
    frozen_elements: int = 0


def quantize_(model: nn.Module, options: WeightOptions) -> Applied:
    """Convert the frozen weights of ``model`` in place, as ``options`` says.

    ``ciuic.apply_(model, CiuicConfig(weights=...))`` calls this with
    ``WeightOptions(format=config.weights)``; call it directly for the other options. Works on a
    plain model and on a PEFT model, before or after ``get_peft_model`` (the same model comes out).

    Args:
        model: The model (transformers, PEFT, or any ``nn.Module``).
        options: What to convert and how.

    Returns:
        The :class:`~ciuic.registry.Applied` record: ``details`` holds the element coverage and
        the real bytes before and after; ``undo()`` dequantizes everything back to dense layers.

    Raises:
        ApplyError: if nothing can be converted, or if every candidate weight is trainable
            while other parameters are frozen (name the modules in ``options.freeze``). A model
            whose parameters all require grad (full fine-tuning) is frozen whole instead, with
            the count in ``details["frozen_parameters"]``; ``undo()`` unfreezes it.

    Example:
        >>> import torch
        >>> from ciuic.weights import WeightOptions, quantize_
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).requires_grad_(False)
        >>> applied = quantize_(model, WeightOptions(format="nf4"))
        >>> type(model[0]).__name__, applied.details["coverage"]
        ('Linear4bit', 1.0)
        >>> applied.undo()
        >>> type(model[0]).__name__
        'Linear'
    """
    quantized_by = _bnb_loaded(model)
    if quantized_by is not None:
        reason = f"already quantized by transformers ({quantized_by}): left as loaded"
        return Applied(
            "weights", skipped=[("model", reason)], details={"format": options.format, "already": True}
        )
    frozen = _freeze(model, options.freeze)
    full_fine_tuning = not frozen and _is_full_fine_tuning(model)
    if full_fine_tuning:
        frozen = _freeze(model, ("",))
    try:
        plan = _plan(model, options)
        if _already_quantized(plan):
            _unfreeze(frozen)
            return _already_quantized_record(options, plan)
        _check_plan(model, options, plan)
        conversions = _convert(model, plan, options)
    except BaseException:
        _unfreeze(frozen)
        raise
    flags = _set_flags(model, options)
    ties = [(c.original, c.tied.original) for c in conversions if c.tied is not None]
    return Applied(
        "weights",
        changed=[c.name for c in conversions],
        skipped=[(_summarize(names), reason) for reason, names in plan.skipped.items()],
        undo=_Undo(model, conversions, flags, frozen, ties, ignore_placeholders_in_ddp(model)),
        details=_details(options, plan, conversions, frozen if full_fine_tuning else []),
    )


# -- planning --------------------------------------------------------------------------------
def _plan(model: nn.Module, options: WeightOptions) -> _Plan:
    plan = _Plan()
    head = _output_embeddings(model)
    embeddings = _input_embeddings(model)
    tied = head is not None and embeddings is not None and _tied(head, embeddings)
    plan.tied = tied
    done: list[str] = []  # subtrees already handled (converted layers, experts)
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in done):
            continue
        if is_bnb_linear(module) or isinstance(module, _STORED):
            plan.skipped[_ALREADY].append(name)
            done.append(name)
            continue
        if is_peft_param_wrapper(module):
            done.append(name)
            _plan_param_wrapper(plan, name, module, options)
            continue
        if fused_experts_layout_problem(module) is None:
            done.append(name)
            _plan_experts(plan, name, module, options)
        elif embeddings is not None and module is embeddings:
            _plan_table(plan, name, module, options, "embeddings", tied=tied)
        elif isinstance(module, nn.Linear) and (module is head or _has_part(name, "lm_head")):
            _plan_table(plan, name, module, options, "head", tied=tied and module is head)
        elif isinstance(module, nn.Linear):
            _plan_linear(plan, name, module, options)
    plan.tables.sort(key=lambda table: table[2] != "embeddings")  # a tied head shares its codes
    return plan


def _plan_param_wrapper(plan: _Plan, name: str, wrapper: nn.Module, options: WeightOptions) -> None:
    """PEFT's ``target_parameters`` LoRA (nested ``ParamWrapper``s, which PEFT 0.21 also derives
    from ``gate_proj``/``up_proj`` targets on transformers-5 MoE models): the fused experts at
    the bottom of the chain are converted, and the chain then adds LoRA per routed expert. A
    wrapper on a linear's ``weight`` (``lora_targets``' way around peft#3711) is planned as that
    linear; converting it swaps the wrapper to PEFT's bitsandbytes LoRA class."""
    linear = wrapper.get_submodule("base_layer")
    if is_weight_param_wrapper(wrapper) and isinstance(linear, (nn.Linear, PrunedLinear)):
        if is_bnb_linear(linear) or isinstance(linear, PrunedLinear):
            plan.skipped[_ALREADY].append(f"{name}.base_layer")
        else:
            _plan_linear(plan, f"{name}.base_layer", linear, options)
        return
    base, base_name = wrapper, name
    while is_peft_param_wrapper(base):
        base, base_name = base.get_submodule("base_layer"), f"{base_name}.base_layer"
    if isinstance(base, _STORED):
        plan.skipped[_ALREADY].append(base_name)
    elif fused_experts_layout_problem(base) is None:
        _plan_experts(plan, base_name, base, options)
    else:
        reason = "PEFT target_parameters LoRA on a module that is not fused experts: left dense"
        plan.skipped[reason].append(name)
        plan.frozen_elements += sum(p.numel() for p in base.parameters() if not p.requires_grad)


def _plan_table(
    plan: _Plan, name: str, module: nn.Module, options: WeightOptions, kind: str, *, tied: bool
) -> None:
    fmt: str = getattr(options, kind)
    weight: Any = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        plan.skipped[f"{kind}: no weight tensor (wrapped by PEFT?): left as is"].append(name)
        return
    reason = _common_skip_reason(name, [weight], options)
    if reason is None and fmt == "none":
        reason = f"{_NAMES[kind]} stay dense by default (WeightOptions({kind}='int8' or 'nf4') stores them)"
    if reason is None and _has_part(name, "base_layer"):
        reason = f"{_NAMES[kind]}: adapted by PEFT (LoRA on it), left dense"
    if reason is None and options.prune is not None and kind == "head":
        reason = "lm_head is not pruned"
    if reason is None:
        problem = embedding_layout_problem(module) if kind == "embeddings" else None
        reason = problem or table_layout_problem(weight, fmt)
    if reason is None and tied and options.head != options.embeddings:
        if "none" not in (options.head, options.embeddings):
            raise ApplyError(
                f"lm_head is tied to the input embeddings (tie_word_embeddings), so one table serves "
                f"both: head={options.head!r} and embeddings={options.embeddings!r} contradict. "
                f"Allowed: the same format for both."
            )
        reason = (
            f"{_NAMES[kind]}: tied to the {'input embeddings' if kind == 'head' else 'lm_head'} "
            f"(tie_word_embeddings), which stay dense: set head and embeddings to the same format "
            f"to store the shared table once"
        )
    if not weight.requires_grad and (kind == "head" or fmt != "none"):
        plan.frozen_elements += weight.numel()
    if reason is None:
        plan.tables.append((name, module, kind))
    else:
        plan.trainable += "trainable" in reason
        plan.skipped[reason].append(name)


def _plan_experts(plan: _Plan, name: str, module: nn.Module, options: WeightOptions) -> None:
    params = [getattr(module, p) for p in EXPERT_PARAMS]
    reason = _common_skip_reason(name, params, options)
    if reason is None and options.quantized:
        reason = QuantizedExperts.layout_problem(module, options.format)
    elif reason is None and options.prune is None:
        reason = "format='none': fused experts stay dense"
    elif reason is None:
        reason = "fused experts are not pruned (only nn.Linear layers are)"
    if not any(p.requires_grad for p in params):
        plan.frozen_elements += sum(p.numel() for p in params)
    if reason is None:
        plan.experts.append((name, module))
    else:
        plan.skipped[reason].append(name)
        plan.trainable += "trainable" in reason


def _plan_linear(plan: _Plan, name: str, module: nn.Linear, options: WeightOptions) -> None:
    reason = _common_skip_reason(name, [module.weight], options)
    if reason is None and name.rsplit(".", 1)[-1] in ROUTER_NAMES:
        reason = "router gate: expert routing is too sensitive to quantization noise"
    if reason is None and not options.quantized and options.prune is None:
        reason = "format='none': linears stay dense (only the head/embeddings are converted)"
    if not module.weight.requires_grad:
        plan.frozen_elements += module.weight.numel()
    if reason is None:
        plan.linears.append((name, module))
    elif "trainable" in reason and not _is_adapter(name):
        plan.trainable += 1
        plan.skipped[reason].append(name)
    elif "trainable" not in reason:
        plan.skipped[reason].append(name)
    else:
        plan.skipped["trainable adapter weights (LoRA): they are what is trained"].append(name)


def _common_skip_reason(name: str, params: list[torch.Tensor], options: WeightOptions) -> str | None:
    if any(name == p or name.startswith(p + ".") for p in options.skip):
        return "named in WeightOptions.skip"
    if any(p.requires_grad for p in params):
        return "trainable (requires_grad=True): a quantized weight cannot be trained"
    if any(p.device.type == "meta" for p in params):
        return "weights on the meta device: load them first"
    return None


_ALREADY = "already stored by bitsandbytes/ciuic: left as is"


def _already_quantized(plan: _Plan) -> bool:
    """Nothing left to convert because earlier conversions stored it all."""
    return not (plan.linears or plan.experts or plan.tables) and bool(plan.skipped.get(_ALREADY))


def _already_quantized_record(options: WeightOptions, plan: _Plan) -> Applied:
    """The record of a ``weights=`` request on an already quantized model: nothing changed, so
    there is nothing to undo (the earlier conversion keeps its own undo)."""
    names = plan.skipped[_ALREADY]
    reason = (
        f"already quantized ({len(names)} modules stored by bitsandbytes/ciuic, e.g. {names[0]!r}): "
        f"left as they are; remove_ leaves them quantized"
    )
    return Applied(
        "weights", skipped=[("model", reason)], details={"format": options.format, "already": True}
    )


def _check_plan(model: nn.Module, options: WeightOptions, plan: _Plan) -> None:
    if plan.linears or plan.experts or plan.tables:
        return
    if plan.trainable:
        raise ApplyError(
            f"weights={options.format!r} converts frozen weights only, but the {plan.trainable} "
            f"candidate modules of {type(model).__name__} all require grad (full fine-tuning). "
            f"Freeze the base model (wrap it with LoRA, or model.requires_grad_(False)), or name the "
            f"modules to freeze: ciuic.weights.quantize_(model, WeightOptions(format={options.format!r}, "
            f"freeze=('model.layers',)))."
        )
    skipped = "; ".join(f"{_summarize(n)}: {r}" for r, n in plan.skipped.items()) or "none found"
    raise ApplyError(
        f"weights={options.format!r} found nothing to convert in {type(model).__name__}: no frozen "
        f"nn.Linear or fused-experts module (skipped: {skipped})."
    )


# -- converting ------------------------------------------------------------------------------
def _convert(model: nn.Module, plan: _Plan, options: WeightOptions) -> list[_Conversion]:
    done: list[_Conversion] = []
    try:
        for name, linear in plan.linears:
            done.append(_convert_linear(model, name, linear, options))
        for name, experts in plan.experts:
            done.append(_convert_experts(model, name, experts, options))
        embeddings = None
        for name, module, kind in plan.tables:
            tied = embeddings if plan.tied and kind == "head" else None
            done.append(_convert_table(model, name, module, kind, options, tied))
            embeddings = done[-1] if kind == "embeddings" else embeddings
    except BaseException:
        for conversion in reversed(done):
            conversion.undo(model)
        raise
    return done


def _convert_linear(model: nn.Module, name: str, linear: nn.Linear, options: WeightOptions) -> _Conversion:
    fmt = options.format
    weight = linear.weight
    note = ""
    source: nn.Linear | PrunedLinear = linear
    if options.prune is not None:
        source, note = _pruned(linear, fmt, options.prune)
    new: nn.Module
    if isinstance(source, PrunedLinear):
        new, stored = source, source.storage_bytes()
    elif fmt == "none":
        new, stored = source, storage_bytes(source.weight)
    else:
        new = quantize_linear(source, fmt, double_quant=options.double_quant)
        stored = linear_storage_bytes(new)
    return _install(model, name, linear, new, ("weight",), (weight,), stored, note)


def _pruned(linear: nn.Linear, fmt: str, prune: str | float) -> tuple[nn.Linear | PrunedLinear, str]:
    try:
        mask = magnitude_mask(linear.weight, prune)
    except ValueError as error:
        return linear, f"not pruned: {error}"
    numel, kept = mask.numel(), int(mask.sum())
    packed = packed_bytes(numel, kept, linear.weight.dtype, fmt)
    unpruned = packed_bytes(numel, numel, linear.weight.dtype, fmt) - (numel + 7) // 8
    if packed < unpruned:
        return PrunedLinear(linear, mask, fmt), f"pruned {numel - kept}/{numel}, packed"
    dense = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    dense.weight = nn.Parameter(linear.weight.detach() * mask, requires_grad=False)
    if linear.bias is not None:
        dense.bias = linear.bias
    note = (
        f"pruned {numel - kept}/{numel} but stored dense: values+mask would take {packed} B, "
        f"not less than {unpruned} B, so pruning saves no memory here"
    )
    return dense, note


def _convert_experts(model: nn.Module, name: str, experts: nn.Module, options: WeightOptions) -> _Conversion:
    new = QuantizedExperts(experts, options.format)
    new.train(experts.training)
    stored = storage_bytes(*new.buffers())
    weights = tuple(getattr(experts, p) for p in EXPERT_PARAMS)
    conversion = _install(model, name, experts, new, EXPERT_PARAMS, weights, stored)
    conversion.slot = _experts_slot(model, name)
    install_swap_hook(*conversion.slot)
    return conversion


def _experts_slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module and attribute holding the experts or the PEFT chain wrapping them."""
    top = name
    while top.endswith(".base_layer"):
        top = top[: -len(".base_layer")]
    holder, _, attr = top.rpartition(".")
    return model.get_submodule(holder), attr


def _convert_table(
    model: nn.Module,
    name: str,
    module: nn.Module,
    kind: str,
    options: WeightOptions,
    tied: _Conversion | None,
) -> _Conversion:
    """Convert the input embeddings or the head; a head ``tied`` to the converted embeddings
    shares their codes (and adds no stored bytes)."""
    fmt = getattr(options, kind)
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    new: QuantizedEmbedding | QuantizedHead
    if kind == "embeddings":
        new = QuantizedEmbedding(module, fmt)  # type: ignore[arg-type]  # checked by the plan
    else:
        shared = tied.new if tied is not None and isinstance(tied.new, QuantizedEmbedding) else None
        new = QuantizedHead(module, fmt, shared=shared)  # type: ignore[arg-type]
    new.train(module.training)
    stored = 0 if tied is not None else new.storage_bytes()
    conversion = _install(model, name, module, new, ("weight",), (weight,), stored)
    conversion.tied = tied
    return conversion


def _tied(head: nn.Module, embedding: nn.Module) -> bool:
    """Whether ``head`` and ``embedding`` share one weight tensor (``tie_word_embeddings``)."""
    weight = getattr(head, "weight", None)
    return isinstance(weight, torch.Tensor) and weight is getattr(embedding, "weight", None)


def _install(
    model: nn.Module,
    name: str,
    original: nn.Module,
    new: nn.Module,
    params: tuple[str, ...],
    weights: tuple[torch.Tensor, ...],
    stored: int,
    note: str = "",
) -> _Conversion:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    conversion = _Conversion(
        name=name,
        parent=parent,
        attr=attr,
        original=original,
        new=new,
        params=params,
        dense_bytes=sum(w.numel() * w.element_size() for w in weights),
        stored_bytes=stored,
        elements=sum(w.numel() for w in weights),
        note=note,
    )
    setattr(parent, attr, new)
    for param, weight in zip(params, weights, strict=True):
        # The original module keeps only the shape, dtype and requires_grad of its weight.
        placeholder = torch.empty_like(weight, device="meta")
        setattr(original, param, nn.Parameter(placeholder, requires_grad=weight.requires_grad))
    if attr == "base_layer":
        conversion.wrapper_class = swap_lora_wrapper(parent, new)
    return conversion


def _dense_of(module: nn.Module, param: str) -> torch.Tensor:
    if isinstance(module, QuantizedExperts):
        return module.dense(param)
    if isinstance(module, (QuantizedEmbedding, QuantizedHead)):
        return module.dense_weight()
    if isinstance(module, PrunedLinear):
        return module.dense_weight()
    if is_bnb_linear(module):
        return dequantize_linear(module)
    weight: torch.Tensor = getattr(module, param)
    return weight.detach()


def dense_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The dense tensors a converted module stands for, by parameter name (for fidelity checks).

    Example:
        >>> import torch
        >>> from ciuic.weights.linear import quantize_linear
        >>> dense_weights(quantize_linear(torch.nn.Linear(64, 8), "int8"))["weight"].shape
        torch.Size([8, 64])
    """
    params = EXPERT_PARAMS if isinstance(module, QuantizedExperts) else ("weight",)
    return {p: _dense_of(module, p) for p in params}


# -- model-level state -----------------------------------------------------------------------
def _freeze(model: nn.Module, prefixes: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """Freeze the trainable parameters under ``prefixes`` (``""``: all of them)."""
    frozen: list[tuple[nn.Module, str]] = []  # undo puts new (dequantized) parameters at the same places
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if param.requires_grad and any(not p or full.startswith(p + ".") for p in prefixes):
                param.requires_grad_(False)
                frozen.append((module, name))
    return frozen


def _unfreeze(frozen: list[tuple[nn.Module, str]]) -> None:
    for module, name in frozen:
        getattr(module, name).requires_grad_(True)


def _is_full_fine_tuning(model: nn.Module) -> bool:
    """Every parameter trainable: a full fine-tuning model, which ``weights=`` freezes (as
    ``load_in_4bit`` and ``prepare_model_for_kbit_training`` do)."""
    params = list(model.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def _set_flags(model: nn.Module, options: WeightOptions) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Set the attributes PEFT reads to pick its bitsandbytes LoRA layers, on the model and on
    every transformers model inside it (a PEFT wrapper's inner model)."""
    flag = {"int8": _FLAGS[1], "nf4": _FLAGS[0], "fp4": _FLAGS[0]}.get(options.format)
    targets = [m for m in model.modules() if m is model or hasattr(m, "get_input_embeddings")]
    saved = [(m, {k: m.__dict__[k] for k in (*_FLAGS, _MARK) if k in m.__dict__}) for m in targets]
    for module in targets:
        module.__dict__[_MARK] = True
        if flag is not None:
            module.__dict__[flag] = True
    return saved


def _restore_flags(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, previous in saved:
        for key in (*_FLAGS, _MARK):
            module.__dict__.pop(key, None)
        module.__dict__.update(previous)


def _bnb_loaded(model: nn.Module) -> str | None:
    """How transformers quantized ``model`` (its BitsAndBytesConfig), or None."""
    for module in model.modules():
        if module.__dict__.get(_MARK):
            return None
        quantizer = getattr(module, "hf_quantizer", None)
        config = getattr(getattr(module, "config", None), "quantization_config", None)
        if quantizer is not None or config is not None:
            method = getattr(config, "quant_method", None) or type(quantizer).__name__
            return f"quantization_config with quant_method={getattr(method, 'value', method)!r}"
        if any(module.__dict__.get(flag) for flag in _FLAGS):
            return "is_loaded_in_4bit/8bit is set"
    return None


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        table = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return table if isinstance(table, nn.Module) else None


_NAMES = {"head": "lm_head", "embeddings": "input embeddings"}


def _has_part(name: str, part: str) -> bool:
    return part in name.split(".")


def _is_adapter(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("lora_") for p in parts)


def _summarize(names: list[str]) -> str:
    shown = ", ".join(n or "<model>" for n in names[:3])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more"


def _details(
    options: WeightOptions, plan: _Plan, conversions: list[_Conversion], froze: list[tuple[nn.Module, str]]
) -> dict[str, Any]:
    elements = sum(c.elements for c in conversions)
    dense = sum(c.dense_bytes for c in conversions)
    stored = sum(c.stored_bytes for c in conversions)
    details: dict[str, Any] = {
        "format": options.format,
        "converted_modules": len(conversions),
        "converted_elements": elements,
        "frozen_elements": plan.frozen_elements,
        "coverage": round(elements / plan.frozen_elements, 4) if plan.frozen_elements else 0.0,
        "dense_bytes": dense,
        "bf16_bytes": 2 * elements,
        "stored_bytes": stored,
        "ratio_vs_bf16": round(stored / (2 * elements), 4) if elements else 0.0,
        "head": options.head,
        "embeddings": options.embeddings,
    }
    if froze:
        details["froze_full_fine_tuning"] = (
            f"all {len(froze)} parameters were trainable (full fine-tuning): frozen, as load_in_4bit "
            f"does; remove_ makes them trainable again"
        )
        details["frozen_parameters"] = len(froze)
    if options.double_quant and any(isinstance(c.new, QuantizedExperts) for c in conversions):
        details["double_quant"] = "nn.Linear layers only: fused experts keep fp32 block scales"
    if options.prune is not None:
        notes = [c.note for c in conversions if c.note]
        unsaved = [n for n in notes if "saves no memory" in n]
        details["prune"] = options.prune
        details["prune_saved_memory"] = len(unsaved) < len(notes)
        if unsaved:
            details["prune_note"] = f"{len(unsaved)} of {len(notes)} layers: {unsaved[0]}"
        if any(isinstance(c.new, QuantizedExperts) for c in conversions):
            details["prune_experts"] = "fused experts are quantized but not pruned"
    return details
