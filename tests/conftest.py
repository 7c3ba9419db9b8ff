import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same RNG state, so its figures are the same on every run."""
    torch.manual_seed(0)


# Third-party deprecation chatter that says nothing about ciuic.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
warnings.filterwarnings(
    "ignore", message="The following .*_pattern keys did not match", category=RuntimeWarning
)
