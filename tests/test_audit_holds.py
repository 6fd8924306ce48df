"""The audit's view of holds, on logs held in memory (no broker): held money counts in the
balances, a capture is in flight until credited or refunded, open and expired holds are listed,
and a capture beyond a hold's amount or after its end is named."""

from __future__ import annotations

import msgspec

from benchmarks.support.reference_pipeline import Record, ReferenceLog, decide
from consumers.audit.holds import EXPIRED, OPEN
from consumers.audit.violations import Kind
from schemas.codec import decode_event, encode
from schemas.commands import CaptureHold, Deposit, OpenAccount, PlaceHold, Tick, VoidHold
from schemas.events import HoldCaptured
from schemas.partitioning import partition_for
from tests.support.commands import edge
from tests.test_audit_checks import PARTITIONS, RECEIVER, SENDER, _determinism, _replay

# The reference pipeline stamps records 7 ms apart: an expiry this short passes within a few records.
SHORT_EXPIRY_MS = 20
LONG_EXPIRY_MS = 3_600_000


def _hold_log(*extra) -> ReferenceLog:
    """alice (partition 1) holds for bob (partition 0): h-part captured in two parts, h-void
    voided, h-gone captured to an account that does not exist (refunded), h-exp left to expire
    (a tick on alice's partition expires it), h-open left open."""
    alice_partition = partition_for(SENDER, PARTITIONS)

    def hold(hold_id: str, amount: str, expires_in_ms: int = LONG_EXPIRY_MS, to_account: str = RECEIVER):
        return edge(
            PlaceHold,
            transaction_id=hold_id,
            account_id=SENDER,
            to_account=to_account,
            amount=amount,
            currency="USD",
            expires_in_ms=expires_in_ms,
        )

    commands = [
        edge(OpenAccount, transaction_id="o-s", account_id=SENDER, currency="USD"),
        edge(OpenAccount, transaction_id="o-r", account_id=RECEIVER, currency="USD"),
        edge(Deposit, transaction_id="d-s", account_id=SENDER, amount="20.00", currency="USD"),
        hold("h-part", "5.00"),
        hold("h-void", "3.00"),
        hold("h-gone", "2.00", to_account="nobody"),
        hold("h-exp", "4.00", SHORT_EXPIRY_MS),
        hold("h-open", "1.00"),
        edge(CaptureHold, transaction_id="c-1", account_id=SENDER, hold_id="h-part", amount="1.50", final=False),
        edge(CaptureHold, transaction_id="c-2", account_id=SENDER, hold_id="h-part", amount="2.00"),
        edge(VoidHold, transaction_id="v-1", account_id=SENDER, hold_id="h-void"),
        edge(CaptureHold, transaction_id="c-3", account_id=SENDER, hold_id="h-gone"),
        Record(SENDER.encode(), encode(Tick(transaction_id="tick", partition=alice_partition))),
        *extra,
    ]
    return decide(commands, PARTITIONS)


def test_a_log_with_holds_passes_with_held_money_in_the_balances_and_lists_open_and_expired_holds():
    log = _hold_log()
    replay = _replay(log, settled=True)
    assert replay.violations == [] and replay.in_flight == []
    [usd] = replay.currencies
    # 20.00 deposited: 3.50 captured to bob, the rest (1.00 still held) in alice's balance.
    assert (usd.deposited_minor, usd.balances_minor, usd.in_flight_minor, usd.created_minor) == (2000, 2000, 0, 0)
    alice = replay.replay.states[partition_for(SENDER, PARTITIONS)].accounts[SENDER]
    assert (alice.balance_minor, alice.held_minor) == (1650, 100)
    holds = replay.replay.holds
    assert [hold.hold_id for hold in holds.of_state(OPEN)] == ["h-open"]
    [expired] = holds.of_state(EXPIRED)
    assert (expired.hold_id, expired.held_minor, expired.captured_minor) == ("h-exp", 0, 0)
    assert {hold.hold_id: hold.state for hold in holds.holds.values()} == {
        "h-part": "captured",
        "h-void": "voided",
        "h-gone": "captured",
        "h-exp": "expired",
        "h-open": "open",
    }


