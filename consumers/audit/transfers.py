"""Transfers: each debit is settled at most once, by legs that agree with it, or is in flight.

The ledger replay files every record of a transfer under its request as a `TransferRecord`: the
sender's debit, the receiver's credit or refusal of the credit leg, and the sender's refund. A
transfer whose debit and settling legs have all been seen and agree leaves the replay's table at
once (`settled_cleanly`); what is left at the end is checked here (`check_transfer`): transfers
still in flight, and the anomalies, each named once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from consumers.audit.violations import Kind, Location, RequestKey
from schemas.events import CommandRejected, TransferDebited
from streams.core.money import canonical_minor, format_amount

DEBITED, CREDITED, REFUSED, REFUNDED = "debited", "credited", "refused", "refunded"
# The event each record kind is, for messages.
LEG_NAMES = {
    CREDITED: "transfer_credited",
    REFUNDED: "transfer_refunded",
    REFUSED: "command_rejected of the credit leg",
    DEBITED: "transfer_debited",
}


class TransferRecord(NamedTuple):
    """One event of a transfer, as the replay saw it."""

    kind: str  # DEBITED, CREDITED, REFUSED (the receiver's command_rejected of the credit leg) or REFUNDED
    partition: int
    offset: int
    account_id: str  # the account whose event it is
    counterpart: str | None  # the transfer's other account (None for a refusal)
    amount_minor: int  # what the event moved on account_id (0 for a refusal)
    currency: str | None  # of account_id (None for a refusal)
    reason: str | None  # of a refusal or a refund

    @property
    def location(self) -> Location:
        return (self.partition, self.offset)


def settled_cleanly(records: list[TransferRecord]) -> bool:
    """Whether a transfer's records are a debit and exactly the legs that settle it, all agreeing:
    a credit, or a refusal and its refund. Such a transfer needs no further look."""
    if len(records) == 2:
        debit, credit = records if records[0].kind == DEBITED else (records[1], records[0])
        return (
            debit.kind == DEBITED
            and credit.kind == CREDITED
            and credit.account_id == debit.counterpart
            and credit.counterpart == debit.account_id
            and credit.amount_minor == debit.amount_minor
            and credit.currency == debit.currency
        )
    if len(records) == 3:
        by_kind = {record.kind: record for record in records}
        opening, refusal, refund = by_kind.get(DEBITED), by_kind.get(REFUSED), by_kind.get(REFUNDED)
        return (
            opening is not None
            and refusal is not None
            and refund is not None
            and refusal.account_id == opening.counterpart
            and refund.account_id == opening.account_id
            and refund.counterpart == opening.counterpart
            and refund.amount_minor == opening.amount_minor
            and refund.currency == opening.currency
            and refund.reason == refusal.reason
        )
    return False


class LoggedTransfer:
    """What the log says about one transfer request: its first debit, any further debits, and its legs."""

    __slots__ = ("from_account", "to_account", "amount_minor", "currency", "debited_at", "extra_debits", "legs")

    def __init__(self, records: list[TransferRecord]) -> None:
        self.from_account: str | None = None
        self.to_account: str | None = None
        self.amount_minor = 0
        self.currency: str | None = None
        self.debited_at: Location | None = None
        self.extra_debits: list[Location] = []
        self.legs: list[TransferRecord] = []  # every record but the debits, in replay order
        for record in records:
            if record.kind != DEBITED:
                self.legs.append(record)
            elif self.debited_at is None:
                self.from_account, self.to_account = record.account_id, record.counterpart
                self.amount_minor, self.currency = record.amount_minor, record.currency
                self.debited_at = record.location
            else:
                self.extra_debits.append(record.location)

    def first(self, leg_kind: str) -> TransferRecord | None:
        return next((leg for leg in self.legs if leg.kind == leg_kind), None)

    @property
    def settlements(self) -> list[TransferRecord]:
        """The legs that settle the debit: credits and refunds (a refusal only asks for a refund)."""
        return [leg for leg in self.legs if leg.kind != REFUSED]

    def take_late_debit(self, debit: TransferDebited) -> None:
        """Adopts a debit written after its partition was read (see `check_transfer`)."""
        self.from_account, self.to_account = debit.account_id, debit.to_account
        self.currency = debit.currency
        try:
            self.amount_minor = canonical_minor(debit.amount, debit.currency)
        except (ValueError, KeyError):
            self.amount_minor = 0


@dataclass(frozen=True, slots=True)
class InFlight:
    transaction_id: str
    from_account: str
    to_account: str
    amount: str
    currency: str
    debited_at: Location
    refused_reason: str | None  # set when the receiver refused and the refund is on its way

    def to_json(self) -> dict:
        return {
            "transaction_id": self.transaction_id,
            "from_account": self.from_account,
            "to_account": self.to_account,
            "amount": self.amount,
            "currency": self.currency,
            "debit_partition": self.debited_at[0],
            "debit_offset": self.debited_at[1],
            "state": "refund pending" if self.refused_reason else "credit pending",
            "refused_reason": self.refused_reason,
        }


# (kind, message, partition, offset, account_id=, transaction_id=): LedgerReplay._violation's shape.
Report = Callable[..., None]
# The first event of the given classes for a request written after the snapshot, or None.
LaterEvent = Callable[..., object]

_WITHOUT_DEBIT = {
    CREDITED: Kind.CREDIT_WITHOUT_DEBIT,
    REFUNDED: Kind.REFUND_WITHOUT_DEBIT,
    REFUSED: Kind.REFUSAL_WITHOUT_DEBIT,
}


def in_flight_of(key: RequestKey, transfer: LoggedTransfer) -> InFlight | None:
    """The transfer as an in-flight entry, if it was debited and nothing settled it yet."""
    if transfer.debited_at is None or transfer.settlements:
        return None
    refused = transfer.first(REFUSED)
    transaction_id, _ = key
    # A debit (first or late) sets the accounts and currency together with debited_at.
    assert transfer.from_account is not None and transfer.to_account is not None
    assert transfer.currency is not None
    return InFlight(
        transaction_id,
        transfer.from_account,
        transfer.to_account,
        format_amount(transfer.amount_minor, transfer.currency),
        transfer.currency,
        transfer.debited_at,
        refused.reason if refused else None,
    )


def check_transfer(key: RequestKey, transfer: LoggedTransfer, later_event: LaterEvent, report: Report) -> int:
    """Checks one transfer that did not settle cleanly; returns what it adds to the money in
    flight in this snapshot."""
    transaction_id, digest = key
    settlements = transfer.settlements
    if transfer.debited_at is None:
        late_debit = later_event(key, TransferDebited)
        if late_debit is None:
            for leg in transfer.legs:
                report(
                    _WITHOUT_DEBIT[leg.kind],
                    f"{LEG_NAMES[leg.kind]} of a transfer that no transfer_debited (digest {digest}) started",
                    *leg.location,
                    account_id=leg.account_id,
                    transaction_id=transaction_id,
                )
            return 0  # its legs' money came from nowhere: conservation shows it
        # Debited after its partition was read, settled on a partition read later: in this
        # cut the money arrived before it left, which the in-flight sum must offset.
        assert isinstance(late_debit, TransferDebited)  # later_event returns one of the classes asked for
        transfer.take_late_debit(late_debit)
        contribution_minor = -transfer.amount_minor if settlements else 0
        where = "the debit written after its partition was read"
    else:
        contribution_minor = 0 if settlements else transfer.amount_minor
        where = f"the debit at partition {transfer.debited_at[0]} offset {transfer.debited_at[1]}"
    for location in transfer.extra_debits:
        report(
            Kind.DEBITED_TWICE,
            f"transfer debited again ({where})",
            *location,
            account_id=transfer.from_account,
            transaction_id=transaction_id,
        )
    _check_settled_once(transaction_id, transfer, report)
    _check_legs_match(transaction_id, transfer, where, report)
    refund, refused = transfer.first(REFUNDED), transfer.first(REFUSED)
    if refund is not None and refused is None and later_event(key, CommandRejected) is None:
        report(
            Kind.REFUND_WITHOUT_REFUSAL,
            f"refund of a transfer whose credit leg was never refused by {transfer.to_account!r}",
            *refund.location,
            account_id=transfer.from_account,
            transaction_id=transaction_id,
        )
    return contribution_minor


def _check_settled_once(transaction_id: str, transfer: LoggedTransfer, report: Report) -> None:
    settlements = transfer.settlements
    refused = transfer.first(REFUSED)
    if len(settlements) > 1 or (refused is not None and transfer.first(CREDITED) is not None):
        last = settlements[-1]
        report(
            Kind.SETTLED_TWICE,
            f"{LEG_NAMES[last.kind]} of a transfer already "
            f"{'refused' if refused else 'settled'} (legs: {', '.join(leg.kind for leg in transfer.legs)})",
            *last.location,
            account_id=last.account_id,
            transaction_id=transaction_id,
        )


def _check_legs_match(transaction_id: str, transfer: LoggedTransfer, where: str, report: Report) -> None:
    """Each leg names the debit's accounts, amount and currency; a refund gives the refusal's reason."""
    refused = transfer.first(REFUSED)
    for leg in transfer.legs:
        refunding = leg.kind == REFUNDED
        expected_account = transfer.from_account if refunding else transfer.to_account
        expected_counterpart = transfer.to_account if refunding else transfer.from_account
        differences = []
        if leg.account_id != expected_account:
            differences.append(f"account {leg.account_id!r} instead of {expected_account!r}")
        if leg.kind != REFUSED:
            if leg.counterpart != expected_counterpart:
                differences.append(f"counterpart {leg.counterpart!r} instead of {expected_counterpart!r}")
            if (leg.amount_minor, leg.currency) != (transfer.amount_minor, transfer.currency):
                # Only debited transfers get here (check_transfer), and debits, credits and
                # refunds all carry a currency; only refusals (skipped above) have none.
                assert leg.currency is not None and transfer.currency is not None
                differences.append(
                    f"{format_amount(leg.amount_minor, leg.currency)} {leg.currency} instead of "
                    f"{format_amount(transfer.amount_minor, transfer.currency)} {transfer.currency}"
                )
        if refunding and refused is not None and leg.reason != refused.reason:
            differences.append(f"reason {leg.reason!r} but the receiver refused with {refused.reason!r}")
        if differences:
            report(
                Kind.LEG_MISMATCH,
                f"{LEG_NAMES[leg.kind]} does not match {where}: " + "; ".join(differences),
                *leg.location,
                account_id=leg.account_id,
                transaction_id=transaction_id,
            )
