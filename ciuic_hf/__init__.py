"""Hugging Face ``Trainer`` adapter for Ciuic: translates the ``Trainer``'s events into ``ciuic``
calls, and holds no technique logic.

The one-line change to a fine-tuning script::

    from ciuic_hf import CiuicCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CiuicCallback("balanced")])

See :class:`CiuicCallback` for what it does when, and :func:`optimizer_cls_and_kwargs` for a
``Trainer`` that cannot take the callback in its constructor.
"""

from ciuic.optim import CiuicAdamW

from .callback import CiuicCallback
from .checks import check_training_args
from .memory import PEAK_KEY, category_key
from .optimizer import CiuicOptimizer, optimizer_cls_and_kwargs

__all__ = [
    "PEAK_KEY",
    "CiuicAdamW",
    "CiuicCallback",
    "CiuicOptimizer",
    "category_key",
    "check_training_args",
    "optimizer_cls_and_kwargs",
]
