"""``ciuic.lora_targets``: PEFT ``LoraConfig`` targets that cover a DeepSeek model.

PEFT's defaults miss most of a DeepSeek model. Without ``target_modules`` PEFT uses its
per-architecture table, which has no entry for ``deepseek_v2``/``deepseek_v3`` (so it raises)
and only ``q_proj``/``v_proj`` for Qwen2/Llama (the R1-Distill models): MLA's ``q_a_proj``,
``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj`` and every MLP stay frozen.
``target_modules="all-linear"`` reaches the linears but not the routed experts, which
transformers 5 stores as fused 3-D parameters (``experts.gate_up_proj``/``experts.down_proj``,
about 92% of DeepSeek-V2-Lite's weights) and which PEFT adapts only through
``target_parameters``. And PEFT 0.21 rewrites ``gate_proj``/``up_proj``/``down_proj`` targets on
transformers-5 ``deepseek_v2``/``deepseek_v3`` models into those expert parameters (its v4-to-v5
checkpoint conversion), dropping them for the dense MLPs and the shared experts, which are
still ``nn.Linear`` (huggingface/peft#3711). Such dropped linears are targeted by their weight
instead (``target_parameters=["gate_proj.weight", ...]``), which that conversion leaves alone:
PEFT wraps each in a ``lora.ParamWrapper`` whose delta is exactly ``lora.Linear``'s, under the
same parameter names, so the saved adapter loads into plain PEFT (and ``apply_`` turns such a
wrapper over a quantized weight into PEFT's bitsandbytes LoRA layer, what PEFT builds when the
weights were quantized first).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ciuic.weights.model import ROUTER_NAMES


def lora_targets(model: nn.Module, *, experts: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig`` that adapt attention, MLPs and routed experts.

    Found by inspecting ``model`` (not a fixed name list): every ``nn.Linear`` inside the
    decoder (attention projections of MLA or of grouped-query attention, dense MLPs, shared
    experts; bitsandbytes layers count, so a model already quantized by Ciuic works) except
    router gates, ``lm_head`` and the embeddings; and the fused ``gate_up_proj``/``down_proj``
    of every routed-experts module, as ``target_parameters``. Linears this PEFT would drop from
    ``target_modules`` (see the module docstring) are targeted by their ``weight`` in
    ``target_parameters`` instead. PEFT's ``ParamWrapper`` (routed experts, and those linears)
    refuses dropout, so whenever ``target_parameters`` is set the result holds
    ``lora_dropout=0.0`` (passing another ``lora_dropout`` as well is a ``TypeError``).

    Args:
        model: The model before ``get_peft_model`` (plain, or already converted by Ciuic).
        experts: Also adapt the routed experts.

    Returns:
        ``{"target_modules": [...], "target_parameters": [...], "lora_dropout": 0.0}``
        (the last two only when there are parameters to target).

    Example:
        >>> import ciuic
        >>> from ciuic.demo import tiny_deepseek_v3
        >>> targets = ciuic.lora_targets(tiny_deepseek_v3())
        >>> targets["target_modules"][:3]
        ['kv_a_proj_with_mqa', 'kv_b_proj', 'o_proj']
        >>> targets["target_parameters"][:3]  # the MLPs by weight: peft#3711
        ['down_proj.weight', 'experts.down_proj', 'experts.gate_up_proj']
    """
    modules, params = _linear_names(model), _expert_params(model) if experts else []
    dropped = _dropped_by_peft(model, modules, params)
    modules = [m for m in modules if m not in dropped]
    params = sorted(params + [f"{m}.weight" for m in dropped])
    kwargs: dict[str, Any] = {"target_modules": modules}
    if params:
        kwargs.update(target_parameters=params, lora_dropout=0.0)
    return kwargs


def _linear_names(model: nn.Module) -> list[str]:
    skip = {id(m) for m in _embeddings(model)}
    expert_prefixes = [name for name, module in model.named_modules() if _is_fused_experts(module)]
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        excluded = id(module) in skip or leaf in ROUTER_NAMES or leaf == "lm_head"
        if not isinstance(module, nn.Linear) or excluded:
            continue
        if any(name.startswith(prefix + ".") for prefix in expert_prefixes):
            continue
        names.add(leaf)
    return sorted(names)


def _expert_params(model: nn.Module) -> list[str]:
    from ciuic.weights.experts import EXPERT_PARAMS

    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_fused_experts(m)}
    return sorted(f"{leaf}.{param}" for leaf in leaves for param in EXPERT_PARAMS)


def _is_fused_experts(module: nn.Module) -> bool:
    from ciuic.weights.experts import QuantizedExperts, fused_experts_layout_problem

    return isinstance(module, QuantizedExperts) or fused_experts_layout_problem(module) is None


def _embeddings(model: nn.Module) -> list[nn.Module]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def _dropped_by_peft(model: nn.Module, modules: list[str], params: list[str]) -> set[str]:
    """The ``target_modules`` PEFT's transformers-v5 config conversion would remove."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # no PEFT, or one without the conversion: nothing is rewritten
        return set()
    if not modules:
        return set()
    config = LoraConfig(target_modules=list(modules), target_parameters=list(params) or None)
    convert_peft_config_for_transformers(config, model=model, conversions=None)
    kept = set(config.target_modules or ())
    return {m for m in modules if m not in kept}
