"""PyTorch Lightning adapter for Ciuic (``CiuicStrategy``): translates Lightning hooks into
``ciuic`` calls. The strategy itself is not built yet; this package is importable so that
projects can depend on it."""

__all__: list[str] = []
