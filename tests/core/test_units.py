import pytest

from ciuic import ConfigError
from ciuic.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "n"),
    [("1", 1), (7, 7), ("24GiB", 24 * 2**30), ("24gib", 24 * 2**30), ("80GB", 80 * 10**9),
     ("512 MiB", 512 * 2**20), ("1.5KiB", 1536), ("2TiB", 2 * 2**40), ("3kb", 3000), ("9B", 9)],
)  # fmt: skip
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["", "GiB", "1.2.3GB", "5 XB", "-1", 0, -1, True, 1.0, None, "0.5B"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError, match=f"budget={bad!r}"):
        parse_bytes(bad)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (3 * 2**30, "3.00 GiB"), (-2048, "-2.00 KiB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text
