"""Frozen-weight compression: ``CiuicConfig(weights="nf4" | "fp4" | "int8")``.

Converts the frozen base weights of a model that is already built (or already wrapped by
PEFT) in place, so a LoRA job becomes a QLoRA job without changing how the model is loaded:
``nn.Linear`` layers become bitsandbytes ``Linear4bit``/``Linear8bitLt`` (PEFT then uses its
bitsandbytes LoRA layers), DeepSeek's fused routed experts become
:class:`QuantizedExperts` (block-wise storage, dequantized one expert at a time), and
``remove_`` dequantizes everything back to dense layers. ``weights=`` also takes a mapping of
:class:`WeightOptions` fields: double quantization, modules to freeze, magnitude pruning, and
block-wise 8-bit/NF4 storage of a frozen ``lm_head`` and input embeddings
(``weights={"format": "nf4", "head": "int8", "embeddings": "int8"}``).
:func:`dense_state_dict` exports the dequantized weights under the plain model's names.

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

from torch import nn

from ciuic.api import apply_technique_
from ciuic.config import CiuicConfig, register_field
from ciuic.errors import ConfigError
from ciuic.registry import Applied, Technique, register_technique

from .experts import QuantizedExperts, fused_experts_layout_problem
from .export import dense_state_dict
from .functional import Codec, frozen_linear, snr_db, storage_bytes
from .linear import dequantize_linear, quantize_linear
from .model import dense_weights
from .model import quantize_ as convert_weights
from .options import FORMATS, WeightOptions
from .prune import PrunedLinear, magnitude_mask
from .tables import QuantizedEmbedding, QuantizedHead

__all__ = [
    "FIELD",
    "FORMATS",
    "Codec",
    "PrunedLinear",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedHead",
    "WeightOptions",
    "convert_weights",
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


def quantize_(model: nn.Module, options: WeightOptions) -> Applied:
    """Shim kept for existing code: ``ciuic.apply_(model, CiuicConfig(weights=options))``.

    Returns the weights record of the handle ``apply_`` stored on the model; its ``undo()`` is
    ``ciuic.remove_(model)``. Applying again, through this or ``apply_``, is refused.
    """
    if not options.enabled:
        raise ConfigError(
            "format='none' with prune=None converts nothing. Allowed: a format in 'int8', 'nf4', 'fp4', "
            "a prune pattern such as '2:4', or head/embeddings='int8' or 'nf4'."
        )
    return apply_technique_(model, CiuicConfig(weights=options), "weights")


FIELD = register_field(
    WeightOptions.field(
        "weights",
        "Storage of frozen base weights: 'none' keeps them as loaded; 'int8' (LLM.int8), 'nf4' or 'fp4' "
        "(4-bit, QLoRA) quantize them in place with bitsandbytes.",
        allowed="'none', 'int8', 'nf4', 'fp4'",
        order=10,
        # max also stores a frozen lm_head and the input embeddings in 8 bits: at 7B they are 2.03
        # of the 5.52 GiB of NF4 weights (issue #10, 9b).
        presets={
            "balanced": WeightOptions(format="nf4"),
            "max": WeightOptions(format="nf4", head="int8", embeddings="int8"),
        },
    )
)

TECHNIQUE = register_technique(
    Technique(
        name="weights",
        fields=("weights",),
        order=10,
        is_requested=lambda config: bool(config.weights.enabled),
        apply=lambda model, config: convert_weights(model, config.weights),
        examples=({"weights": "nf4"}, {"weights": "int8"}),
    )
)
"""The registered technique: ``weights=...`` converts the model's frozen weights in place."""
