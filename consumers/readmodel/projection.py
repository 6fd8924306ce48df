"""What a batch of `wallet.events` and `wallet.outcomes` changes in the read model: pure, no I/O.

The database layer loads the rows a batch touches, hands them here, and writes back what
comes out, all in one database transaction. Balances move only through the core's `fold`,
so the read model checks the log's arithmetic (gap-free sequences, balance = previous
balance ± amount) as it goes and stops on a corrupt log instead of storing a wrong balance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from schemas.events import CommandRejected, Event, TransferDebited, event_type
from schemas.outcomes import Outcome, Reason
from streams.core.state import FAILURE, PENDING, Account, State, fold


# Rows are named tuples: they go to the database drivers as they are, and are cheap to make
# by the hundred thousand.
class AccountRow(NamedTuple):
    account_id: str
    currency: str
    kind: str
    status: str
    balance_minor: int
    sequence: int


class EntryRow(NamedTuple):
    account_id: str
    sequence: int
    transaction_id: str
    type: str
    amount_minor: int  # signed: what the event did to the balance
    balance_after_minor: int
    counterparty: str | None  # the other account of a transfer
    ts_ms: int


class TransactionRow(NamedTuple):
    transaction_id: str
    status: str  # pending | success | failure
    reason: str | None
    digest: str  # digest of the request this status answers


@dataclass(frozen=True, slots=True)
class Changes:
    accounts: list[AccountRow]  # every account the batch changed, in its new state
    entries: list[EntryRow]  # new rows only
    transactions: list[TransactionRow]  # every transaction whose status changed, in its new state


def project(accounts: dict[str, AccountRow], transactions: dict[str, TransactionRow], events: list[Event],
            outcomes: list[Outcome]) -> Changes:
    """The changes `events` and `outcomes` (each in log order) make to the stored rows given.

    `accounts` and `transactions` must hold the stored row of every account and transaction
    the batch names (absent = not stored). Raises `streams.core.state.CorruptLog`.
    """
    state = State(accounts={row.account_id: Account(row.currency, row.kind, row.status, row.balance_minor, row.sequence)
                            for row in accounts.values()}, tracks_memory=False)
    entries: list[EntryRow] = []
    changed_accounts: set[str] = set()
    statuses = dict(transactions)
    changed_transactions: set[str] = set()

    for event in events:
        event_class = type(event)
        if event_class is CommandRejected:
            continue  # a decision, not a change: its answer arrives on wallet.outcomes
        before = state.accounts.get(event.account_id)
        if before is not None and event.seq <= before.seq:
            continue  # already stored; `fold` would skip it too
        balance_before_minor = before.balance_minor if before is not None else 0
        fold(state, event)
        account = state.accounts[event.account_id]
        changed_accounts.add(event.account_id)
        # `fold` has checked that the new balance is the old one moved by the event's amount.
        entries.append(EntryRow(event.account_id, event.seq, event.transaction_id, event_type(event),
                                account.balance_minor - balance_before_minor, account.balance_minor,
                                getattr(event, "to_account", None) or getattr(event, "from_account", None),
                                event.ts_ms))
        if event_class is TransferDebited:
            incoming = TransactionRow(event.transaction_id, PENDING, None, event.digest)
            _merge_into(statuses, changed_transactions, incoming)

    for outcome in outcomes:
        _merge_into(statuses, changed_transactions,
                    TransactionRow(outcome.transaction_id, outcome.status, outcome.reason, outcome.digest))

    account_rows = []
    for account_id in changed_accounts:
        account = state.accounts[account_id]
        account_rows.append(AccountRow(account_id, account.currency, account.kind, account.status,
                                       account.balance_minor, account.seq))
    return Changes(account_rows, entries, [statuses[transaction_id] for transaction_id in changed_transactions])


def _merge_into(statuses: dict[str, TransactionRow], changed: set[str], incoming: TransactionRow) -> None:
    merged = merge_status(statuses.get(incoming.transaction_id), incoming)
    if merged is not None:
        statuses[incoming.transaction_id] = merged
        changed.add(incoming.transaction_id)


def merge_status(current: TransactionRow | None, incoming: TransactionRow) -> TransactionRow | None:
    """The new status of a transaction, or None if `incoming` changes nothing.

    `incoming` is a `pending` (a transfer was debited) or a final outcome. The first final
    answer wins, since retries re-publish it. A `duplicate_conflict` answers the request that
    reused the id, not the transaction, unless it carries the transaction's own digest (a
    receiver that refused the credit under a reused id); one that arrives before anything
    else is known is kept only until the transaction's own debit or answer shows up.
    """
    if current is None:
        return incoming
    if _is_conflict(current) and current.digest != incoming.digest and not _is_conflict(incoming):
        return incoming  # what we held answered another request; this is the transaction's own
    if current.status != PENDING or incoming.status == PENDING:
        return None
    if _is_conflict(incoming) and incoming.digest != current.digest:
        return None
    return incoming


def _is_conflict(row: TransactionRow) -> bool:
    return row.status == FAILURE and row.reason == Reason.DUPLICATE_CONFLICT
