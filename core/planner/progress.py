"""The progress output of ``ciuic plan``: a bar on a terminal, one line per pricing otherwise.

>>> import io
>>> from ciuic import CiuicConfig
>>> from ciuic.planner import Candidate
>>> out = io.StringIO()
>>> with PlanProgress(out) as progress:
...     progress(1, Candidate(CiuicConfig(), 2**30, {}, True, 1.0, 2.5))
>>> out.getvalue()
'ciuic plan: priced 1: off, peak 1.00 GiB, fits (2.5 s)\\n'
"""

from __future__ import annotations

from typing import Any, TextIO

from .plan_result import GIB, Candidate


class PlanProgress:
    """Reports each pricing of a search to ``stream`` (``plan(progress=...)``)."""

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> PlanProgress:
        if self.enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="ciuic plan: pricing", unit=" configs", file=self.stream)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, done: int, candidate: Candidate) -> None:
        if not self.enabled:
            return
        verdict = "fits" if candidate.fits else "does not fit"
        text = f"{candidate.label()}, peak {candidate.peak_bytes / GIB:.2f} GiB, {verdict}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            print(
                f"ciuic plan: priced {done}: {text} ({candidate.seconds:.1f} s)", file=self.stream, flush=True
            )
