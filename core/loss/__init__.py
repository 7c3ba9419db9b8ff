"""Memory-lean causal-LM loss: ``CiuicConfig(loss="chunked")``.

The loss of a causal LM is ``cross_entropy(lm_head(hidden))``; with a 152k vocabulary its
logits, their fp32 copy, softmax and gradient dominate a fine-tuning step's memory.
:func:`linear_cross_entropy` computes the same loss and gradients chunk by chunk without ever
holding the full logits; ``ciuic.apply_`` routes a Hugging Face causal LM's ``labels`` loss
through it (:func:`apply_chunked_loss`). In training with ``labels`` the model returns
``logits=None`` (``apply_chunked_loss(..., training_logits=True)`` returns them, detached); in
evaluation (``model.eval()`` or ``torch.no_grad()``) it runs the model's own forward, logits
included, so evaluation loops and ``compute_metrics`` work unchanged.

Example:
    >>> import torch, ciuic
    >>> from transformers import Qwen2Config, Qwen2ForCausalLM
    >>> lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> handle = ciuic.apply_(lm, ciuic.CiuicConfig(loss="chunked"))
    >>> ids = torch.randint(0, 256, (2, 16))
    >>> out = lm(input_ids=ids, labels=ids)
    >>> out.loss.backward()
    >>> out.logits is None
    True
    >>> _ = ciuic.remove_(lm)
"""

from ciuic.registry import Technique, register_technique

from .functional import (
    DEFAULT_CHUNK_BYTES,
    REDUCTIONS,
    chunk_rows,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)
from .hf import apply_chunked_loss

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "REDUCTIONS",
    "apply_chunked_loss",
    "chunk_rows",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
]

TECHNIQUE = register_technique(
    Technique(
        name="loss",
        fields=("loss",),
        order=20,
        is_requested=lambda config: config.loss == "chunked",
        apply=lambda model, config: apply_chunked_loss(model),
    )
)
"""The registered technique: ``loss='chunked'`` patches the model's causal-LM loss."""
