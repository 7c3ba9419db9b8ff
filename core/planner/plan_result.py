"""What ``ciuic.plan`` returns: the priced candidates and the one chosen.

>>> from ciuic import CiuicConfig
>>> c = Candidate(CiuicConfig(), peak_bytes=2**30, breakdown={"parameters": 2**30}, fits=True,
...               slowdown=1.0, seconds=0.1)
>>> p = Plan(candidates=(c,), budget=8 * 2**30, margin=2**30, seq_len=8, batch=1, lora=None)
>>> p.fits, p.predicted_peak_bytes
(True, 1073741824)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError
from ciuic.memory.meter import DEVICE_CATEGORIES

GIB = 2**30


@dataclass(frozen=True)
class Candidate:
    """One priced config.

    Attributes:
        config: The config (``CiuicConfig.from_dict(candidate.to_dict()["config"])`` gives it back).
        peak_bytes: Device bytes at the priced peak.
        breakdown: Device bytes by category at the peak (parameters, gradients, optimizer,
            activations, temporary), plus host bytes as ``offloaded``.
        fits: Whether ``peak_bytes`` is within the budget less the margin.
        slowdown: Expected step time over the plain step's (the cost model, ``ciuic.planner.cost``).
        seconds: Wall time of its pricing.
        error: Why the pricing failed (``""``: it did not); such a candidate never fits.
    """

    config: CiuicConfig
    peak_bytes: int
    breakdown: dict[str, int]
    fits: bool
    slowdown: float
    seconds: float
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the config as ``CiuicConfig.to_dict`` writes it, the bytes, fits, slowdown."""
        return {
            "config": self.config.to_dict(),
            "peak_bytes": self.peak_bytes,
            "breakdown": dict(self.breakdown),
            "fits": self.fits,
            "slowdown": round(self.slowdown, 4),
            **({"error": self.error} if self.error else {}),
        }

    def label(self) -> str:
        from .knobs import knobs_of

        return knobs_of(self.config).label()


@dataclass(frozen=True)
class Plan:
    """The planner's answer.

    Attributes:
        candidates: Every priced config, in the order priced.
        budget: The budget in bytes.
        margin: Bytes of the budget kept for what a fake step cannot see (``ciuic.planner.margin``).
        seq_len, batch, lora: The step priced.
        precision: ``'mixed'`` (forward under 16-bit autocast) or ``'true'``
            (:mod:`ciuic.planner.precision`).
        skipped: Grid points not priced: their weights alone exceed the budget, or they
            compress no more than a priced config that did not fit.
        stopped: Why the search stopped early (``""``: it did not).
        seconds: Wall time of the search.
    """

    candidates: tuple[Candidate, ...]
    budget: int
    margin: int
    seq_len: int
    batch: int
    lora: int | None
    precision: str = "mixed"
    skipped: int = 0
    stopped: str = ""
    seconds: float = 0.0

    @property
    def chosen(self) -> Candidate | None:
        """The fitting candidate of least expected slowdown, or ``None``."""
        fitting = [c for c in self.candidates if c.fits]
        return min(fitting, key=lambda c: (c.slowdown, c.peak_bytes)) if fitting else None

    @property
    def fits(self) -> bool:
        """Whether some priced config fits the budget."""
        return self.chosen is not None

    @property
    def best(self) -> Candidate:
        """The chosen candidate, or (nothing fits) the one of lowest peak."""
        priced = [c for c in self.candidates if not c.error] or list(self.candidates)
        if not priced:
            raise ConfigError(
                f"budget={self.budget:,} B: no config was priced, the frozen weights alone of each of the "
                f"{self.skipped} candidates exceed the budget less the margin ({self.margin:,} B)."
            )
        return self.chosen or min(priced, key=lambda c: c.peak_bytes)

    @property
    def config(self) -> CiuicConfig:
        """The config to use (the lowest-peak one when nothing fits), with ``budget`` set."""
        return self.best.config.replace(budget=self.budget)

    @property
    def predicted_peak_bytes(self) -> int:
        """The priced peak of :attr:`config`."""
        return self.best.peak_bytes

    @property
    def breakdown(self) -> dict[str, int]:
        """The priced peak of :attr:`config` by category."""
        return dict(self.best.breakdown)

    def to_dict(self) -> dict[str, Any]:
        """What ``ciuic plan --json`` prints."""
        return {
            "fits": self.fits,
            "config": self.config.to_dict(),
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "breakdown": self.breakdown,
            "budget": self.budget,
            "margin_bytes": self.margin,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "lora": self.lora,
            "precision": self.precision,
            "candidates": [c.to_dict() for c in self.candidates],
            "skipped": self.skipped,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
        }

    def table(self) -> str:
        """A text table: each candidate's peak by category (GiB), fits, expected slowdown."""
        short = {
            "parameters": "params",
            "gradients": "grads",
            "optimizer": "optim",
            "activations": "acts",
            "temporary": "temp",
            "offloaded": "host",
        }
        cats = (*DEVICE_CATEGORIES, "offloaded")
        width = max([len(c.label()) for c in self.candidates] + [6])
        head = f"  {'config':<{width}} {'peak':>7}" + "".join(f"{short[c]:>7}" for c in cats)
        lines = [
            f"budget {self.budget / GIB:.2f} GiB, margin {self.margin / GIB:.2f} GiB (CUDA context, "
            f"fragmentation, NCCL: not in a fake step); {self.batch} x {self.seq_len} tokens, "
            + (f"LoRA rank {self.lora}" if self.lora is not None else "full fine-tuning")
            + (", forward under 16-bit autocast" if self.precision == "mixed" else ", no autocast"),
            head + f"{'fits':>6}{'slower':>8}",
        ]
        chosen = self.chosen
        for c in self.candidates:
            mark = "*" if c is chosen else " "
            if c.error:
                lines.append(f"{mark} {c.label():<{width}} pricing failed: {c.error}")
                continue
            cells = "".join(f"{c.breakdown.get(cat, 0) / GIB:>7.2f}" for cat in cats)
            lines.append(
                f"{mark} {c.label():<{width}} {c.peak_bytes / GIB:>7.2f}{cells}"
                f"{'yes' if c.fits else 'no':>6}{c.slowdown:>7.2f}x"
            )
        lines.append(self._footer())
        return "\n".join(lines)

    def _footer(self) -> str:
        notes = [f"{len(self.candidates)} priced, {self.skipped} skipped unpriced, {self.seconds:.0f} s"]
        if self.stopped:
            notes.append(self.stopped)
        notes.append("slowdown: cost model calibrated on the bench scripts (ciuic.planner.cost)")
        verdict = "* chosen" if self.fits else "nothing fits: the lowest peak is shown as the config"
        return f"{verdict}; " + "; ".join(notes)
