"""Package discovery only: `core/` installs as `ciuic`, so its subpackages are found here
instead of being listed by hand in pyproject.toml (a technique package then needs no edit there)."""

from setuptools import find_packages, setup

setup(
    packages=[
        "ciuic",
        *(f"ciuic.{name}" for name in find_packages("core")),
        *find_packages(include=["ciuic_lightning", "ciuic_lightning.*", "ciuic_hf", "ciuic_hf.*"]),
    ],
    package_data={"ciuic": ["py.typed"], "ciuic.planner": ["shapes/*.json"]},
)
