"""units.py: the one syntax for sizes and durations, parsed and shown."""

from __future__ import annotations

import pytest

from mithrilfs.errors import UserError
from mithrilfs.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("500M", 500 << 20),
        ("50G", 50 << 30),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        ("8g", 8 << 30),
        ("2KiB", 2048),
        ("3 MB", 3 << 20),
        (" 1P ", 1 << 50),
    ],
)
def test_parse_size_reads_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1", "0", "0.1", "1X", "1e9", "1.G", "1 000"])
def test_parse_size_refuses_with_exit_2(text: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_size(text)
    assert caught.value.exit_code == 2
    assert text in str(caught.value)


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (3 << 29, "1.5 GiB"),
        (5 << 40, "5.0 TiB"),
        (2048 << 40, "2048.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size(size: int, shown: str) -> None:
    assert format_size(size) == shown


def test_format_size_in_a_fixed_unit() -> None:
    assert format_size(1 << 29, "GiB") == "0.5 GiB"
    assert format_size(3 << 40, "GiB") == "3072.0 GiB"
    assert format_size(1536, "KiB") == "1.5 KiB"


def test_a_shown_size_parses_back_to_about_itself() -> None:
    for size in (1536, 3 << 29, 7 << 40):
        number, unit = format_size(size).split()
        assert parse_size(number + unit[0]) == pytest.approx(size, rel=0.05)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("0.2", 0.2),
        ("200ms", 0.2),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 7 * 86400.0),
        ("2w", 14 * 86400.0),
        (" 1.5H ", 5400.0),
    ],
)
def test_parse_duration_one_syntax(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "1y", "5 minutes", "1e3s"])
def test_parse_duration_refuses_with_exit_2(text: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_duration(text, "--older-than")
    assert caught.value.exit_code == 2
    assert "--older-than" in str(caught.value)


def test_parse_duration_refuses_what_nanoseconds_cannot_hold() -> None:
    with pytest.raises(UserError, match="too long"):
        parse_duration("999999999999w")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (-3, "0s"), (45, "45s"), (90, "1.5m"), (5400, "1.5h"), (172800, "2.0d")],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown
