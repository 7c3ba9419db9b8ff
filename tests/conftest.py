import pytest
import torch

from ciuic.logging_filters import quiet_bitsandbytes

# Before anything imports bitsandbytes (peft and transformers do): it logs a known line on import.
# Known third-party *warnings* are filtered in pyproject.toml's [tool.pytest.ini_options].
quiet_bitsandbytes()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same RNG state, so its figures are the same on every run."""
    torch.manual_seed(0)
