"""Hugging Face Trainer adapter for Ciuic (``CiuicCallback``): translates Trainer events into
``ciuic`` calls. The callback itself is not built yet; this package is importable so that
projects can depend on it."""

__all__: list[str] = []
