"""What a batch of `wallet.events` and `wallet.outcomes` changes in the read model: pure, no I/O.

The database layer loads the rows a batch touches, hands them here, and writes back what
comes out, all in one database transaction. Balances move only through the core's `fold`,
so the read model checks the log's arithmetic (gap-free sequences, balance = previous
balance ± amount) as it goes and stops on a corrupt log instead of storing a wrong balance.

Holds: the account's held total moves through `fold` with its balance; each hold's row (what it
captured and released, its state) is projected here from its four events, and checked.

A request is identified by (owning account, transaction id): the same id on two accounts is two
requests with two answers, and no lookup ever gives one's answer for the other. The status of a
request comes from the events of its owning account (every decision leaves one: a debit is
`pending`, a credit or refund settles it, a rejection is its failure) and from its answer on
wallet.outcomes, which names the owning account (contract v2); the first final answer wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from schemas.events import (
    HOLD_EVENTS,
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    CommandRejected,
    Deposited,
    Event,
    HoldCaptured,
    HoldExpired,
    HoldPlaced,
    HoldVoided,
    TransferCredited,
    TransferDebited,
    TransferRefunded,
    Withdrawn,
    event_type,
)
from schemas.outcomes import FOREIGN_REFUSALS, Outcome
from streams.core.money import canonical_balance_minor, canonical_minor
from streams.core.state import FAILURE, PENDING, SUCCESS, Account, CorruptLog, State, fold

# Event times are stored and shown within what every database column (BIGINT) and every
# datetime (years 1 to 9999) can hold: 0001-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z.
# The log's own bound on ts_ms is the broker's; a record beyond this one is stored clamped
# rather than stopping the read model.
TS_MS_STORED_MIN = -62_135_596_800_000
TS_MS_STORED_MAX = 253_402_300_799_999


# Rows are named tuples: they go to the database drivers as they are, and are cheap to make
# by the hundred thousand.
class AccountRow(NamedTuple):
    account_id: str
    currency: str
    kind: str
    status: str
    balance_minor: int  # held money included
    sequence: int
    owner: str = ""  # the actor that opened the account
    held_minor: int = 0  # reserved by open holds: available = balance - held


class EntryRow(NamedTuple):
    account_id: str
    sequence: int
    transaction_id: str
    type: str
    amount_minor: int  # signed: what the event did to the balance
    balance_after_minor: int
    counterparty: str | None  # the other account of a transfer
    ts_ms: int  # the event's, within [TS_MS_STORED_MIN, TS_MS_STORED_MAX]


class TransactionRow(NamedTuple):
    account_id: str  # the account that owns the request: with transaction_id, the key
    transaction_id: str
    status: str  # pending | success | failure
    reason: str | None
    digest: str  # digest of the request this status answers
    actor: str | None = None  # who asked (None: an answer to a dead-lettered record that did not say)


HOLD_OPEN, HOLD_CAPTURED, HOLD_VOIDED, HOLD_EXPIRED = "open", "captured", "voided", "expired"


class HoldRow(NamedTuple):
    account_id: str  # the held (payer's) account: with hold_id, the key
    hold_id: str  # the transaction id of the place_hold request
    to_account: str
    currency: str
    amount_minor: int  # placed
    captured_minor: int  # by every capture so far
    released_minor: int  # by a final capture, the void or the expiry
    state: str  # open | captured | voided | expired
    expires_ms: int
    placed_ms: int  # times within [TS_MS_STORED_MIN, TS_MS_STORED_MAX]
    updated_ms: int


RequestKey = tuple[str, str]  # (account_id, transaction_id)
HoldKey = tuple[str, str]  # (account_id, hold_id)
# The events that change an account (every one but command_rejected).
ChangeEvent = (
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
)
HoldEvent = HoldPlaced | HoldCaptured | HoldVoided | HoldExpired


@dataclass(frozen=True, slots=True)
class Changes:
    accounts: list[AccountRow]  # every account the batch changed, in its new state
    entries: list[EntryRow]  # new rows only
    transactions: list[TransactionRow]  # every request whose status changed, in its new state
    holds: list[HoldRow] = field(default_factory=list)  # every hold the batch changed, in its new state


def stored_ts_ms(ts_ms: int) -> int:
    return min(max(ts_ms, TS_MS_STORED_MIN), TS_MS_STORED_MAX)


def project(
    accounts: dict[str, AccountRow],
    transactions: dict[RequestKey, TransactionRow],
    events: list[Event],
    outcomes: list[Outcome],
    *,
    holds: dict[HoldKey, HoldRow] | None = None,
) -> Changes:
    """The changes `events` and `outcomes` (each in log order) make to the stored rows given.

    `accounts`, `transactions` and `holds` must hold the stored row of every account, request
    and hold the batch names (absent = not stored). Raises `streams.core.state.CorruptLog`.
    """
    state = State(
        accounts={
            row.account_id: Account(
                row.currency, row.kind, row.status, row.balance_minor, row.sequence, held_minor=row.held_minor
            )
            for row in accounts.values()
        },
        tracks_memory=False,
    )
    owners = {row.account_id: row.owner for row in accounts.values()}
    hold_rows = dict(holds) if holds is not None else {}
    changed_holds: set[HoldKey] = set()
    entries: list[EntryRow] = []
    changed_accounts: set[str] = set()
    statuses = dict(transactions)
    changed_transactions: set[RequestKey] = set()

    for event in events:
        request = request_status_of(event)
        if request is not None:
            _merge_into(statuses, changed_transactions, request)
        if isinstance(event, CommandRejected):
            continue  # a decision, not a change of any account
        entry = _fold_entry(state, event)
        if entry is None:
            continue  # already stored; `fold` would skip it too
        entries.append(entry)
        changed_accounts.add(event.account_id)
        if type(event) is AccountOpened:
            owners[event.account_id] = event.owner
        elif isinstance(event, HOLD_EVENTS):
            key = (event.account_id, event.hold_id)
            hold_rows[key] = next_hold(hold_rows.get(key), event)
            changed_holds.add(key)

    for outcome in outcomes:
        request = request_status_of_outcome(outcome)
        if request is not None:
            _merge_into(statuses, changed_transactions, request)

    account_rows = []
    for account_id in changed_accounts:
        account = state.accounts[account_id]
        account_rows.append(
            AccountRow(
                account_id,
                account.currency,
                account.kind,
                account.status,
                account.balance_minor,
                account.seq,
                owners.get(account_id, ""),
                account.held_minor,
            )
        )
    return Changes(
        account_rows,
        entries,
        [statuses[key] for key in changed_transactions],
        [hold_rows[key] for key in changed_holds],
    )


def next_hold(current: HoldRow | None, event: HoldEvent) -> HoldRow:
    """The hold's row after one of its events (new to the read model: `fold` has accepted it, its
    amounts and the account's held total, but a fold over accounts alone does not track holds).

    The read model checks what it stores: a hold is placed once, changes only while open, never
    captures or releases beyond its amount, and ends having captured or released all of it."""
    if isinstance(event, HoldPlaced):
        if current is not None:
            raise CorruptLog(f"account {event.account_id!r} seq {event.seq}: hold {event.hold_id!r} placed again")
        ts_ms = stored_ts_ms(event.ts_ms)
        return HoldRow(
            event.account_id,
            event.hold_id,
            event.to_account,
            event.currency,
            canonical_minor(event.amount, event.currency),
            0,
            0,
            HOLD_OPEN,
            stored_ts_ms(event.expires_ms),
            ts_ms,
            ts_ms,
        )
    if current is None or current.state != HOLD_OPEN or event.currency != current.currency:
        state = "never placed" if current is None else f"{current.state} {current.currency}"
        raise CorruptLog(
            f"account {event.account_id!r} seq {event.seq}: {event_type(event)} {event.currency} of hold "
            f"{event.hold_id!r}, which is {state}"
        )
    captured_minor = current.captured_minor
    state = HOLD_EXPIRED if type(event) is HoldExpired else HOLD_VOIDED
    if isinstance(event, HoldCaptured):
        captured_minor += canonical_minor(event.amount, event.currency)
        state = HOLD_CAPTURED if event.final else HOLD_OPEN
    released_minor = current.released_minor + canonical_balance_minor(event.released, event.currency)
    settled_minor = captured_minor + released_minor
    if settled_minor > current.amount_minor or (state != HOLD_OPEN and settled_minor != current.amount_minor):
        raise CorruptLog(
            f"account {event.account_id!r} seq {event.seq}: hold {event.hold_id!r} of {current.amount_minor} "
            f"minor units {state} with {captured_minor} captured and {released_minor} released"
        )
    return current._replace(
        captured_minor=captured_minor,
        released_minor=released_minor,
        state=state,
        updated_ms=stored_ts_ms(event.ts_ms),
    )


def _fold_entry(state: State, event: ChangeEvent) -> EntryRow | None:
    """Folds an event that changes an account; its entry, or None if it is stored already."""
    before = state.accounts.get(event.account_id)
    if before is not None and event.seq <= before.seq:
        return None
    balance_before_minor = before.balance_minor if before is not None else 0
    fold(state, event)
    account = state.accounts[event.account_id]
    # `fold` has checked that the new balance is the old one moved by the event's amount.
    return EntryRow(
        event.account_id,
        event.seq,
        event.transaction_id,
        event_type(event),
        account.balance_minor - balance_before_minor,
        account.balance_minor,
        getattr(event, "to_account", None) or getattr(event, "from_account", None),
        stored_ts_ms(event.ts_ms),
    )


# The events that answer their own request at once (a hold's expiry answers none: it is the
# place's `transaction_id`, whose answer was its placing).
_SUCCESS_EVENTS = frozenset(
    {AccountOpened, Deposited, Withdrawn, AccountFrozen, AccountUnfrozen, AccountClosed, HoldPlaced, HoldVoided}
)
_LEG_COMMANDS = frozenset({"credit_leg", "refund_leg"})


def request_status_of(event: Event) -> TransactionRow | None:
    """The status of its request that an event records, keyed by the request's owning account;
    None for a receiver's refusal of a credit leg (the sender's refund answers the request)."""
    actor = event.actor  # who asked (a leg's events carry the transfer's)
    reason: str | None = None
    if isinstance(event, TransferCredited):
        owner, status = event.from_account, SUCCESS
    elif isinstance(event, (TransferDebited, HoldCaptured)):
        # A capture moves money as a transfer does: in flight until the destination credits it.
        owner, status = event.account_id, PENDING
    elif isinstance(event, TransferRefunded):
        owner, status, reason = event.account_id, FAILURE, event.reason
    elif isinstance(event, CommandRejected):
        if event.command in _LEG_COMMANDS:
            return None
        owner, status, reason = event.account_id, FAILURE, event.reason
    elif type(event) in _SUCCESS_EVENTS:
        owner, status = event.account_id, SUCCESS
    else:
        return None
    return TransactionRow(owner, event.transaction_id, status, reason, event.digest, actor)


def requests_named(events: list[Event], outcomes: list[Outcome]) -> set[RequestKey]:
    """Every request whose status `project` may change for these records (the rows a writer locks)."""
    rows = [request_status_of(event) for event in events]
    rows.extend(request_status_of_outcome(outcome) for outcome in outcomes)
    return {(row.account_id, row.transaction_id) for row in rows if row is not None}


def request_status_of_outcome(outcome: Outcome) -> TransactionRow | None:
    """The answer an outcome gives, keyed by the request's owning account (None for an answer to
    a dead-lettered record whose account could not be read)."""
    if not outcome.account_id:
        return None
    return TransactionRow(
        outcome.account_id,
        outcome.transaction_id,
        outcome.status,
        outcome.reason,
        outcome.digest,
        outcome.actor or None,
    )


def _merge_into(statuses: dict[RequestKey, TransactionRow], changed: set[RequestKey], incoming: TransactionRow) -> None:
    key = (incoming.account_id, incoming.transaction_id)
    merged = merge_status(statuses.get(key), incoming)
    if merged is not None:
        statuses[key] = merged
        changed.add(key)


def merge_status(current: TransactionRow | None, incoming: TransactionRow) -> TransactionRow | None:
    """The new status of a request, or None if `incoming` changes nothing.

    `incoming` is a `pending` (a transfer was debited) or a final answer (an event's or an
    outcome's). The first final answer wins, since retries re-publish it. A `duplicate_conflict`
    answers another request that reused the id on the same account, and a `not_authorized` a
    stranger's request under the id, not this one, unless it carries this request's own digest;
    one that arrives before anything else is known is kept only until the request's own debit or
    answer shows up.
    """
    if current is None:
        return incoming
    if _may_answer_another(current) and current.digest != incoming.digest and not _may_answer_another(incoming):
        return incoming  # what we held answered another request; this is the transaction's own
    if current.status != PENDING or incoming.status == PENDING:
        return None
    if _may_answer_another(incoming) and incoming.digest != current.digest:
        return None
    return incoming


def _may_answer_another(row: TransactionRow) -> bool:
    return row.status == FAILURE and row.reason in FOREIGN_REFUSALS
