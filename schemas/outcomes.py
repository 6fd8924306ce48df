"""Outcomes: the final answer to a client command, on `wallet.outcomes`, keyed by transaction id.

A request is identified by (owning account, transaction id): `account_id` is the account
that owns the request (`account_id` or `from_account` of the client command), `actor` who
asked. Readers match answers by (account_id, transaction_id), never by transaction id alone.

A retried request may publish the same outcome again (byte-identical); a transaction id
never gets two different final outcomes for the same `digest`. A request that reuses a
transaction id with another payload gets `failure`/`duplicate_conflict` carrying its own
digest, which is how a reader tells it apart from the first request's answer; so does a
stranger's request under the id (`failure`/`not_authorized`, see `FOREIGN_REFUSALS`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.commands import SCHEMA_VERSION

OutcomeStatus = Literal["success", "failure"]


class Outcome(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="outcome", tag_field="type", gc=False
):
    v: int = SCHEMA_VERSION
    transaction_id: str
    account_id: str  # the account that owns the request
    actor: str  # who asked
    status: OutcomeStatus
    reason: str | None = None
    digest: str


class Reason:
    """Machine-readable failure reasons, one namespace so producers and readers agree."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    ACCOUNT_NOT_FOUND = "account_not_found"
    ACCOUNT_EXISTS = "account_exists"
    ACCOUNT_FROZEN = "account_frozen"
    ACCOUNT_CLOSED = "account_closed"
    ACCOUNT_NOT_FROZEN = "account_not_frozen"
    BALANCE_NOT_ZERO = "balance_not_zero"
    BALANCE_LIMIT_EXCEEDED = "balance_limit_exceeded"
    CURRENCY_MISMATCH = "currency_mismatch"
    UNKNOWN_CURRENCY = "unknown_currency"
    INVALID_AMOUNT = "invalid_amount"
    SAME_ACCOUNT = "same_account"
    NOT_A_MERCHANT = "not_a_merchant"
    DUPLICATE_CONFLICT = "duplicate_conflict"
    NOT_AUTHORIZED = "not_authorized"  # the actor or role may not ask this of the account
    TRANSFER_IN_FLIGHT = "transfer_in_flight"  # close refused while a debit of the account is in flight
    LEG_EXPIRED = "leg_expired"  # a credit leg older than half the idempotency window: refunded
    HOLD_NOT_FOUND = "hold_not_found"  # capture or void of a hold the account does not know (or forgot)
    HOLD_CAPTURED = "hold_captured"  # capture or void of a hold already captured
    HOLD_VOIDED = "hold_voided"  # capture or void of a hold already voided
    HOLD_EXPIRED = "hold_expired"  # capture or void of a hold already expired
    CAPTURE_EXCEEDS_HOLD = "capture_exceeds_hold"  # more than the hold still holds: refused, never partly done
    HOLDS_OPEN = "holds_open"  # close refused while a hold of the account is open
    INVALID_EXPIRY = "invalid_expiry"  # expires_in_ms not in 1 .. HOLD_EXPIRY_MS_MAX
    RESERVED_ACCOUNT_ID = "reserved_account_id"  # open of an id with `::`, which only shards' derived ids have
    INVALID_SHARDS = "invalid_shards"  # shards/to_shards not 1..64, or shards of a non-merchant or too long an id


# Refusals that may answer another request under the same (account, transaction id) than the
# one a reader follows: a reuse of the id with another payload, or a stranger's request (one it
# may not ask, or an open of an account another actor owns). A reader keeps such an answer only
# for its own digest, and the core does not remember them: an account, once open, exists for
# good, so `account_exists` is the answer to its open under any id for ever.
FOREIGN_REFUSALS = frozenset({Reason.DUPLICATE_CONFLICT, Reason.NOT_AUTHORIZED, Reason.ACCOUNT_EXISTS})
