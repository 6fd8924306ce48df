"""Events: the ledger, on `wallet.events`, keyed by account id; kept forever.

An account's state is the fold of its events. Every event that changes an account carries
the account's new `seq` (1, 2, 3, ... with no gap) and, where money moved, its new
`balance`. `command_rejected` is a decision event: it changes no balance and takes no
`seq`, but records the outcome and digest of a refused command so that a retry, after any
crash, gets the same first answer.

Holds: `hold_placed`, `hold_captured`, `hold_voided` and `hold_expired` take a `seq` and state
the account's `held` total after them (balances include held money; available = balance -
held). `hold_captured` is a money change: the captured amount leaves the balance and is in
flight to `to_account` exactly as a transfer's debit is, settled by the same
`transfer_credited` on the destination, or `command_rejected` there and `transfer_refunded`
back here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from schemas.commands import SCHEMA_VERSION, AccountKind


class _Event(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", gc=False):
    v: int = SCHEMA_VERSION
    account_id: str
    transaction_id: str
    ts_ms: int  # the core's decision time: max(partition clock, record time); never decreases
    command: str  # type of the command that caused the event
    digest: str  # digest of the client command the event answers
    actor: str  # who asked for the change (a leg's events carry its transfer's actor)


class _Change(_Event, frozen=True):
    seq: int


class _MoneyChange(_Change, frozen=True):
    amount: str
    currency: str
    balance: str


class AccountOpened(_Change, tag="account_opened", frozen=True):
    owner: str  # the actor that opened it: the only actor that may send from it
    currency: str
    kind: AccountKind
    balance: str
    shards: int = 1  # of the merchant this account is a shard of (or is, as shard 0)
    shard_of: str | None = None  # a shard k > 0: its merchant (shard 0); shard 0 and others: None


class Deposited(_MoneyChange, tag="deposited", frozen=True):
    pass


class Withdrawn(_MoneyChange, tag="withdrawn", frozen=True):
    pass


class TransferDebited(_MoneyChange, tag="transfer_debited", frozen=True):
    """The sending side of a transfer; the money is in flight until credited or refunded."""

    to_account: str
    merchant_only: bool = False


class TransferCredited(_MoneyChange, tag="transfer_credited", frozen=True):
    from_account: str
    issued_ms: int  # of the credit leg: a copy of this leg (same issued_ms) never credits again


class TransferRefunded(_MoneyChange, tag="transfer_refunded", frozen=True):
    to_account: str
    reason: str


class AccountFrozen(_Change, tag="account_frozen", frozen=True):
    pass


class AccountUnfrozen(_Change, tag="account_unfrozen", frozen=True):
    pass


class AccountClosed(_Change, tag="account_closed", frozen=True):
    pass


class HoldPlaced(_Change, tag="hold_placed", frozen=True):
    """A hold of `amount` on the account for `to_account`; `transaction_id` = `hold_id`."""

    hold_id: str
    to_account: str
    amount: str
    currency: str
    expires_ms: int  # the place's decision time + expires_in_ms: expired at the first decision at or after it
    held: str  # the account's held total after
    balance: str  # unchanged, for readers


class HoldCaptured(_MoneyChange, tag="hold_captured", frozen=True):
    """`amount` of hold `hold_id` leaves the balance (and the held total) towards `to_account`;
    `transaction_id` is the capture's own id. A final capture also releases what is left."""

    hold_id: str
    to_account: str
    held: str  # after
    released: str  # released by a final capture beyond `amount` ("0.00" when none)
    final: bool  # the hold has ended (a final capture, or nothing left to capture)


class HoldVoided(_Change, tag="hold_voided", frozen=True):
    """The hold ends; `released` (what it still held) is available again; `transaction_id` is the void's id."""

    hold_id: str
    released: str
    currency: str
    held: str  # after


class HoldExpired(_Change, tag="hold_expired", frozen=True):
    """The hold ended at its expiry; `transaction_id` = `hold_id`, `command` = the type of the
    command whose decision time expired it (often "tick"), `digest` and `actor` the place's."""

    hold_id: str
    released: str
    currency: str
    held: str  # after


class CommandRejected(_Event, tag="command_rejected", frozen=True):
    reason: str
    # Of a refused credit leg: the leg's issued_ms, and its sender (v4), under whose transaction
    # id the receiver remembers the refusal.
    issued_ms: int | None = None
    from_account: str | None = None


Event = (
    AccountOpened
    | Deposited
    | Withdrawn
    | TransferDebited
    | TransferCredited
    | TransferRefunded
    | AccountFrozen
    | AccountUnfrozen
    | AccountClosed
    | HoldPlaced
    | HoldCaptured
    | HoldVoided
    | HoldExpired
    | CommandRejected
)
MONEY_EVENTS = (Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded, HoldCaptured)
HOLD_EVENTS = (HoldPlaced, HoldCaptured, HoldVoided, HoldExpired)


def event_type(event: Event) -> str:
    tag = event.__struct_config__.tag
    if TYPE_CHECKING:  # every event class is declared with a string tag
        assert isinstance(tag, str)
    return tag
