"""Building the model a pricing runs: on ``meta`` (no storage, no random initialization) for
fake tensors, or for real; wrapped with PEFT LoRA when asked.

PEFT cannot wrap a model whose tensors are already fake, so the order is: build on ``meta``,
wrap, then :func:`materialize_` inside ``FakeTensorMode`` (what ``Module.to_empty`` does, with
fake storages on the target device).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ciuic.errors import ConfigError

from .attention import use_fused_attention_

ModelSource = Callable[[], nn.Module] | Any
"""A function returning the model, or a Hugging Face ``PretrainedConfig`` of a causal LM."""

LORA_TARGET_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Module names an integer ``lora`` rank targets (those the model has): the attention and MLP
projections of Llama/Qwen2 and of DeepSeek-V2/V3 (MLA); never router gates or the head."""


def build_model(
    source: ModelSource,
    *,
    lora: int | Callable[[nn.Module], nn.Module] | None,
    meta: bool,
    attention: str = "as_run",
) -> nn.Module:
    """The model to price: built from ``source``, LoRA-wrapped, on ``meta`` when ``meta``;
    ``attention="fused"`` switches a transformers model to :data:`ciuic.planner.attention.FUSED`
    (see :func:`ciuic.planner.price`).

    Example:
        >>> from transformers import Qwen2Config
        >>> small = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128,
        ...                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> next(build_model(small, lora=4, meta=True).parameters()).device
        device(type='meta')
    """
    builder = _builder(source)
    if meta:
        with torch.device("meta"):
            model = builder()
    else:
        model = builder()
    if attention == "fused" and not use_fused_attention_(model):
        raise ConfigError(
            f"attention='fused' needs a transformers model (set_attn_implementation); got "
            f"{type(model).__name__}. Allowed for other models: attention='as_run'."
        )
    return _with_lora(model, lora)


def materialize_(model: nn.Module, device: torch.device) -> nn.Module:
    """Give every parameter and buffer of a ``meta`` model an (uninitialized) storage on
    ``device``, in place, keeping shapes, strides, dtypes and ``requires_grad``.

    Inside ``FakeTensorMode`` the storages are fake: a full-size model costs nothing.
    ``Module.to_empty`` cannot do this under fake mode (its ``empty_like`` takes the meta
    tensor as an input, which fake mode refuses).
    """

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device)

    materialized: nn.Module = model._apply(empty)
    return materialized


def fake_model(
    source: ModelSource,
    *,
    lora: int | Callable[[nn.Module], nn.Module] | None = None,
    device: str | torch.device = "cpu",
    attention: str = "as_run",
) -> nn.Module:
    """The model of ``source`` on fake tensors of the active ``FakeTensorMode``, LoRA-wrapped.

    The supported order: build on ``meta`` (random initialization skipped), wrap with PEFT
    (which cannot wrap fake tensors), then give every tensor a fake storage on ``device``.

    Example:
        >>> import torch
        >>> from torch._subclasses.fake_tensor import FakeTensorMode
        >>> from transformers import Qwen2Config
        >>> small = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128,
        ...                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> with FakeTensorMode():
        ...     model = fake_model(small, lora=4)
        >>> type(model.base_model.model.lm_head.weight).__name__
        'FakeTensor'
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if detect_fake_mode() is None:
        raise RuntimeError("fake_model needs an active FakeTensorMode: call it inside one.")
    with unset_fake_temporarily():
        model = build_model(source, lora=lora, meta=True, attention=attention)
    return materialize_(model, torch.device(device))


def extrapolation_layers(source: ModelSource, config: Any) -> tuple[int, int, int, int] | None:
    """``(n1, n2, n3, full)`` decoder-layer counts to price ``source`` from, or ``None`` to price
    it whole: only Hugging Face configs can be built shorter, and only a depth-independent
    checkpointing choice keeps the figures affine in the depth."""
    if not _is_hf_config(source) or config.checkpointing not in ("none", "full"):
        return None
    full = getattr(source, "num_hidden_layers", None)
    first = getattr(source, "first_k_dense_replace", 0) or 0  # DeepSeek: dense layers, then MoE
    # From two blocks past the dense ones: with one, the loss's transients and the first block's
    # overlap differently (measured at 7B: the temporaries grow 38 MB from 1 to 2 blocks, then
    # 8.4 MB per block).
    if not isinstance(full, int) or full <= first + 5:
        return None
    return first + 2, first + 3, first + 4, full


def with_layers(source: Any, layers: int) -> Any:
    """A copy of a Hugging Face config with ``layers`` decoder layers (per-layer lists cut)."""
    short = copy.deepcopy(source)
    full = short.num_hidden_layers
    for name, value in vars(short).items():
        if isinstance(value, list) and len(value) == full:
            setattr(short, name, value[:layers])
    short.num_hidden_layers = layers
    return short


def _builder(source: ModelSource) -> Callable[[], nn.Module]:
    if callable(source) and not _is_hf_config(source):
        return source
    if _is_hf_config(source):
        return lambda: _from_hf_config(source)
    raise TypeError(
        f"cannot price {type(source).__name__}: pass a function returning the model or a "
        f"transformers PretrainedConfig."
    )


def _is_hf_config(source: object) -> bool:
    return any(cls.__name__ in ("PreTrainedConfig", "PretrainedConfig") for cls in type(source).__mro__)


def _from_hf_config(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None) or torch.float32
    model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _with_lora(model: nn.Module, lora: int | Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    if lora is None:
        return model
    if callable(lora):
        return lora(model)
    from peft import LoraConfig, get_peft_model

    present = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    targets = [name for name in LORA_TARGET_NAMES if name in present]
    wrapped: nn.Module = get_peft_model(
        model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=targets)
    )
    return wrapped