def test_a_capture_is_in_flight_until_the_destination_credits_it():
    log = decide(
        [
            edge(OpenAccount, transaction_id="o-s", account_id=SENDER, currency="USD"),
            edge(Deposit, transaction_id="d-s", account_id=SENDER, amount="5.00", currency="USD"),
            edge(
                PlaceHold,
                transaction_id="h",
                account_id=SENDER,
                to_account=RECEIVER,
                amount="5.00",
                currency="USD",
                expires_in_ms=LONG_EXPIRY_MS,
            ),
            edge(CaptureHold, transaction_id="c", account_id=SENDER, hold_id="h", amount="2.00", final=False),
        ],
        PARTITIONS,
        hold_legs_of=frozenset({"c"}),
    )
    replay = _replay(log)
    assert replay.violations == []
    [flying] = replay.in_flight
    assert (flying.transaction_id, flying.from_account, flying.to_account, flying.amount) == (
        "c",
        SENDER,
        RECEIVER,
        "2.00",
    )
    [usd] = replay.currencies
    assert (usd.balances_minor, usd.in_flight_minor, usd.created_minor) == (300, 200, 0)
    assert {v.kind for v in _replay(log, settled=True).violations} == {Kind.IN_FLIGHT_WHEN_SETTLED}


def test_replaying_the_commands_with_holds_and_ticks_reproduces_the_events_byte_for_byte():
    log = _hold_log()
    result = _determinism(log, set(), settled=True)
    assert result.violations == []
    assert result.events_reproduced == log.event_count


def _alice_events(log: ReferenceLog) -> list[Record]:
    return log.events[partition_for(SENDER, PARTITIONS)]


def _last_capture(records: list[Record], hold_id: str) -> HoldCaptured:
    return next(
        event
        for record in reversed(records)
        if isinstance(event := decode_event(record.value), HoldCaptured) and event.hold_id == hold_id
    )


def _append(log: ReferenceLog, event) -> None:
    _alice_events(log).append(Record(SENDER.encode(), encode(event)))


def _forged_capture(log: ReferenceLog, hold_id: str, amount_minor: int, **fields) -> HoldCaptured:
    """A capture of `hold_id` whose account-level numbers follow alice's last event."""
    state = log.states[partition_for(SENDER, PARTITIONS)].accounts[SENDER]
    template = _last_capture(_alice_events(log), "h-part")

    def usd(minor: int) -> str:
        return f"{minor // 100}.{minor % 100:02d}"

    return msgspec.structs.replace(
        template,
        transaction_id=f"forged-{hold_id}",
        digest="forged",
        ts_ms=max(state_clock(log), template.ts_ms),
        seq=state.seq + 1,
        hold_id=hold_id,
        amount=usd(amount_minor),
        balance=usd(state.balance_minor - amount_minor),
        held=usd(state.held_minor - amount_minor),
        released="0.00",
        final=False,
        **fields,
    )


def state_clock(log: ReferenceLog) -> int:
    return log.states[partition_for(SENDER, PARTITIONS)].clock_ms


def test_a_capture_beyond_what_the_hold_still_holds_is_named():
    # h-open holds 1.00 and h-more 3.00: taking 1.50 from h-open keeps alice's held total and
    # balance consistent, so only the hold itself shows the excess.
    log = _hold_log(
        edge(
            PlaceHold,
            transaction_id="h-more",
            account_id=SENDER,
            to_account=RECEIVER,
            amount="3.00",
            currency="USD",
            expires_in_ms=LONG_EXPIRY_MS,
        )
    )
    _append(log, _forged_capture(log, "h-open", 150))
    kinds = {v.kind for v in _replay(log).violations}
    assert Kind.HOLD_OVERCAPTURED in kinds
    assert Kind.BALANCE_MISMATCH not in kinds  # the account's own numbers follow: only the hold shows it


def test_a_capture_after_the_hold_was_voided_or_past_its_expiry_is_named():
    log = _hold_log()
    _append(log, _forged_capture(log, "h-void", 100, to_account=RECEIVER))
    assert Kind.HOLD_AFTER_END in {v.kind for v in _replay(log).violations}

    log = _hold_log()
    late = _forged_capture(log, "h-open", 100)
    _append(log, msgspec.structs.replace(late, ts_ms=late.ts_ms + 2 * LONG_EXPIRY_MS))
    after_expiry = [v for v in _replay(log).violations if v.kind == Kind.HOLD_AFTER_END]
    assert after_expiry and "after the hold's expiry" in after_expiry[0].message


def test_an_event_of_a_hold_never_placed_is_named():
    log = _hold_log()
    _append(log, _forged_capture(log, "h-never", 100))
    assert Kind.HOLD_NOT_PLACED in {v.kind for v in _replay(log).violations}
