"""Holds: every hold is captured at most by what it held, never after it ended, and is listed.

The ledger replay files each hold event here after folding it. The fold over accounts alone (the
replay's) already proves each account's held total and balance follow; what only a look at the
hold itself shows is checked here: a capture, void or expiry of a hold never placed, one of a
hold that had ended (captured whole or finally, voided, expired) or was past its expiry, a
capture beyond what the hold still held, a release that is not exactly what it still held, and
an expiry before its time. Holds are per account and so per partition: a replay of some
partitions keeps its own, and the parts merge without overlap. Money a hold reserves is part of
its account's balance for conservation; a capture's money is in flight from its capture to its
credit or refund, as a transfer's is (transfers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from consumers.audit.violations import Kind, Location
from schemas.events import HoldCaptured, HoldExpired, HoldPlaced, HoldVoided, event_type
from streams.core.money import canonical_balance_minor, format_amount

OPEN, CAPTURED, VOIDED, EXPIRED = "open", "captured", "voided", "expired"
_END = {HoldCaptured: CAPTURED, HoldVoided: VOIDED, HoldExpired: EXPIRED}

# (kind, message, partition, offset, account_id=, transaction_id=): LedgerReplay._violation's shape.
Report = Callable[..., None]


@dataclass(slots=True)
class LoggedHold:
    """One hold as the log tells it."""

    account_id: str
    hold_id: str
    to_account: str
    currency: str
    amount_minor: int
    held_minor: int  # still held
    captured_minor: int
    expires_ms: int
    state: str
    placed_at: Location
    ended_at: Location | None = None

    def to_json(self) -> dict:
        fmt = lambda minor: format_amount(minor, self.currency)  # noqa: E731
        return {
            "account_id": self.account_id,
            "hold_id": self.hold_id,
            "to_account": self.to_account,
            "amount": fmt(self.amount_minor),
            "held": fmt(self.held_minor),
            "captured": fmt(self.captured_minor),
            "currency": self.currency,
            "state": self.state,
            "expires_ms": self.expires_ms,
            "placed_partition": self.placed_at[0],
            "placed_offset": self.placed_at[1],
        }


def _minor(text: str, currency: str) -> int:
    """An amount of a hold event; 0 when it is not a canonical one (the fold has named that)."""
    try:
        return canonical_balance_minor(text, currency)
    except (ValueError, KeyError):
        return 0


class HoldLedger:
    """The holds of the partitions one replay folds, and the checks on each of their events."""

    __slots__ = ("holds", "_report")

    def __init__(self, report: Report) -> None:
        self.holds: dict[tuple[str, str], LoggedHold] = {}  # (account, hold id) -> the hold
        self._report = report

    def file(self, event: HoldPlaced | HoldCaptured | HoldVoided | HoldExpired, partition: int, offset: int) -> None:
        key = (event.account_id, event.hold_id)
        hold = self.holds.get(key)
        if isinstance(event, HoldPlaced):
            if hold is not None and hold.state == OPEN:
                self._violation(
                    Kind.HOLD_PLACED_TWICE, "a hold placed again while it is open", event, partition, offset
                )
            amount_minor = _minor(event.amount, event.currency)
            self.holds[key] = LoggedHold(
                event.account_id,
                event.hold_id,
                event.to_account,
                event.currency,
                amount_minor,
                amount_minor,
                0,
                event.expires_ms,
                OPEN,
                (partition, offset),
            )
            return
        if hold is None:
            self._violation(Kind.HOLD_NOT_PLACED, "no hold_placed of this hold before it", event, partition, offset)
            return
        if hold.state != OPEN:
            self._violation(
                Kind.HOLD_AFTER_END,
                f"the hold had ended ({hold.state} at partition {hold.ended_at[0] if hold.ended_at else '?'} "
                f"offset {hold.ended_at[1] if hold.ended_at else '?'})",
                event,
                partition,
                offset,
            )
            return
        if isinstance(event, HoldExpired):
            if event.ts_ms < hold.expires_ms:
                self._violation(
                    Kind.HOLD_AFTER_END,
                    f"expired at {event.ts_ms}, before its time {hold.expires_ms}",
                    event,
                    partition,
                    offset,
                )
        elif event.ts_ms >= hold.expires_ms:
            self._violation(
                Kind.HOLD_AFTER_END,
                f"at {event.ts_ms}, after the hold's expiry at {hold.expires_ms}",
                event,
                partition,
                offset,
            )
        captured_minor = _minor(event.amount, hold.currency) if isinstance(event, HoldCaptured) else 0
        released_minor = _minor(event.released, hold.currency)
        taken_minor = captured_minor + released_minor
        ends = not isinstance(event, HoldCaptured) or event.final
        if taken_minor > hold.held_minor:
            self._violation(
                Kind.HOLD_OVERCAPTURED,
                f"takes {format_amount(taken_minor, hold.currency)} {hold.currency} from a hold that still "
                f"held {format_amount(hold.held_minor, hold.currency)} of "
                f"{format_amount(hold.amount_minor, hold.currency)}",
                event,
                partition,
                offset,
            )
        elif ends != (taken_minor == hold.held_minor) or (released_minor and not ends):
            self._violation(
                Kind.HOLD_RELEASE_MISMATCH,
                f"releases {format_amount(released_minor, hold.currency)} and {'ends' if ends else 'keeps'} a hold "
                f"that held {format_amount(hold.held_minor, hold.currency)} before capturing "
                f"{format_amount(captured_minor, hold.currency)}",
                event,
                partition,
                offset,
            )
        hold.held_minor = max(hold.held_minor - taken_minor, 0)
        hold.captured_minor += captured_minor
        if ends:
            hold.state, hold.ended_at = _END[type(event)], (partition, offset)

    def of_state(self, *states: str) -> list[LoggedHold]:
        """The holds in any of `states`, in the order they were placed."""
        return sorted((hold for hold in self.holds.values() if hold.state in states), key=lambda hold: hold.placed_at)

    def absorb(self, holds: dict[tuple[str, str], LoggedHold]) -> None:
        """Adds the holds of partitions another replay folded."""
        self.holds.update(holds)

    def _violation(self, kind: str, message: str, event, partition: int, offset: int) -> None:
        self._report(
            kind,
            f"{event_type(event)} of hold {event.hold_id!r}: {message}",
            partition,
            offset,
            account_id=event.account_id,
            transaction_id=event.transaction_id,
        )
