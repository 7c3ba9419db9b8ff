"""Frozen-weight compression: ``CiuicConfig(weights="nf4" | "fp4" | "int8")``.

Converts the frozen base weights of a model that is already built (or already wrapped by
PEFT) in place, so a LoRA job becomes a QLoRA job without changing how the model is loaded:
``nn.Linear`` layers become bitsandbytes ``Linear4bit``/``Linear8bitLt`` (PEFT then uses its
bitsandbytes LoRA layers), DeepSeek's fused routed experts become
:class:`QuantizedExperts` (block-wise storage, dequantized one expert at a time), and
``remove_`` dequantizes everything back to dense layers. :func:`quantize_` with
:class:`WeightOptions` adds double quantization, modules to freeze,
magnitude pruning, and block-wise 8-bit/NF4 storage of a frozen ``lm_head`` and input
embeddings (``head=``/``embeddings=``). :func:`dense_state_dict` exports the dequantized
weights under the plain model's names.

Example:
    >>> import torch, ciuic
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64)).requires_grad_(False)
    >>> handle = ciuic.apply_(model, ciuic.CiuicConfig(weights="nf4"))
    >>> type(model[0]).__name__
    'Linear4bit'
    >>> _ = ciuic.remove_(model)
    >>> type(model[0]).__name__
    'Linear'
"""

from ciuic.registry import Technique, register_technique

from .experts import QuantizedExperts, fused_experts_layout_problem
from .export import dense_state_dict
from .functional import Codec, frozen_linear, snr_db, storage_bytes
from .linear import dequantize_linear, quantize_linear
from .model import dense_weights, quantize_
from .options import FORMATS, WeightOptions
from .prune import PrunedLinear, magnitude_mask
from .tables import QuantizedEmbedding, QuantizedHead

__all__ = [
    "FORMATS",
    "Codec",
    "PrunedLinear",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedHead",
    "WeightOptions",
    "dense_state_dict",
    "dense_weights",
    "dequantize_linear",
    "frozen_linear",
    "fused_experts_layout_problem",
    "magnitude_mask",
    "quantize_",
    "quantize_linear",
    "snr_db",
    "storage_bytes",
]

TECHNIQUE = register_technique(
    Technique(
        name="weights",
        fields=("weights",),
        order=10,
        is_requested=lambda config: config.weights != "none",
        apply=lambda model, config: quantize_(model, WeightOptions(format=config.weights)),
    )
)
"""The registered technique: ``weights=...`` converts the model's frozen weights in place."""
