"""The precision a priced step runs in: the forward under 16-bit autocast, or as the weights are.

``"mixed"`` is what a GPU QLoRA run on a 16-bit checkpoint usually does: the Hugging Face
``Trainer`` with ``bf16=True``/``fp16=True`` and Lightning's ``precision="bf16-mixed"`` run the
forward under ``torch.autocast``, so PEFT's float32 adapters compute in the model's dtype and
PEFT skips its float32 copy of each adapted layer's input (``requires_conversion = not
torch.is_autocast_enabled()`` in ``peft.tuners.lora``). At 4,096 tokens of
DeepSeek-R1-Distill-Qwen-7B that copy of the MLP's input alone is 4,096 x 18,944 float32 values, 296 MiB.

``"true"`` runs the step with no autocast, as a plain PyTorch loop does.

Fake CPU tensors stand for CUDA ones, so under ``"mixed"`` CPU autocast does the casting and
CUDA's autocast flag is raised as well: ``torch.is_autocast_enabled()`` (CUDA's, which is what
PEFT asks) then answers as it would on the GPU. Autocast in a 32-bit model's dtype casts
nothing, so ``"mixed"`` and ``"true"`` price a float32 model alike.

>>> import torch
>>> mixed = StepPrecision("mixed", torch.bfloat16, torch.device("cpu"))
>>> with mixed.step(), mixed.forward():
...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.is_autocast_enabled()
(torch.bfloat16, True)
>>> torch.is_autocast_enabled()
False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ciuic.errors import ConfigError

PRECISIONS = ("mixed", "true")
"""The precisions a step can be priced in (see the module docstring)."""

HALF = (torch.bfloat16, torch.float16)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision={precision!r} is not allowed. Allowed: 'mixed' (the forward under autocast in "
            f"the model's 16-bit dtype: HF bf16=True, Lightning 'bf16-mixed') or 'true' (no autocast)."
        )


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class StepPrecision:
    """The contexts a priced step runs in: :meth:`step` around forward and backward,
    :meth:`forward` around the forward (both do nothing under ``"true"`` or a 32-bit dtype)."""

    def __init__(self, precision: str, dtype: torch.dtype, device: torch.device) -> None:
        check_precision(precision)
        self.mixed = precision == "mixed" and dtype in HALF
        self.dtype, self.device = dtype, device

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """On fake CPU tensors under ``"mixed"``: CUDA's autocast flag, raised for the whole step,
        since a checkpointed block's recompute in backward runs under the autocast its forward
        had (``torch.utils.checkpoint`` restores the autocast of the inputs' device)."""
        if not self.mixed or self.device.type == "cuda":
            yield
            return
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", self.dtype)
        try:
            yield
        finally:
            torch.set_autocast_enabled("cuda", enabled)
            torch.set_autocast_dtype("cuda", dtype)

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        if not self.mixed:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield
