"""``ciuic.plan``: the cheapest config, in expected step time, whose priced peak fits a budget.

The search prices configs (:func:`ciuic.planner.price`: one real training step, twice, of the
full-size model on fake tensors) in two phases over the grid of :mod:`ciuic.planner.knobs`:

1. the *ladder*: from the plain config, each config one technique more compressed than the one
   before, the technique chosen to shrink the largest category of the last peak (:data:`MOVES`),
   priced until one fits;
2. the grid points cheaper than that one by the cost model (:mod:`ciuic.planner.cost`), in order
   of expected step time (the most compressed first among those within :data:`BUCKET` of each
   other), each priced unless it is *dominated*: compressing no more than a config that was
   priced and did not fit. The first that fits is the answer.

A config whose frozen weights alone exceed the budget is skipped unpriced
(:func:`ciuic.planner.floor.weight_floor`). A budget fits a peak when the peak is at most
``budget - margin_bytes(budget)`` (:mod:`ciuic.planner.margin`: the CUDA context, allocator
fragmentation and NCCL buffers are not in a fake step).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ciuic.config import CiuicConfig
from ciuic.errors import ConfigError
from ciuic.units import parse_bytes

from .cost import slowdown
from .floor import weight_floor
from .knobs import FIELD_KNOBS, LEVELS, Knobs, grid, knobs_of
from .margin import margin_bytes
from .plan_result import Candidate, Plan
from .precision import check_precision, model_dtype
from .pricing import LoraSpec
from .shapes import empty_model, load_shape

MOVES: dict[str, tuple[tuple[str, int], ...]] = {
    "parameters": (("weights", 1), ("weights", 2)),
    "activations": (("checkpointing", 1), ("codec", 2), ("offload_activations", 1)),
    "temporary": (("loss", 1), ("codec", 1)),
    "optimizer": (("optimizer", 1), ("optimizer", 2), ("offload_optimizer", 1)),
    "gradients": (("step_in_backward", 1),),
}
"""Phase 1: the techniques that shrink each category of a peak, the cheapest first; each move
sets a knob to at least that rank."""

BUCKET = 0.01
"""Configs whose expected slowdowns differ by less than this are taken as equally fast."""

DEVICE = "cpu"
"""Device of the fake tensors: fake CPU tensors (the CPU build of torch aborts on backward through
fake CUDA leaf tensors); the bytes counted are the same."""

Progress = Callable[[int, Candidate], None]
"""Called after each pricing with the number priced so far and the candidate priced."""


def plan(
    model_or_shape: Any,
    *,
    seq_len: int,
    batch: int,
    budget: int | str,
    lora: LoraSpec = 16,
    candidates: Iterable[CiuicConfig] | None = None,
    max_pricings: int = 12,
    refine: int = 2,
    precision: str = "mixed",
    config: CiuicConfig | None = None,
    margin: int | None = None,
    progress: Progress | None = None,
) -> Plan:
    """The cheapest config, by the cost model, whose priced peak fits ``budget`` (pure).

    Args:
        model_or_shape: A shipped shape name (``"deepseek-r1-distill-qwen-7b"``, see
            ``ciuic.planner.SHAPES``), a ``config.json`` path or its folder, a transformers
            config, or a loaded transformers model (left as it is: its config is priced).
        seq_len: Tokens per sample.
        batch: Samples per step.
        budget: Accelerator bytes, or a string like ``"8GiB"``; a config fits when its priced
            peak is at most ``budget - margin_bytes(budget)``.
        lora: LoRA rank (adapters on the attention and MLP projections), a function wrapping the
            model in PEFT (a ``.rank`` attribute names its rank in the table), or ``None`` for
            full fine-tuning (then ``weights`` stays ``'none'``: no weight is frozen).
        candidates: Price exactly these configs, in this order, instead of searching (each is
            priced; the plan picks the fitting one of least expected slowdown).
        max_pricings: Stop the search after this many pricings (the plan says so).
        refine: At most this many pricings of phase 2 (configs rated faster than the first fit);
            0 stops at the first fit. Each pricing of a full-size shape takes a minute or more on
            a 2-core CPU, so the default stays small.
        precision: ``'mixed'``: the forward under autocast in the model's 16-bit dtype, as a GPU
            QLoRA run does (HF ``bf16=True``, Lightning ``'bf16-mixed'``); ``'true'``: no
            autocast (:mod:`ciuic.planner.precision`).
        config: Search only the fields this config leaves to the planner (``"auto"``), the
            others priced as given: ``CiuicConfig(budget="8GiB", weights="auto")`` (what a
            run-time ``"auto"`` does at the first step, :mod:`ciuic.planner.runtime`).
        margin: Bytes of the budget kept for what a fake step cannot see; default
            ``margin_bytes(budget)`` (a CUDA device's, :mod:`ciuic.planner.margin`).
        progress: Called after each pricing (the CLI's progress bar).

    Returns:
        A :class:`Plan`: ``fits``, ``config``, ``predicted_peak_bytes``, ``breakdown``,
        ``candidates`` (each priced config), ``table()``.

    Example:
        >>> import ciuic
        >>> p = ciuic.plan("deepseek-r1-distill-qwen-1.5b", seq_len=512, batch=1, budget="24GiB")
        ... # doctest: +SKIP
        >>> p.fits, p.config.to_dict()["weights"]  # doctest: +SKIP
        (True, 'none')
    """
    limit = parse_bytes(budget, field="budget")
    _check_positive(seq_len=seq_len, batch=batch, max_pricings=max_pricings)
    check_precision(precision)
    source = _source(model_or_shape)
    search = _Search(
        source,
        seq_len=seq_len,
        batch=batch,
        budget=limit,
        lora=lora,
        precision=precision,
        around=config,
        margin=margin_bytes(limit) if margin is None else margin,
        progress=progress,
    )
    started = time.perf_counter()
    if candidates is not None:
        search.price_all(list(candidates))
    else:
        search.run(max_pricings, refine)
    return search.result(time.perf_counter() - started)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} is not allowed. Allowed: an int >= 1.")


def _source(model_or_shape: Any) -> Any:
    """What ``price`` builds from: a transformers config (a copy, in the model's dtype)."""
    if isinstance(model_or_shape, nn.Module):
        config = getattr(model_or_shape, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise ConfigError(
                f"model={type(model_or_shape).__name__} has no transformers config: pass a transformers "
                f"causal LM, its config, a config.json path or a shipped shape name."
            )
        config = copy.deepcopy(config)
        config.dtype = model_dtype(model_or_shape)
        return config
    if isinstance(model_or_shape, (str, Path)) or hasattr(model_or_shape, "to_dict"):
        return load_shape(model_or_shape)
    raise ConfigError(
        f"model={model_or_shape!r} is not allowed. Allowed: a shipped shape name, a config.json path or "
        f"folder, a transformers config or a transformers causal LM."
    )


class _Search:
    """The state of one search: what was priced, what did not fit."""

    def __init__(
        self,
        source: Any,
        *,
        seq_len: int,
        batch: int,
        budget: int,
        lora: LoraSpec,
        precision: str,
        around: CiuicConfig | None,
        margin: int,
        progress: Progress | None,
    ) -> None:
        self.source, self.seq_len, self.batch, self.budget, self.lora = source, seq_len, batch, budget, lora
        self.precision = precision
        self.base = around.without_auto() if around is not None else None
        self.planned = around.planned() if around is not None else ()
        self.vary = {knob for name in self.planned for knob in FIELD_KNOBS[name]} if around else set(LEVELS)
        self.start = knobs_of(self.base) if self.base is not None else Knobs()
        self.start = dataclasses.replace(self.start, **{knob: 0 for knob in self.vary})
        self.margin = margin
        self.usable = budget - margin
        self.progress = progress
        self.priced: list[Candidate] = []
        self.failed: list[Knobs] = []
        self.skipped = 0
        self.stopped = ""
        self.last_move: tuple[str, int] = ("", 0)
        meta = empty_model(source)
        ranks = range(3) if lora is not None else range(1)
        self.floors = {rank: weight_floor(meta, weights_rank=rank) for rank in ranks}

    def run(self, max_pricings: int, refine: int) -> None:
        best = self._ladder(max_pricings)
        max_pricings = min(max_pricings, self._count() + refine)
        if best is None or self.stopped:
            return
        limit = slowdown(best)
        cheaper = [
            k
            for k in grid(quantize_weights=self.lora is not None)
            if slowdown(k) < limit and self._reachable(k)
        ]
        cheaper.sort(key=lambda k: (round(slowdown(k) / BUCKET), -sum(k.ranks())))
        for knobs in cheaper:
            if self._count() >= max_pricings:
                self.stopped = f"faster configs left unpriced after {refine} refining pricings (refine)"
                return
            if self._skip(knobs):
                continue
            if self._price(knobs).fits:
                return

    def _ladder(self, max_pricings: int) -> Knobs | None:
        """Phase 1: from the plain config, shrink the largest category of each peak that does
        not fit, until one fits (or no move is left). A move whose pricing fails is not tried
        again."""
        knobs, refused = self.start, set()
        while self._count() < max_pricings:
            if self.floors[knobs.weights] > self.usable:
                self.skipped += 1
                breakdown = {"parameters": self.floors[knobs.weights]}
            else:
                candidate = self._price(knobs)
                if candidate.fits:
                    return knobs
                if candidate.error:
                    refused.add(self.last_move)
                    knobs = self.priced_before()
                breakdown = candidate.breakdown or self.last_breakdown()
            following = self._move(knobs, breakdown, refused)
            if following is None:
                return None
            knobs = following
        self.stopped = f"stopped after {max_pricings} pricings (max_pricings)"
        return None

    def _count(self) -> int:
        return sum(1 for c in self.priced if not c.error)

    def _move(self, knobs: Knobs, breakdown: dict[str, int], refused: set[tuple[str, int]]) -> Knobs | None:
        """``knobs`` with the first move available on the largest category that has one."""
        for category in sorted(MOVES, key=lambda c: -breakdown.get(c, 0)):
            for name, rank in MOVES[category]:
                if (
                    (name == "weights" and self.lora is None)
                    or (name, rank) in refused
                    or name not in self.vary
                ):
                    continue
                following = dataclasses.replace(knobs, **{name: max(rank, getattr(knobs, name))})
                if following != knobs:
                    self.last_move = (name, rank)
                    return following
        return None

    def priced_before(self) -> Knobs:
        """The last config priced without error (to step back from a failed pricing)."""
        done = [knobs_of(c.config) for c in self.priced if not c.error]
        return done[-1] if done else self.start

    def _reachable(self, knobs: Knobs) -> bool:
        """Whether ``knobs`` keeps every knob the search may not change at its start value."""
        return all(getattr(knobs, k) == getattr(self.start, k) for k in LEVELS if k not in self.vary)

    def _config(self, knobs: Knobs) -> CiuicConfig:
        """The config priced for ``knobs``: the planned fields from them, the rest as given."""
        if self.base is None:
            return knobs.config()
        chosen = knobs.config()
        return self.base.replace(**{name: getattr(chosen, name) for name in self.planned})

    def last_breakdown(self) -> dict[str, int]:
        done = [c.breakdown for c in self.priced if not c.error]
        return done[-1] if done else {}

    def _skip(self, knobs: Knobs) -> bool:
        """Whether ``knobs`` cannot fit without pricing it (weights too large, or dominated)."""
        if self.floors[knobs.weights] > self.usable or any(knobs.dominated_by(f) for f in self.failed):
            self.skipped += 1
            return True
        return False

    def price_all(self, configs: list[CiuicConfig]) -> None:
        for config in configs:
            self._record(self._full(config, knobs_of(config)))

    def _price(self, knobs: Knobs) -> Candidate:
        try:
            candidate = self._full(self._config(knobs), knobs)
        except Exception as error:  # reported in the table, never hidden: the search goes on
            candidate = Candidate(self._config(knobs), 0, {}, False, slowdown(knobs), 0.0, error=_say(error))
        self._record(candidate)
        if not candidate.fits and not candidate.error:
            self.failed.append(knobs)
        return candidate

    def _full(self, config: CiuicConfig, knobs: Knobs) -> Candidate:
        from .pricing import price

        pricing = price(
            self.source,
            config,
            seq_len=self.seq_len,
            batch=self.batch,
            lora=self.lora,
            device=DEVICE,
            precision=self.precision,
        )
        return Candidate(
            config=config,
            peak_bytes=pricing.peak_bytes,
            breakdown=dict(pricing.breakdown),
            fits=pricing.peak_bytes <= self.usable,
            slowdown=slowdown(knobs),
            seconds=pricing.seconds,
        )

    def _record(self, candidate: Candidate) -> None:
        self.priced.append(candidate)
        if self.progress is not None:
            self.progress(len(self.priced), candidate)

    def result(self, seconds: float) -> Plan:
        return Plan(
            candidates=tuple(self.priced),
            budget=self.budget,
            margin=self.margin,
            seq_len=self.seq_len,
            batch=self.batch,
            lora=self.lora
            if isinstance(self.lora, int) or self.lora is None
            else getattr(self.lora, "rank", None),
            precision=self.precision,
            skipped=self.skipped,
            stopped=self.stopped,
            seconds=seconds,
        )


def _say(error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:160]
