"""``nn.Linear`` to and from bitsandbytes' ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8).

The converted layers are the ones ``BitsAndBytesConfig`` would create, so PEFT recognizes
them (its ``lora.bnb`` layers) and their ``state_dict`` has bitsandbytes' own keys. Two gaps of
bitsandbytes 0.50 are closed here with ``load_state_dict`` pre-hooks on the converted layer:
``Linear4bit`` has no loader for its quantization state (transformers' quantizer usually does
that), and ``Linear8bitLt`` refuses to load once a forward has moved its scales into
``layer.state``.

Under ``FakeTensorMode`` (pricing a config, :mod:`ciuic.planner`) the same layers are built:
bitsandbytes' parameter classes cannot wrap a fake tensor, so a plain parameter holding the
packed data carries their attributes (``quant_state``, ``CB``/``SCB``), and bitsandbytes' own
fake kernels give every stored tensor its real shape and dtype; the forward and backward then
run bitsandbytes' code unchanged. What its kernels allocate inside themselves (the dense weight
of ``gemm_4bit``) is registered with the memory meter (``register_op_workspace``), for real and
fake runs alike.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch import nn

from ciuic.memory import tag_tensor
from ciuic.memory.fake import is_fake
from ciuic.memory.meter import register_op_workspace

from .functional import storage_bytes


def _gemm_4bit_workspace(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: list[int],
    *args: Any,
    absmax_8bit: torch.Tensor | None = None,
    **kwargs: Any,
) -> int:
    """What bitsandbytes' ``gemm_4bit`` kernel allocates inside itself (its default kernel, the
    one CPU and CUDA run): the dense weight in the input's dtype and, with double quantization,
    the fp32 block scales it first restores."""
    nested = 4 * absmax_8bit.numel() if absmax_8bit is not None else 0
    return math.prod(shapeB) * A.element_size() + nested


def _int8_scaled_mm_workspace(A: torch.Tensor, B: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """``int8_scaled_mm``'s default kernel (LLM.int8's CUDA training path): the int32 product
    before it is rescaled to the output dtype (``int8_mixed_scaled_mm`` calls it inside)."""
    return 4 * (A.numel() // A.shape[-1]) * B.shape[0]


register_op_workspace("bitsandbytes::gemm_4bit", _gemm_4bit_workspace)
register_op_workspace("bitsandbytes::int8_scaled_mm", _int8_scaled_mm_workspace)
register_op_workspace(
    "bitsandbytes::int8_mixed_scaled_mm", lambda A, CA, CB, *args, **kwargs: _int8_scaled_mm_workspace(CA, CB)
)


def is_bnb_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    from bitsandbytes.nn import modules as bnbm

    return isinstance(module, (bnbm.Linear4bit, bnbm.Linear8bitLt))


def quantize_linear(linear: nn.Linear, format: str, *, double_quant: bool = False) -> nn.Linear:
    """A bitsandbytes layer holding ``linear``'s weight in ``format`` and sharing its bias.

    ``linear`` itself is not changed. The new layer computes in the weight's original dtype.

    Example:
        >>> import torch
        >>> q = quantize_linear(torch.nn.Linear(64, 32), "nf4")
        >>> type(q).__name__, q(torch.randn(2, 64)).shape
        ('Linear4bit', torch.Size([2, 32]))
    """
    from bitsandbytes.nn import modules as bnbm

    weight = linear.weight.detach()
    fake = is_fake(weight)
    q: nn.Linear
    if format == "int8":
        with _real_construction(fake):
            q = bnbm.Linear8bitLt(
                linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, device="meta"
            )
        if fake:
            q.weight = _fake_int8_params(weight)
        else:
            int8 = bnbm.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            q.weight = int8._quantize(weight.device)
        q.register_load_state_dict_pre_hook(_restore_int8_scales)
        q.__dict__["ciuic_dtype"] = weight.dtype  # LLM.int8 keeps no record of it: dense_state_dict reads it
    elif format in ("nf4", "fp4"):
        with _real_construction(fake):
            q = bnbm.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=False,
                compute_dtype=weight.dtype,
                compress_statistics=double_quant,
                quant_type=format,
                device="meta",
            )
        if fake:
            q.weight = _fake_params_4bit(q, weight, format, double_quant)
        else:
            q.weight = bnbm.Params4bit(
                weight, requires_grad=False, compress_statistics=double_quant, quant_type=format, module=q
            )._quantize(weight.device)
        q.register_load_state_dict_pre_hook(_load_4bit_state)
        # bitsandbytes 0.50.2 repacks a 4-bit weight in place for its avx512-bf16 CPU kernel on
        # the first eval/no-grad forward, rounding the scales to bf16; its inverse (run by
        # state_dict()) leaves the scales transposed, so the layer then computes with wrong
        # weights (SNR measured -3 dB). Keeping the portable path keeps numerics exact.
        q.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"format={format!r} is not a bitsandbytes linear format: use 'int8', 'nf4', 'fp4'.")
    if linear.bias is not None:
        q.bias = linear.bias
    q.train(linear.training)
    # The scales are plain attributes, not parameters or buffers: tell an active MemoryMeter
    # that they belong to the weights (its registration hooks only see the packed weight).
    for tensor in _stored_tensors(q):
        tag_tensor(tensor, "parameters")
    return q


def _real_construction(fake: bool) -> contextlib.AbstractContextManager[Any]:
    """Outside FakeTensorMode while a bitsandbytes layer is built on ``meta``: its parameter
    classes (``Params4bit``, ``Int8Params``) are tensor subclasses, which cannot wrap a fake
    tensor; the fake weight replaces the meta one right after."""
    if not fake:
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _fake_params_4bit(q: nn.Module, weight: torch.Tensor, format: str, double_quant: bool) -> nn.Parameter:
    """What ``Params4bit._quantize`` makes, on fake tensors: bitsandbytes' own ``quantize_4bit``
    (its fake kernels give the packed ``((n + 1) // 2, 1)`` uint8 data, the fp32 absmax and,
    with double quantization, the 8-bit absmax and its state), held by a plain parameter that
    carries the same attributes as ``Params4bit``; ``Linear4bit.forward`` and ``matmul_4bit``
    then run unchanged."""
    import bitsandbytes.functional as bnbf

    data, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=64,
        compress_statistics=False,
        quant_type=format,
        quant_storage=torch.uint8,
    )
    if double_quant:
        # quantize_4bit's own double quantization builds its 8-bit map with .tolist(), which
        # fake tensors cannot run: the same steps, with the map made outside fake mode.
        offset = state.absmax.mean()
        code = _fake_dynamic_map()
        absmax, state2 = bnbf.quantize_blockwise(state.absmax - offset, code=code, blocksize=256)
        state = bnbf.QuantState(
            absmax=absmax,
            shape=state.shape,
            dtype=state.dtype,
            blocksize=64,
            code=state.code,
            quant_type=format,
            offset=offset,
            state2=state2,
        )
    param = nn.Parameter(data, requires_grad=False)
    attrs = {"quant_state": state, "blocksize": 64, "compress_statistics": double_quant}
    attrs |= {"quant_type": format, "quant_storage": torch.uint8, "bnb_quantized": True, "module": q}
    for name, value in attrs.items():
        setattr(param, name, value)
    q.quant_state = state  # type: ignore[assignment]  # Linear4bit keeps its QuantState here too
    return param


def _fake_dynamic_map() -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map as a fake tensor of the active fake mode."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode()
    assert fake_mode is not None, "only called under FakeTensorMode"
    return fake_mode.from_tensor(_real_dynamic_map())


@functools.cache
def _real_dynamic_map() -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        code: torch.Tensor = bnbf.create_dynamic_map()
    return code


def _fake_int8_params(weight: torch.Tensor) -> nn.Parameter:
    """What ``Int8Params._quantize`` makes, on fake tensors: int8 codes of the weight's shape and
    one fp32 scale per row (``SCB``), from bitsandbytes' ``int8_vectorwise_quant``."""
    import bitsandbytes.functional as bnbf

    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    param = nn.Parameter(codes, requires_grad=False)
    param.CB, param.SCB, param.has_fp16_weights = codes, scales, False  # type: ignore[attr-defined]
    return param


def dequantize_linear(q: Any) -> torch.Tensor:
    """The dense weight a bitsandbytes linear stores, in the dtype it was quantized from
    (LLM.int8 returns fp32: it keeps no record of the original dtype)."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import modules as bnbm

    if isinstance(q, bnbm.Linear4bit):
        weight: Any = q.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights in place for its CPU inference kernel.
            inverse = bnbm._convert_weight_packed_for_cpu_inverse  # type: ignore[attr-defined]
            data, state = inverse(data, state)
        out: torch.Tensor = bnbf.dequantize_4bit(data, state)
        return out
    if isinstance(q, bnbm.Linear8bitLt):
        code, scales = _int8_tensors(q)
        dense: torch.Tensor = bnbf.int8_vectorwise_dequant(code, scales)
        return dense
    raise TypeError(f"{type(q).__name__} is not a bitsandbytes Linear4bit or Linear8bitLt.")


def linear_storage_bytes(q: Any) -> int:
    """Bytes a bitsandbytes linear's weight really holds: packed data plus every scale."""

    return storage_bytes(*_stored_tensors(q))


def _stored_tensors(q: Any) -> list[torch.Tensor]:
    from bitsandbytes.nn import modules as bnbm

    if isinstance(q, bnbm.Linear8bitLt):
        return list(_int8_tensors(q))
    state = q.weight.quant_state
    # state.code is the 16-entry NF4/FP4 table: quantize_4bit gives each layer its own copy.
    tensors = [q.weight, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return tensors


def _int8_tensors(q: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # Linear8bitLt moves CB/SCB from the weight to layer.state on its first forward.
    code = q.weight.CB if q.weight.CB is not None else q.state.CB
    scales = q.weight.SCB if q.weight.SCB is not None else q.state.SCB
    return (q.weight.data if code is None else code), scales


def _restore_int8_scales(module: Any, *args: Any) -> None:
    weight = module.weight
    if weight.SCB is None and module.state.SCB is not None:
        weight.CB, weight.SCB = weight.data, module.state.SCB
        module.state.CB = module.state.SCB = None


def _load_4bit_state(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    import bitsandbytes.functional as bnbf

    key = f"{prefix}weight."
    stats = {name[len(key) :]: state_dict.pop(name) for name in list(state_dict) if name.startswith(key)}
    if not stats or f"{prefix}weight" not in state_dict:
        return
    weight = module.weight
    weight.quant_state = module.quant_state = bnbf.QuantState.from_dict(stats, device=weight.device)
    weight.data = torch.empty_like(state_dict[f"{prefix}weight"], device=weight.device)


def swap_lora_wrapper(wrapper: nn.Module, base: nn.Module) -> type | None:
    """Give a PEFT LoRA wrapper whose base layer was just converted to ``base`` the class PEFT
    builds over such a layer; returns the previous class (None if nothing changed).

    ``lora.Linear``, or a ``lora.ParamWrapper`` on a linear's 2-D ``weight`` (see
    :func:`is_weight_param_wrapper`), over a bitsandbytes layer becomes PEFT's ``lora.bnb``
    class for it; such a ``ParamWrapper`` over another converted linear (pruned) becomes
    ``lora.Linear``, which adds ``s*B@(A@x)`` to whatever its base layer computes.

    Why: converting after ``get_peft_model`` must give the model converting before gives. PEFT
    picks ``lora.bnb.Linear4bit``/``Linear8bitLt`` when it wraps a bitsandbytes layer, for
    ``target_modules`` and ``target_parameters`` alike; those dequantize to merge and unmerge,
    whereas ``lora.Linear.merge`` would add to the packed weight (and ``ParamWrapper`` would
    parametrize it). All these classes hold the same LoraLayer state (a 2-D ``ParamWrapper``'s
    delta is ``lora.Linear``'s), so only the class changes.
    """
    from peft.tuners.lora import layer as lora_layer

    param_wrapper = is_weight_param_wrapper(wrapper)
    if type(wrapper) is not lora_layer.Linear and not param_wrapper:
        return None
    previous = type(wrapper)
    if is_bnb_linear(base):
        from bitsandbytes.nn.modules import Linear8bitLt
        from peft.tuners.lora import bnb as lora_bnb

        int8 = isinstance(base, Linear8bitLt)
        wrapper.__class__ = lora_bnb.Linear8bitLt if int8 else lora_bnb.Linear4bit
    elif param_wrapper:
        wrapper.__class__ = lora_layer.Linear
        wrapper.__dict__.setdefault("is_target_conv_1d_layer", False)
    else:
        return None
    return previous


def is_weight_param_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's ``lora.ParamWrapper`` on the 2-D ``weight`` of the module it
    wraps directly (not nested: nothing else of that module is targeted)."""
    cls = type(module)
    if cls.__name__ != "ParamWrapper" or not cls.__module__.startswith("peft."):
        return False
    on_weight = getattr(module, "parameter_name", None) == "weight"
    nested = "ParamWrapper" in type(module.get_submodule("base_layer")).__name__
    return on_weight and getattr(module, "_param_ndim", 0) == 2 and not nested


def unswap_lora_wrapper(wrapper: nn.Module) -> None:
    """Turn PEFT's ``lora.bnb`` wrapper of a layer that is dense again into ``lora.Linear``
    (what PEFT would have built over the dense layer); other modules are left as they are."""
    cls = type(wrapper)
    if cls.__module__ != "peft.tuners.lora.bnb" or cls.__name__ not in ("Linear4bit", "Linear8bitLt"):
        return
    from peft.tuners.lora import layer as lora_layer

    wrapper.__class__ = lora_layer.Linear
    # lora.Linear reads these two; PEFT sets them in lora.Linear.__init__ (off for nn.Linear).
    wrapper.__dict__.setdefault("fan_in_fan_out", False)
    wrapper.__dict__.setdefault("is_target_conv_1d_layer", False)
