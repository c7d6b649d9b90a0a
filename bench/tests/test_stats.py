"""The statistics of the benchmark suite (bench.stats) and how the load is
shared out between the generator's processes (bench.loadgen)."""

from __future__ import annotations

import pytest

from bench.loadgen import split
from bench.stats import MISSING, TIMES, format_number, format_ratio, percentile, ratio


def test_percentile_interpolates_between_neighbours() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 4.0
    assert percentile(values, 0.5) == 2.5
    # position 0.99 * 3 = 2.97: 3 + 0.97 * (4 - 3)
    assert percentile(values, 0.99) == pytest.approx(3.97)


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.5], 0.5) == 7.5
    assert percentile([7.5], 0.99) == 7.5


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_percentile_refuses_fractions_outside_zero_to_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="not within"):
        percentile([1.0, 2.0], fraction)


def test_percentile_refuses_no_values() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_ratio_is_none_without_both_values_or_with_a_zero_reference() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (12345.6, "12346"),
        (1234.0, "1234"),
        (123.4, "123"),
        (12.345, "12.3"),
        (1.2345, "1.23"),
        (0.045678, "0.0457"),
        (-2.5, "-2.50"),
        (0.0, "0"),
        (None, MISSING),
    ],
)
def test_format_number_keeps_three_significant_digits(value: float | None, text: str) -> None:
    assert format_number(value) == text


def test_format_ratio_appends_the_times_sign() -> None:
    assert format_ratio(0.5) == f"0.500{TIMES}"
    assert format_ratio(None) == MISSING


def test_split_shares_out_everything_larger_shares_first() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 4) == [1, 1, 0, 0]
    assert sum(split(10_000, 7)) == 10_000
    with pytest.raises(ValueError, match="at least one part"):
        split(5, 0)
