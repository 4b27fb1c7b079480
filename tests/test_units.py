"""Tests of size parsing and formatting (registry.units)."""

from __future__ import annotations

import pytest

from registry.units import GB, GIB, MB, MIB, format_size, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2GB", 2 * GB),
        ("2gb", 2 * GB),
        ("2 GB", 2 * GB),
        ("2GiB", 2 * GIB),
        ("2G", 2 * GIB),
        ("2g", 2 * GIB),
        ("1500MB", 1500 * MB),
        ("512MiB", 512 * MIB),
        ("512M", 512 * MIB),
        ("2.5GB", 2_500_000_000),
        (".5GiB", GIB // 2),
        ("1024", 1024),
        ("1024B", 1024),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1TB", 10**12),
        ("1TiB", 1 << 40),
        ("0", 0),
    ],
)
def test_parse_size_forms(text, expected):
    assert parse_size(text) == expected


def test_parse_size_gb_is_decimal():
    assert parse_size("1GB") == 1_000_000_000
    assert parse_size("1GiB") == 1_073_741_824


def test_parse_size_fraction_rounds_down():
    assert parse_size("1.5B") == 1


@pytest.mark.parametrize("text", ["banana", "", "GB", "2 G B", "2XB", "1e9", "2,5GB", "--1GB", "nan", "inf"])
def test_parse_size_malformed_shows_forms(text):
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    message = str(caught.value)
    assert f"'{text}'" in message
    assert "2GB" in message
    assert "2GiB" in message


@pytest.mark.parametrize("text", ["-1GB", "-0.5G", "-3"])
def test_parse_size_negative_rejected(text):
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert "negative" in str(caught.value)


def test_parse_size_overflow_rejected():
    with pytest.raises(ValueError) as caught:
        parse_size("9" * 400 + "TB")
    assert "too large" in str(caught.value)


@pytest.mark.parametrize(
    "size,text",
    [
        (512, "0.5 KiB"),
        (300 * MIB, "300 MiB"),
        (2 * GIB, "2.00 GiB"),
        (2 * GB, "1.86 GiB"),
        (-2 * GIB, "-2.00 GiB"),
    ],
)
def test_format_size(size, text):
    assert format_size(size) == text
