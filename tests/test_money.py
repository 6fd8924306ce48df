"""Amounts: decimal strings on the wire, integers of ISO 4217 minor units inside."""

from __future__ import annotations

import pytest

from schemas.outcomes import Reason
from streams.core.money import (
    AMOUNT_MINOR_MAX,
    BALANCE_MINOR_MAX,
    AmountError,
    canonical_balance_minor,
    canonical_minor,
    format_amount,
    parse_amount_minor,
)


@pytest.mark.parametrize(
    ("text", "currency", "amount_minor"),
    [
        ("12.34", "USD", 1234),
        ("12.3", "USD", 1230),
        ("12", "USD", 1200),
        ("0.01", "USD", 1),
        ("1000", "JPY", 1000),
        ("1", "JPY", 1),
        ("1.234", "BHD", 1234),
        ("0.001", "BHD", 1),
        ("2.5", "BHD", 2500),
        ("0.0001", "UYW", 1),
        ("100000000000.00", "USD", 10_000_000_000_000),
    ],
)
def test_decimal_strings_parse_to_minor_units_of_the_currency(text: str, currency: str, amount_minor: int) -> None:
    assert parse_amount_minor(text, currency) == amount_minor


def test_the_documented_maximum_is_accepted_and_one_minor_unit_more_is_not() -> None:
    largest = format_amount(AMOUNT_MINOR_MAX, "USD")
    assert parse_amount_minor(largest, "USD") == AMOUNT_MINOR_MAX
    with pytest.raises(AmountError) as raised:
        parse_amount_minor(format_amount(AMOUNT_MINOR_MAX + 1, "USD"), "USD")
    assert raised.value.reason == Reason.INVALID_AMOUNT
    assert "maximum" in raised.value.detail


@pytest.mark.parametrize(
    ("text", "currency", "detail_word"),
    [
        ("1e3", "USD", "exponent"),
        ("1E3", "USD", "exponent"),
        ("1.5e2", "USD", "exponent"),
        ("-5", "USD", "positive"),
        ("-0.01", "USD", "positive"),
        ("0", "USD", "greater than zero"),
        ("0.00", "USD", "greater than zero"),
        ("0", "JPY", "greater than zero"),
        ("1.001", "USD", "decimal places"),
        ("1.000", "USD", "decimal places"),
        ("1.5", "JPY", "decimal places"),
        ("1.0", "JPY", "decimal places"),
        ("1.2345", "BHD", "decimal places"),
        ("", "USD", "empty"),
        ("   ", "USD", "empty"),
        ("\t\n", "USD", "empty"),
        (" 1.00", "USD", "plain decimal"),
        ("1.00 ", "USD", "plain decimal"),
        ("+1", "USD", "plain decimal"),
        ("1.", "USD", "plain decimal"),
        (".5", "USD", "plain decimal"),
        ("01", "USD", "plain decimal"),
        ("1,000", "USD", "plain decimal"),
        ("1_000", "USD", "plain decimal"),
        ("NaN", "USD", "plain decimal"),
        ("inf", "USD", "plain decimal"),
        ("0x10", "USD", "plain decimal"),
        ("١٢", "USD", "plain decimal"),  # Arabic-Indic digits: str.isdigit() would accept them
        ("12" + "0" * 30, "USD", "plain decimal"),
    ],
)
def test_amounts_that_are_not_plain_positive_decimals_are_invalid(text: str, currency: str, detail_word: str) -> None:
    with pytest.raises(AmountError) as raised:
        parse_amount_minor(text, currency)
    assert raised.value.reason == Reason.INVALID_AMOUNT
    assert detail_word in raised.value.detail


@pytest.mark.parametrize("value", [1000, 1e3, 12.5, None, b"12", ["1"]])
def test_amounts_that_are_not_strings_are_invalid(value: object) -> None:
    with pytest.raises(AmountError) as raised:
        parse_amount_minor(value, "USD")
    assert raised.value.reason == Reason.INVALID_AMOUNT


@pytest.mark.parametrize("currency", ["XYZ", "usd", "", "XAU", None])
def test_unknown_currencies_are_refused_before_the_amount_is_read(currency: object) -> None:
    with pytest.raises(AmountError) as raised:
        parse_amount_minor("1", currency)
    assert raised.value.reason == Reason.UNKNOWN_CURRENCY


@pytest.mark.parametrize(
    ("amount_minor", "currency", "text"),
    [
        (1234, "USD", "12.34"),
        (5, "USD", "0.05"),
        (0, "USD", "0.00"),
        (-1230, "USD", "-12.30"),
        (1000, "JPY", "1000"),
        (0, "JPY", "0"),
        (1234, "BHD", "1.234"),
        (7, "BHD", "0.007"),
    ],
)
def test_format_writes_exactly_the_currency_decimal_places(amount_minor: int, currency: str, text: str) -> None:
    assert format_amount(amount_minor, currency) == text
    if amount_minor > 0:
        assert canonical_minor(text, currency) == amount_minor
    if amount_minor >= 0:
        assert canonical_balance_minor(text, currency) == amount_minor


@pytest.mark.parametrize(
    ("text", "currency"),
    [("12.3", "USD"), ("12", "USD"), ("1.0", "JPY"), ("", "USD"), ("1.23x", "USD"), (".50", "USD")],
)
def test_canonical_reading_refuses_what_the_core_never_writes(text: str, currency: str) -> None:
    with pytest.raises(ValueError):
        canonical_minor(text, currency)


@pytest.mark.parametrize(
    ("text", "currency"),
    [
        ("-5.00", "USD"),
        ("0.00", "USD"),
        ("-0.00", "USD"),
        ("-.50", "USD"),
        ("00005.00", "USD"),
        ("0", "JPY"),
        ("-1", "JPY"),
        ("05", "JPY"),
        ("+5.00", "USD"),
        ("5.00", "XYZ"),
        ("5.00", None),
        (format_amount(AMOUNT_MINOR_MAX + 1, "USD"), "USD"),
    ],
)
def test_canonical_amounts_are_positive_without_sign_or_leading_zero(text: str, currency: str) -> None:
    # A saga leg of "-5.00" once took money from its receiver; "0.00" and "00005.00" were read too.
    with pytest.raises(ValueError):
        canonical_minor(text, currency)


def test_canonical_balances_may_be_zero_but_never_negative_or_above_the_cap() -> None:
    assert canonical_balance_minor("0.00", "USD") == 0
    for text in ("-0.01", "-0.00", "00.00", format_amount(BALANCE_MINOR_MAX + 1, "USD")):
        with pytest.raises(ValueError):
            canonical_balance_minor(text, "USD")
