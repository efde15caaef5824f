"""Sizes as people write them, and what is refused."""

from __future__ import annotations

import pytest

from labgate.units import MAX_SIZE, format_size, parse_size


@pytest.mark.parametrize(
    ("value", "size"),
    [(1, 1), ("512M", 512 * 1024**2), ("2 GiB", 2 * 1024**3), ("1.5G", 1536 * 1024**2), (2.5, 2)],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "positive"),
        (-1, "positive"),
        (0.5, "positive"),
        (float("nan"), "positive"),
        (float("inf"), "at most 1 EiB"),
        (10**400, "at most 1 EiB"),
        ("9" * 400, "at most 1 EiB"),
        (MAX_SIZE + 1, "at most 1 EiB"),
        ("lots", "a size such as"),
        (True, "a size such as"),
    ],
)
def test_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (2 * 1024**3, "2 GiB"),
        (512 * 1024**2, "512 MiB"),
        (1536 * 1024**2, "1.5 GiB"),
        (3 * 1024**4, "3 TiB"),
        (4096, "4 KiB"),
        (100, "100 bytes"),
    ],
)
def test_sizes_are_shown_as_people_write_them(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text.replace(" bytes", "")) == size
