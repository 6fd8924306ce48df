"""Amounts: decimal strings on the wire, integers of minor units inside.

No float ever touches money: parsing is done on the characters of the string.
"""
from __future__ import annotations

import re

from streams.core.currencies import MINOR_UNITS

# The largest amount one command may move, in minor units of any currency: ten trillion
# major units of a two-decimal currency. Bounded so that balances stay far inside a signed
# 64-bit integer (what PostgreSQL's BIGINT and most downstream systems hold).
AMOUNT_MINOR_MAX = 10**15
# The largest balance an account may hold, in minor units. A credit that would pass it is
# refused (`balance_limit_exceeded`), never wrapped or truncated.
BALANCE_MINOR_MAX = 10**17

_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,20})(?:\.([0-9]{1,12}))?")


class AmountError(ValueError):
    """The amount is not an acceptable decimal string; `reason` is machine readable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def minor_units_of(currency: str) -> int:
    try:
        return MINOR_UNITS[currency]
    except (KeyError, TypeError):
        raise AmountError("unknown_currency", f"unknown currency {currency!r}: not an ISO 4217 code with minor units") from None


def parse_amount_minor(amount: str, currency: str) -> int:
    """'12.30' USD -> 1230. Raises AmountError naming why the string is refused."""
    digits = minor_units_of(currency)
    if type(amount) is str:
        # The common, well-formed case without a regular expression: this runs for every
        # client command on the processor's hot path.
        whole, dot, fraction = amount.partition(".")
        if (whole.isascii() and whole.isdigit() and len(whole) <= 21 and (whole[0] != "0" or len(whole) == 1)
                and (not dot or (fraction.isascii() and fraction.isdigit() and len(fraction) <= digits))):
            amount_minor = int(whole + fraction.ljust(digits, "0")) if digits else int(whole)
            if 0 < amount_minor <= AMOUNT_MINOR_MAX:
                return amount_minor
    return _parse_refused_or_edge(amount, currency, digits)


def _parse_refused_or_edge(amount: str, currency: str, digits: int) -> int:
    if not isinstance(amount, str):
        raise AmountError("invalid_amount", f"amount must be a decimal string, got {type(amount).__name__}")
    match = _DECIMAL.fullmatch(amount)
    if match is None:
        raise AmountError("invalid_amount", _why_not_decimal(amount))
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > digits:
        raise AmountError("invalid_amount", f"{currency} has {digits} decimal places, {amount!r} has {len(fraction)}")
    amount_minor = int(whole) * 10**digits + (int(fraction.ljust(digits, "0")) if digits else 0)
    if amount_minor == 0:
        raise AmountError("invalid_amount", "amount must be greater than zero")
    if amount_minor > AMOUNT_MINOR_MAX:
        raise AmountError("invalid_amount", f"amount exceeds the maximum of {format_amount(AMOUNT_MINOR_MAX, currency)} {currency}")
    return amount_minor


def _why_not_decimal(amount: str) -> str:
    if not amount.strip():
        return "amount is empty"
    if amount.startswith("-"):
        return "amount must be positive"
    if any(c in amount for c in "eE"):
        return "amount must be a plain decimal, exponents are not accepted"
    return f"amount {amount!r} is not a plain decimal string like '12.34'"


def canonical_minor(amount: str, currency: str) -> int:
    """Reads an amount the core itself wrote (exactly the currency's decimal places), fast.

    Events and saga legs carry canonical amounts; anything else there is a corrupt log,
    not a client mistake, so it raises rather than being rejected politely.
    """
    digits = MINOR_UNITS[currency]
    if digits:
        dot = len(amount) - digits - 1
        if dot < 1 or amount[dot] != ".":
            raise ValueError(f"{amount!r} is not a canonical {currency} amount")
        amount = amount[:dot] + amount[dot + 1:]
    negative = amount[:1] == "-"
    digits_text = amount[1:] if negative else amount
    if not (digits_text.isascii() and digits_text.isdigit()):
        raise ValueError(f"{amount!r} is not a canonical {currency} amount")
    return -int(digits_text) if negative else int(digits_text)


def format_amount(amount_minor: int, currency: str) -> str:
    """1230 USD -> '12.30'; negative amounts keep their sign ('-12.30')."""
    digits = MINOR_UNITS[currency]
    if digits == 0:
        return str(amount_minor)
    if amount_minor < 0:
        return "-" + format_amount(-amount_minor, currency)
    text = str(amount_minor).rjust(digits + 1, "0")
    return text[:-digits] + "." + text[-digits:]
