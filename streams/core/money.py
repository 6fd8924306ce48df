"""Amounts: decimal strings on the wire, integers of minor units inside.

No float ever touches money: parsing is done on the characters of the string.
"""

from __future__ import annotations

import re
from typing import cast

from streams.core.currencies import MINOR_UNITS

# The largest amount one command may move, in minor units of any currency: ten trillion
# major units of a two-decimal currency. Bounded so that balances stay far inside a signed
# 64-bit integer (what PostgreSQL's BIGINT and most downstream systems hold).
AMOUNT_MINOR_MAX = 10**15
# The largest balance an account may hold, in minor units. A credit that would pass it is
# refused (`balance_limit_exceeded`), never wrapped or truncated.
BALANCE_MINOR_MAX = 10**17
# One amount always fits in a balance: the cap checks below rely on it.
assert 0 < AMOUNT_MINOR_MAX <= BALANCE_MINOR_MAX

_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,20})(?:\.([0-9]{1,12}))?")


class AmountError(ValueError):
    """The amount is not an acceptable decimal string; `reason` is machine readable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# The readers below take `object`: they sit on the trust boundary and must refuse a value of any
# type, also when compiled (infra/native.py), where a `str` parameter would raise TypeError.


def minor_units_of(currency: object) -> int:
    digits = MINOR_UNITS.get(currency) if type(currency) is str else None
    if digits is None:
        raise AmountError("unknown_currency", f"unknown currency {currency!r}: not an ISO 4217 code with minor units")
    return digits


def parse_amount_minor(amount: object, currency: object) -> int:
    """'12.30' USD -> 1230. Raises AmountError naming why the string is refused."""
    digits = minor_units_of(currency)
    if type(amount) is str:
        # The common, well-formed case without a regular expression: this runs for every
        # client command on the processor's hot path.
        whole, dot, fraction = amount.partition(".")
        if (
            whole.isascii()
            and whole.isdigit()
            and len(whole) <= 21
            and (whole[0] != "0" or len(whole) == 1)
            and (not dot or (fraction.isascii() and fraction.isdigit() and len(fraction) <= digits))
        ):
            amount_minor = int(whole + fraction.ljust(digits, "0")) if digits else int(whole)
            if 0 < amount_minor <= AMOUNT_MINOR_MAX:
                return amount_minor
    return _parse_refused_or_edge(amount, cast(str, currency), digits)  # a str: it had minor units


def _parse_refused_or_edge(amount: object, currency: str, digits: int) -> int:
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
        raise AmountError(
            "invalid_amount", f"amount exceeds the maximum of {format_amount(AMOUNT_MINOR_MAX, currency)} {currency}"
        )
    return amount_minor


def _why_not_decimal(amount: str) -> str:
    if not amount.strip():
        return "amount is empty"
    if amount.startswith("-"):
        return "amount must be positive"
    if any(c in amount for c in "eE"):
        return "amount must be a plain decimal, exponents are not accepted"
    return f"amount {amount!r} is not a plain decimal string like '12.34'"


def canonical_minor(amount: object, currency: object) -> int:
    """Reads a positive amount the core itself wrote (exactly the currency's decimal places), fast.

    Events and saga legs carry canonical amounts: no sign, no leading zero, exactly the
    currency's decimals, greater than zero and at most AMOUNT_MINOR_MAX. Anything else there
    ("-5.00", "0.00", "-.50", "00005.00", "5.0") is corrupt or forged, not a client mistake:
    it raises ValueError rather than being rejected politely.
    """
    amount_minor = _canonical_digits(amount, currency)
    if not 0 < amount_minor <= AMOUNT_MINOR_MAX:
        raise ValueError(f"{amount!r} is not a canonical {currency} amount: not in (0, {AMOUNT_MINOR_MAX}] minor units")
    return amount_minor


def canonical_balance_minor(balance: object, currency: object) -> int:
    """Reads a balance the core wrote: like `canonical_minor`, but zero is a balance, and the
    bound is BALANCE_MINOR_MAX."""
    balance_minor = _canonical_digits(balance, currency)
    if balance_minor > BALANCE_MINOR_MAX:
        raise ValueError(f"{balance!r} is not a canonical {currency} balance: above {BALANCE_MINOR_MAX} minor units")
    return balance_minor


def _canonical_digits(text: object, currency: object) -> int:
    digits = MINOR_UNITS.get(currency) if type(currency) is str else None
    if digits is None or type(text) is not str:
        raise ValueError(f"{text!r} is not a canonical {currency!r} amount")
    whole = text
    if digits:
        dot = len(text) - digits - 1
        if dot < 1 or text[dot] != ".":
            raise ValueError(f"{text!r} is not a canonical {currency} amount")
        whole, fraction = text[:dot], text[dot + 1 :]
        if not (fraction.isascii() and fraction.isdigit()):
            raise ValueError(f"{text!r} is not a canonical {currency} amount")
    else:
        fraction = ""
    if not (whole.isascii() and whole.isdigit()) or (whole[0] == "0" and len(whole) > 1) or len(whole) > 21:
        raise ValueError(f"{text!r} is not a canonical {currency} amount")
    return int(whole + fraction)


def format_amount(amount_minor: int, currency: str) -> str:
    """1230 USD -> '12.30'; negative amounts keep their sign ('-12.30')."""
    digits = MINOR_UNITS[currency]
    if digits == 0:
        return str(amount_minor)
    if amount_minor < 0:
        return "-" + format_amount(-amount_minor, currency)
    text = str(amount_minor).rjust(digits + 1, "0")
    return text[:-digits] + "." + text[-digits:]
