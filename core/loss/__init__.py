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

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ciuic.api import apply_technique_
from ciuic.config import CiuicConfig, register_field
from ciuic.errors import ConfigError
from ciuic.options import TechniqueOptions
from ciuic.registry import Applied, Technique, register_technique

from .functional import (
    DEFAULT_CHUNK_BYTES,
    REDUCTIONS,
    FrozenRows,
    chunk_rows,
    linear_cross_entropy,
    reference_linear_cross_entropy,
)
from .hf import apply_chunked_loss as install_chunked_loss

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "REDUCTIONS",
    "FrozenRows",
    "LossOptions",
    "apply_chunked_loss",
    "chunk_rows",
    "install_chunked_loss",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
]


@dataclass(frozen=True, kw_only=True, eq=False)
class LossOptions(TechniqueOptions):
    """How the causal-LM loss is computed (the config field ``loss``).

    Attributes:
        kind: ``'standard'`` (the model's own loss) or ``'chunked'``
            (:func:`linear_cross_entropy`, never holding the full logits).
        chunk_bytes: Byte target of one chunk's logits.
        training_logits: Also return (detached) logits in training, for trainers that read
            ``outputs.logits`` from the training forward; costs one ``(tokens, vocab)`` tensor in
            the head's dtype (never the fp32 copy, softmax or gradient). Evaluation always
            returns logits.

    Example:
        >>> LossOptions.from_value("loss", {"kind": "chunked", "chunk_bytes": 2**26}).chunk_bytes
        67108864
    """

    SHORTHAND: ClassVar[str] = "kind"
    OFF: ClassVar[str] = "standard"

    kind: str = "standard"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    training_logits: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("standard", "chunked"):
            raise ConfigError(f"kind={self.kind!r} is not allowed. Allowed: 'standard', 'chunked'.")
        if (
            isinstance(self.chunk_bytes, bool)
            or not isinstance(self.chunk_bytes, int)
            or self.chunk_bytes < 1
        ):
            raise ConfigError(
                f"chunk_bytes={self.chunk_bytes!r} is not allowed. Allowed: an int number of bytes >= 1."
            )
        if not isinstance(self.training_logits, bool):
            raise ConfigError(
                f"training_logits={self.training_logits!r} is not allowed. Allowed: True or False."
            )


def apply_chunked_loss(
    model: nn.Module, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, training_logits: bool = False
) -> Applied:
    """Shim kept for existing code: ``ciuic.apply_(model, CiuicConfig(loss={"kind": "chunked",
    "chunk_bytes": ..., "training_logits": ...}))``, returning the loss record (its ``undo()`` is
    ``ciuic.remove_``)."""
    options = LossOptions(kind="chunked", chunk_bytes=chunk_bytes, training_logits=training_logits)
    return apply_technique_(model, CiuicConfig(loss=options), "loss")


def _install(model: nn.Module, config: CiuicConfig) -> Applied:
    options = config.loss
    return install_chunked_loss(
        model, chunk_bytes=options.chunk_bytes, training_logits=options.training_logits
    )


FIELD = register_field(
    LossOptions.field(
        "loss",
        "Causal-LM loss: 'standard' (the model's own) or 'chunked' (linear + cross-entropy in chunks, "
        "never holding the full logits).",
        allowed="'standard', 'chunked'",
        order=70,
        presets={"balanced": LossOptions(kind="chunked"), "max": LossOptions(kind="chunked")},
    )
)

TECHNIQUE = register_technique(
    Technique(
        name="loss",
        fields=("loss",),
        order=20,
        is_requested=lambda config: config.loss.kind == "chunked",
        apply=_install,
        examples=({"loss": "chunked"},),
    )
)
"""The registered technique: ``loss='chunked'`` patches the model's causal-LM loss."""
