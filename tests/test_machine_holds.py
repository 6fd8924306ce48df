"""Every rule of holds in the pure state machine (Try-Confirm/Cancel): place, capture, void, expiry.

In the style of test_machine_rules (whose helpers these tests share): one partition's `State`,
saga legs carried by hand, two states where a test crosses partitions.
"""

from __future__ import annotations

import msgspec
import pytest

from schemas.codec import command_digest, encode
from schemas.commands import (
    HOLD_EXPIRY_MS_MAX,
    CaptureHold,
    CreditLeg,
    PlaceHold,
    RefundLeg,
    Role,
    Tick,
    VoidHold,
    WireCommand,
)
from schemas.events import (
    CommandRejected,
    Event,
    HoldCaptured,
    HoldExpired,
    HoldPlaced,
    HoldVoided,
    TransferCredited,
    TransferRefunded,
)
from schemas.outcomes import Outcome, Reason
from streams.core.errors import UndecidableInput
from streams.core.state import (
    CAPTURED,
    EXPIRED,
    IDEMPOTENCY_EVICT_STEP_MS,
    IDEMPOTENCY_WINDOW_MS,
    OPEN,
    VOIDED,
    CorruptLog,
    State,
    fold,
)
from tests.test_machine_rules import (
    TS_MS,
    apply,
    assert_rejected,
    balance,
    close,
    decode_wire,
    deposit,
    freeze,
    ledger,
    new_tx,
    open_account,
    outcomes_of,
    settle,
    snapshot,
    succeed,
    transfer,
    unfreeze,
    withdraw,
)

MINUTE_MS = 60_000


def place(
    account_id: str,
    to_account: str,
    amount: str,
    currency: str = "USD",
    *,
    expires_in_ms: int = 10 * MINUTE_MS,
    tx: str | None = None,
    actor: str | None = None,
    role: Role = "user",
) -> PlaceHold:
    return PlaceHold(
        transaction_id=tx or new_tx(),
        actor=actor or account_id,
        role=role,
        account_id=account_id,
        to_account=to_account,
        amount=amount,
        currency=currency,
        expires_in_ms=expires_in_ms,
    )


def capture(
    account_id: str,
    hold_id: str,
    amount: str | None = None,
    *,
    final: bool = True,
    tx: str | None = None,
    actor: str | None = None,
    role: Role = "user",
) -> CaptureHold:
    return CaptureHold(
        transaction_id=tx or new_tx(),
        actor=actor or account_id,
        role=role,
        account_id=account_id,
        hold_id=hold_id,
        amount=amount,
        final=final,
    )


def void(
    account_id: str, hold_id: str, *, tx: str | None = None, actor: str | None = None, role: Role = "user"
) -> VoidHold:
    return VoidHold(
        transaction_id=tx or new_tx(), actor=actor or account_id, role=role, account_id=account_id, hold_id=hold_id
    )


def tick(partition: int = 0) -> Tick:
    return Tick(transaction_id="tick", partition=partition)


def held(state: State, account_id: str) -> int:
    return state.accounts[account_id].held_minor


def available(state: State, account_id: str) -> int:
    account = state.accounts[account_id]
    return account.balance_minor - account.held_minor


def payer_and_payee(amount: str = "10.00") -> State:
    return ledger(("alice", "USD", "user", amount), ("shop", "USD", "merchant", ""))


def placed(state: State, command: PlaceHold, at_ms: int = TS_MS) -> str:
    decision = apply(state, command, at_ms)
    assert decision.outcome is not None and decision.outcome.status == "success", decision
    return command.transaction_id


def events_of(decisions) -> list[Event]:
    return [event for decision in decisions for event in decision.events]


# --- placing ----------------------------------------------------------------------------------------------------------


def test_a_hold_reserves_money_that_stays_in_the_balance_but_is_not_available() -> None:
    state = payer_and_payee()
    command = place("alice", "shop", "4", tx="h-1", expires_in_ms=5 * MINUTE_MS)
    decision = apply(state, command)
    assert decision.events == [
        HoldPlaced(
            account_id="alice",
            transaction_id="h-1",
            ts_ms=TS_MS,
            command="place_hold",
            digest=command_digest(command),
            actor="alice",
            seq=3,
            hold_id="h-1",
            to_account="shop",
            amount="4.00",
            currency="USD",
            expires_ms=TS_MS + 5 * MINUTE_MS,
            held="4.00",
            balance="10.00",
        )
    ]
    assert decision.follow_ups == []
    assert decision.outcome == Outcome(
        transaction_id="h-1", account_id="alice", actor="alice", status="success", digest=command_digest(command)
    )
    assert (balance(state, "alice"), held(state, "alice"), available(state, "alice")) == (1000, 400, 600)
    assert state.holds[("alice", "h-1")].status == OPEN


def test_a_hold_needs_available_funds_not_just_a_balance() -> None:
    state = payer_and_payee()
    placed(state, place("alice", "shop", "7.00"))
    command = place("alice", "shop", "3.01")
    assert_rejected(apply(state, command), command, Reason.INSUFFICIENT_FUNDS)
    placed(state, place("alice", "shop", "3.00"))
    assert (held(state, "alice"), available(state, "alice")) == (1000, 0)


@pytest.mark.parametrize("kind", ["withdraw", "transfer", "pay_merchant"])
def test_held_money_cannot_be_withdrawn_transferred_or_paid(kind: str) -> None:
    state = payer_and_payee()
    placed(state, place("alice", "shop", "6.00"))
    commands = {
        "withdraw": lambda amount: withdraw("alice", amount),
        "transfer": lambda amount: transfer("alice", "shop", amount),
        "pay_merchant": lambda amount: transfer("alice", "shop", amount, merchant=True),
    }
    refused = commands[kind]("4.01")
    assert_rejected(apply(state, refused), refused, Reason.INSUFFICIENT_FUNDS)
    assert [o.status for o in outcomes_of(settle(state, commands[kind]("4.00")))] == ["success"]
    assert (balance(state, "alice"), held(state, "alice")) == (600, 600)


@pytest.mark.parametrize(
    ("make_command", "reason"),
    [
        (lambda: place("alice", "alice", "1.00"), Reason.SAME_ACCOUNT),
        (lambda: place("alice", "shop", "1.00", expires_in_ms=0), Reason.INVALID_EXPIRY),
        (lambda: place("alice", "shop", "1.00", expires_in_ms=-1), Reason.INVALID_EXPIRY),
        (lambda: place("alice", "shop", "1.00", expires_in_ms=HOLD_EXPIRY_MS_MAX + 1), Reason.INVALID_EXPIRY),
        (lambda: place("alice", "shop", "0.00"), Reason.INVALID_AMOUNT),
        (lambda: place("alice", "shop", "1.001"), Reason.INVALID_AMOUNT),
        (lambda: place("alice", "shop", "1.00", "ZZZ"), Reason.UNKNOWN_CURRENCY),
        (lambda: place("alice", "shop", "1.00", "EUR"), Reason.CURRENCY_MISMATCH),
        (lambda: place("nobody", "shop", "1.00"), Reason.ACCOUNT_NOT_FOUND),
        (lambda: place("alice", "shop", "1.00", actor="mallory"), Reason.NOT_AUTHORIZED),
        (lambda: place("alice", "shop", "1.00", actor="operator", role="operator"), Reason.NOT_AUTHORIZED),
        (lambda: place("alice", "shop", "10.01"), Reason.INSUFFICIENT_FUNDS),
    ],
)
def test_place_refusals(make_command, reason: str) -> None:
    state = payer_and_payee()
    before = snapshot(state)
    command = make_command()
    assert_rejected(apply(state, command), command, reason)
    assert snapshot(state)[0] == before[0]
    assert state.holds == {}


def test_the_longest_expiry_is_accepted() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "1.00", expires_in_ms=HOLD_EXPIRY_MS_MAX))
    assert state.holds[("alice", hold_id)].expires_ms == TS_MS + HOLD_EXPIRY_MS_MAX


def test_a_frozen_account_cannot_place_a_hold_and_a_closed_one_neither() -> None:
    state = succeed(payer_and_payee(), freeze("alice"))
    command = place("alice", "shop", "1.00")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_FROZEN)
    succeed(state, unfreeze("alice"), withdraw("alice", "10.00"), close("alice"))
    command = place("alice", "shop", "1.00")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_CLOSED)


# --- capturing --------------------------------------------------------------------------------------------------------


def test_a_whole_capture_moves_the_held_money_to_the_destination_as_a_transfer_does() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "4.00", tx="h-1"))
    command = capture("alice", hold_id, tx="c-1")
    digest = command_digest(command)
    decision = apply(state, command)
    assert decision.events == [
        HoldCaptured(
            account_id="alice",
            transaction_id="c-1",
            ts_ms=TS_MS,
            command="capture_hold",
            digest=digest,
            actor="alice",
            seq=4,
            amount="4.00",
            currency="USD",
            balance="6.00",
            hold_id="h-1",
            to_account="shop",
            held="0.00",
            released="0.00",
            final=True,
        )
    ]
    assert decision.follow_ups == [
        CreditLeg(
            transaction_id="c-1",
            actor="alice",
            issued_ms=TS_MS,
            from_account="alice",
            to_account="shop",
            amount="4.00",
            currency="USD",
            digest=digest,
        )
    ]
    assert decision.outcome is None  # in flight until the destination credits
    # The captured money left the balance and the held total at once, and is in flight.
    assert (balance(state, "alice"), held(state, "alice")) == (600, 0)
    assert (state.accounts["alice"].in_flight_count, state.accounts["alice"].in_flight_minor) == (1, 400)
    credit = apply(state, decision.follow_ups[0])
    assert [type(event) for event in credit.events] == [TransferCredited]
    assert credit.outcome == Outcome(
        transaction_id="c-1", account_id="alice", actor="alice", status="success", digest=digest
    )
    assert balance(state, "shop") == 400
    assert state.holds[("alice", "h-1")].status == CAPTURED


def test_a_capture_across_two_partitions_takes_the_same_two_legs() -> None:
    payer = ledger(("alice", "USD", "user", "10.00"))
    payee = ledger(("shop", "USD", "merchant", ""))
    hold_id = placed(payer, place("alice", "shop", "4.00"))
    [leg] = apply(payer, capture("alice", hold_id, "2.50")).follow_ups
    credit = apply(payee, decode_wire(leg))
    assert credit.outcome is not None and credit.outcome.status == "success"
    assert (balance(payer, "alice"), held(payer, "alice"), balance(payee, "shop")) == (750, 0, 250)
    assert "shop" not in payer.accounts and "alice" not in payee.accounts


def test_partial_captures_take_from_the_hold_until_it_is_used_up() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    for amount, held_after, ends in (("1.00", 400, False), ("2.50", 150, False), ("1.50", 0, True)):
        [captured] = [e for d in settle(state, capture("alice", hold_id, amount, final=False)) for e in d.events][:1]
        assert isinstance(captured, HoldCaptured)
        assert (captured.amount, captured.released, captured.final) == (amount, "0.00", ends)
        assert held(state, "alice") == held_after
    hold = state.holds[("alice", hold_id)]
    assert (hold.status, hold.captured_minor, hold.held_minor) == (CAPTURED, 500, 0)
    assert (balance(state, "alice"), balance(state, "shop")) == (500, 500)
    command = capture("alice", hold_id, "0.01", final=False)
    assert_rejected(apply(state, command), command, Reason.HOLD_CAPTURED)


def test_a_final_partial_capture_releases_the_rest() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    [captured] = apply(state, capture("alice", hold_id, "2.00")).events
    assert isinstance(captured, HoldCaptured)
    assert (captured.amount, captured.released, captured.held, captured.final) == ("2.00", "3.00", "0.00", True)
    assert (balance(state, "alice"), held(state, "alice"), available(state, "alice")) == (800, 0, 800)


def test_a_capture_beyond_what_the_hold_still_holds_is_refused_never_partly_done() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    settle(state, capture("alice", hold_id, "3.00", final=False))
    before = snapshot(state)
    command = capture("alice", hold_id, "2.01")
    assert_rejected(apply(state, command), command, Reason.CAPTURE_EXCEEDS_HOLD)
    assert snapshot(state)[0] == before[0]
    assert state.holds[("alice", hold_id)].held_minor == 200
    # Without an amount a capture takes all that is still held.
    [captured] = apply(state, capture("alice", hold_id)).events
    assert isinstance(captured, HoldCaptured) and captured.amount == "2.00"


@pytest.mark.parametrize("amount", ["0.00", "-1.00", "1.001", "1e2", ""])
def test_a_capture_of_an_unacceptable_amount_is_invalid_amount(amount: str) -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    command = capture("alice", hold_id, amount)
    assert_rejected(apply(state, command), command, Reason.INVALID_AMOUNT)
    assert held(state, "alice") == 500


@pytest.mark.parametrize(
    "receiver_setup",
    [[open_account("shop"), freeze("shop")], [open_account("shop", "EUR")], []],
    ids=["frozen", "other_currency", "missing"],
)
def test_a_capture_the_destination_refuses_is_refunded_and_the_hold_stays_released(receiver_setup) -> None:
    state = succeed(ledger(("alice", "USD", "user", "10.00")), *receiver_setup)
    hold_id = placed(state, place("alice", "shop", "4.00"))
    command = capture("alice", hold_id, "3.00")  # final: the other 1.00 is released at once
    decisions = settle(state, command)
    assert [type(event) for event in events_of(decisions)] == [HoldCaptured, CommandRejected, TransferRefunded]
    [outcome] = outcomes_of(decisions)
    assert (outcome.status, outcome.account_id, outcome.digest) == ("failure", "alice", command_digest(command))
    assert outcome.reason in (Reason.ACCOUNT_FROZEN, Reason.CURRENCY_MISMATCH, Reason.ACCOUNT_NOT_FOUND)
    # The refund is available money again; the hold is not re-opened.
    assert (balance(state, "alice"), held(state, "alice"), available(state, "alice")) == (1000, 0, 1000)
    assert state.accounts["alice"].in_flight_count == 0
    assert state.holds[("alice", hold_id)].status == CAPTURED
    again = capture("alice", hold_id, tx=new_tx())
    assert_rejected(apply(state, again), again, Reason.HOLD_CAPTURED)


def test_capture_and_void_are_for_the_payers_owner_or_an_operator_only() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    for stranger in (capture("alice", hold_id, actor="shop"), void("alice", hold_id, actor="mallory")):
        assert_rejected(apply(state, stranger), stranger, Reason.NOT_AUTHORIZED)
    settle(state, capture("alice", hold_id, "1.00", final=False, actor="ops", role="operator"))
    succeed(state, void("alice", hold_id, actor="ops", role="operator"))
    assert (balance(state, "alice"), held(state, "alice"), balance(state, "shop")) == (900, 0, 100)


def test_capture_or_void_of_a_hold_the_account_does_not_know_is_hold_not_found() -> None:
    state = payer_and_payee()
    placed(state, place("alice", "shop", "1.00", tx="h-1"))
    for command in (capture("alice", "h-2"), void("alice", "h-2"), capture("shop", "h-1", actor="shop")):
        assert_rejected(apply(state, command), command, Reason.HOLD_NOT_FOUND)
    command = capture("nobody", "h-1")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_NOT_FOUND)


# --- voiding ----------------------------------------------------------------------------------------------------------


def test_a_void_releases_what_the_hold_still_holds_and_ends_it() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    settle(state, capture("alice", hold_id, "2.00", final=False))
    command = void("alice", hold_id, tx="v-1")
    decision = apply(state, command)
    assert decision.events == [
        HoldVoided(
            account_id="alice",
            transaction_id="v-1",
            ts_ms=TS_MS,
            command="void_hold",
            digest=command_digest(command),
            actor="alice",
            seq=5,
            hold_id=hold_id,
            released="3.00",
            currency="USD",
            held="0.00",
        )
    ]
    assert decision.outcome is not None and decision.outcome.status == "success"
    assert (balance(state, "alice"), available(state, "alice")) == (800, 800)
    assert state.holds[("alice", hold_id)].status == VOIDED
    for late in (capture("alice", hold_id), void("alice", hold_id)):
        assert_rejected(apply(state, late), late, Reason.HOLD_VOIDED)


def test_a_void_of_a_captured_hold_is_refused_as_hold_captured() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    settle(state, capture("alice", hold_id))
    command = void("alice", hold_id)
    assert_rejected(apply(state, command), command, Reason.HOLD_CAPTURED)
    assert (balance(state, "alice"), balance(state, "shop")) == (500, 500)


# --- freeze and close -------------------------------------------------------------------------------------------------


def test_a_frozen_account_cannot_capture_but_may_void_and_its_holds_expire() -> None:
    state = payer_and_payee()
    voided = placed(state, place("alice", "shop", "2.00"))
    expiring = placed(state, place("alice", "shop", "3.00", expires_in_ms=MINUTE_MS))
    succeed(state, freeze("alice"))
    command = capture("alice", voided)
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_FROZEN)
    succeed(state, void("alice", voided))
    [expiry] = apply(state, tick(), TS_MS + MINUTE_MS).events
    assert isinstance(expiry, HoldExpired) and expiry.hold_id == expiring
    assert (balance(state, "alice"), held(state, "alice"), state.accounts["alice"].status) == (1000, 0, "frozen")


def test_close_is_refused_while_a_hold_is_open() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "10.00"))
    command = close("alice")
    assert_rejected(apply(state, command), command, Reason.HOLDS_OPEN)
    succeed(state, void("alice", hold_id), withdraw("alice", "10.00"), close("alice"))


# --- expiry -----------------------------------------------------------------------------------------------------------


def test_any_command_at_or_after_the_expiry_expires_the_hold_first() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "10.00", expires_in_ms=MINUTE_MS))
    command = withdraw("alice", "10.00")  # needs the held money: possible only once it expired
    decision = apply(state, command, TS_MS + MINUTE_MS)
    assert [type(event) for event in decision.events] == [HoldExpired, type(decision.events[1])]
    expiry = decision.events[0]
    assert expiry == HoldExpired(
        account_id="alice",
        transaction_id=hold_id,
        ts_ms=TS_MS + MINUTE_MS,
        command="withdraw",
        digest=state.holds[("alice", hold_id)].digest,
        actor="alice",
        seq=4,
        hold_id=hold_id,
        released="10.00",
        currency="USD",
        held="0.00",
    )
    assert decision.outcome is not None and decision.outcome.status == "success"
    assert (balance(state, "alice"), held(state, "alice")) == (0, 0)


def test_a_hold_is_still_open_one_millisecond_before_its_expiry() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "1.00", expires_in_ms=MINUTE_MS))
    assert apply(state, tick(), TS_MS + MINUTE_MS - 1).events == []
    settle(state, capture("alice", hold_id), TS_MS + MINUTE_MS - 1)
    assert balance(state, "shop") == 100


def test_a_capture_or_void_after_the_expiry_is_refused_as_hold_expired() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "4.00", expires_in_ms=MINUTE_MS))
    command = capture("alice", hold_id)
    decision = apply(state, command, TS_MS + 2 * MINUTE_MS)
    assert [type(event) for event in decision.events] == [HoldExpired, CommandRejected]
    assert decision.outcome is not None and decision.outcome.reason == Reason.HOLD_EXPIRED
    late = void("alice", hold_id)
    assert_rejected(apply(state, late, TS_MS + 2 * MINUTE_MS), late, Reason.HOLD_EXPIRED)
    assert (balance(state, "alice"), held(state, "alice"), balance(state, "shop")) == (1000, 0, 0)
    assert state.holds[("alice", hold_id)].status == EXPIRED


def test_holds_expire_in_expiry_order_then_key_order_whatever_the_order_they_were_placed_in() -> None:
    state = ledger(("bob", "USD", "user", "10.00"), ("alice", "USD", "user", "10.00"), ("shop", "USD", "user", ""))
    placed(state, place("bob", "shop", "1.00", tx="h-b", expires_in_ms=2 * MINUTE_MS))
    placed(state, place("bob", "shop", "1.00", tx="h-a", expires_in_ms=2 * MINUTE_MS))
    placed(state, place("alice", "shop", "1.00", tx="h-z", expires_in_ms=2 * MINUTE_MS))
    placed(state, place("bob", "shop", "1.00", tx="h-late", expires_in_ms=3 * MINUTE_MS))
    placed(state, place("bob", "shop", "1.00", tx="h-early", expires_in_ms=MINUTE_MS))
    decision = apply(state, tick(), TS_MS + 3 * MINUTE_MS)
    assert [(e.account_id, e.transaction_id) for e in decision.events] == [
        ("bob", "h-early"),
        ("alice", "h-z"),
        ("bob", "h-a"),
        ("bob", "h-b"),
        ("bob", "h-late"),
    ]
    assert all(isinstance(event, HoldExpired) and event.command == "tick" for event in decision.events)
    assert (decision.follow_ups, decision.outcome) == ([], None)


def test_a_tick_that_expires_nothing_leaves_no_event_no_answer_and_no_trace() -> None:
    state = payer_and_payee()
    placed(state, place("alice", "shop", "1.00", expires_in_ms=MINUTE_MS))
    before = snapshot(state)
    decision = apply(state, tick(), TS_MS + MINUTE_MS // 2)
    assert decision.events == decision.follow_ups == []
    assert decision.outcome is None
    assert snapshot(state) == before  # not remembered, and the clock stays where the log leaves it


def test_a_leg_the_core_cannot_decide_expires_nothing() -> None:
    # What is dead-lettered must leave the state untouched, due expiries included: the replay
    # skips the record, so an expiry folded here would be in no log.
    state = payer_and_payee()
    placed(state, place("alice", "shop", "1.00", expires_in_ms=MINUTE_MS))
    before = snapshot(state)
    forged = RefundLeg(
        transaction_id="nothing",
        actor="alice",
        issued_ms=TS_MS,
        from_account="alice",
        to_account="shop",
        amount="1.00",
        currency="USD",
        digest="nothing",
        reason=Reason.ACCOUNT_FROZEN,
        debit_ms=TS_MS,
    )
    malformed = CreditLeg(
        transaction_id="nothing",
        actor="shop",
        issued_ms=TS_MS,
        from_account="shop",
        to_account="alice",
        amount="-1.00",
        currency="USD",
        digest="nothing",
    )
    for leg in (forged, malformed):
        with pytest.raises(UndecidableInput):
            apply(state, leg, TS_MS + 2 * MINUTE_MS)
        assert snapshot(state) == before
        assert state.holds[("alice", next(iter(state.holds))[1])].status == OPEN


def test_a_leg_decided_after_the_expiry_carries_the_expiry_first() -> None:
    payer = ledger(("alice", "USD", "user", "10.00"), ("carol", "USD", "user", "5.00"))
    payee = ledger(("bob", "USD", "user", ""))
    hold_id = placed(payer, place("alice", "bob", "1.00", expires_in_ms=MINUTE_MS))
    [leg] = apply(payer, transfer("carol", "ghost", "1.00")).follow_ups  # refused on another partition
    [refund] = apply(payee, decode_wire(leg)).follow_ups
    decision = apply(payer, decode_wire(refund), TS_MS + MINUTE_MS)
    assert [type(event) for event in decision.events] == [HoldExpired, TransferRefunded]
    assert (decision.events[0].transaction_id, decision.events[0].command) == (hold_id, "refund_leg")


# --- idempotency ------------------------------------------------------------------------------------------------------


def test_retries_of_place_capture_and_void_get_the_first_answer_and_move_nothing() -> None:
    state = payer_and_payee()
    place_command = place("alice", "shop", "5.00")
    first_place = apply(state, place_command)
    hold_id = place_command.transaction_id
    capture_command = capture("alice", hold_id, "2.00", final=False)
    [first_capture] = outcomes_of(settle(state, capture_command))
    void_command = void("alice", hold_id)
    first_void = apply(state, void_command)
    before = snapshot(state)
    assert encode(apply(state, place_command, TS_MS + 1).outcome) == encode(first_place.outcome)
    retried_capture = settle(state, capture_command, TS_MS + 1)
    assert events_of(retried_capture) == []
    assert [encode(o) for o in outcomes_of(retried_capture)] == [encode(first_capture)]
    assert encode(apply(state, void_command, TS_MS + 1).outcome) == encode(first_void.outcome)
    assert snapshot(state) == before


def test_a_retried_capture_in_flight_resends_a_credit_leg_that_moves_no_money() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    command = capture("alice", hold_id, "2.00", final=False)
    [original] = apply(state, command).follow_ups
    retry = apply(state, command, TS_MS + 500)
    assert (retry.events, retry.outcome) == ([], None)
    assert retry.follow_ups == [msgspec.structs.replace(original, issued_ms=TS_MS + 500, resend=True)]
    decisions = [apply(state, leg) for leg in (original, retry.follow_ups[0])]
    assert [type(event) for event in events_of(decisions)] == [TransferCredited]
    assert {encode(o) for o in outcomes_of(decisions)} == {
        encode(
            Outcome(
                transaction_id=command.transaction_id,
                account_id="alice",
                actor="alice",
                status="success",
                digest=command_digest(command),
            )
        )
    }
    assert (balance(state, "alice"), held(state, "alice"), balance(state, "shop")) == (800, 300, 200)


def test_another_request_under_a_hold_id_is_a_duplicate_conflict() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00", tx="h-1"))
    for conflicting in (place("alice", "shop", "6.00", tx="h-1"), void("alice", hold_id, tx="h-1")):
        assert_rejected(apply(state, conflicting), conflicting, Reason.DUPLICATE_CONFLICT)
    assert held(state, "alice") == 500


def test_a_hold_outlives_the_memory_of_its_place_and_a_late_retry_still_gets_the_first_answer() -> None:
    state = payer_and_payee()
    command = place("alice", "shop", "5.00", tx="h-1", expires_in_ms=HOLD_EXPIRY_MS_MAX)
    first = apply(state, command)
    later_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + 2 * IDEMPOTENCY_EVICT_STEP_MS
    succeed(state, deposit("alice", "1.00"), at_ms=later_ms)  # the partition's clock passes the window
    assert ("alice", "h-1", "") not in state.memory
    retry = apply(state, command, later_ms)
    assert (retry.events, encode(retry.outcome)) == ([], encode(first.outcome))
    conflicting = place("alice", "shop", "1.00", tx="h-1")
    assert_rejected(apply(state, conflicting, later_ms), conflicting, Reason.DUPLICATE_CONFLICT)
    assert held(state, "alice") == 500
    settle(state, capture("alice", "h-1"), later_ms)
    assert balance(state, "shop") == 500


def test_an_ended_hold_is_forgotten_a_window_after_its_end() -> None:
    state = payer_and_payee()
    hold_id = placed(state, place("alice", "shop", "5.00"))
    succeed(state, void("alice", hold_id))
    within_ms = TS_MS + IDEMPOTENCY_WINDOW_MS - IDEMPOTENCY_EVICT_STEP_MS
    late = void("alice", hold_id)
    assert_rejected(apply(state, late, within_ms), late, Reason.HOLD_VOIDED)
    past_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + 2 * IDEMPOTENCY_EVICT_STEP_MS
    later = void("alice", hold_id)
    assert_rejected(apply(state, later, past_ms), later, Reason.HOLD_NOT_FOUND)
    assert state.holds == {}


# --- fold -------------------------------------------------------------------------------------------------------------


def test_folding_the_events_rebuilds_exactly_the_live_state_its_holds_and_their_deadlines() -> None:
    live = State()
    events: list[Event] = []
    script: list[tuple[int, WireCommand]] = [
        (TS_MS, open_account("alice")),
        (TS_MS, open_account("shop", kind="merchant")),
        (TS_MS, deposit("alice", "20.00")),
        (TS_MS, place("alice", "shop", "5.00", tx="h-partial")),
        (TS_MS, place("alice", "shop", "3.00", tx="h-void")),
        (TS_MS, place("alice", "ghost", "2.00", tx="h-refused")),
        (TS_MS, place("alice", "shop", "4.00", tx="h-expire", expires_in_ms=MINUTE_MS)),
        (TS_MS, place("alice", "shop", "1.00", tx="h-open", expires_in_ms=HOLD_EXPIRY_MS_MAX)),
        (TS_MS + 1, capture("alice", "h-partial", "1.00", final=False)),
        (TS_MS + 2, capture("alice", "h-partial", "1.50")),
        (TS_MS + 3, void("alice", "h-void")),
        (TS_MS + 4, capture("alice", "h-refused")),
        (TS_MS + MINUTE_MS, tick()),
        (TS_MS + MINUTE_MS, capture("alice", "h-expire")),
    ]
    for at_ms, command in script:
        for decision in settle(live, command, at_ms):
            events += decision.events
    rebuilt = State()
    for event in events:
        fold(rebuilt, event)
    assert rebuilt.accounts == live.accounts
    assert rebuilt.holds == live.holds
    assert rebuilt.memory == live.memory
    assert rebuilt.clock_ms == live.clock_ms
    assert {key: hold.status for key, hold in live.holds.items()} == {
        ("alice", "h-partial"): CAPTURED,
        ("alice", "h-void"): VOIDED,
        ("alice", "h-refused"): CAPTURED,
        ("alice", "h-expire"): EXPIRED,
        ("alice", "h-open"): OPEN,
    }
    # The rebuilt deadlines expire the open hold at the same time as the live ones.
    late_ms = TS_MS + HOLD_EXPIRY_MS_MAX
    assert [encode(e) for e in apply(rebuilt, tick(), late_ms).events] == [
        encode(e) for e in apply(live, tick(), late_ms).events
    ]


def hold_log() -> tuple[State, list[Event]]:
    """alice holds 5.00 of her 10.00 for shop (h-1) and captured 2.00 of it, and holds 2.00
    more (h-other); its events."""
    state, events = State(), []
    for command in (
        open_account("alice"),
        deposit("alice", "10.00"),
        place("alice", "shop", "5.00", tx="h-1", expires_in_ms=MINUTE_MS),
        place("alice", "shop", "2.00", tx="h-other", expires_in_ms=HOLD_EXPIRY_MS_MAX),
        capture("alice", "h-1", "2.00", final=False, tx="c-1"),
    ):
        events += apply(state, command).events
    return state, events


def refold(events: list[Event]) -> State:
    state = State()
    for event in events:
        fold(state, event)
    return state


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        # Within what the account holds (3.00 + 2.00), beyond what h-1 still holds (3.00).
        (lambda e: msgspec.structs.replace(e, amount="3.01", balance="4.99", held="1.99"), "takes"),
        (lambda e: msgspec.structs.replace(e, hold_id="h-2"), "unknown"),
        (lambda e: msgspec.structs.replace(e, held="4.01"), "does not follow"),
        (lambda e: msgspec.structs.replace(e, final=True), "does not end"),
        (lambda e: msgspec.structs.replace(e, to_account="mallory"), "does not end"),
        (lambda e: msgspec.structs.replace(e, ts_ms=e.ts_ms + MINUTE_MS), "after its expiry"),
    ],
    ids=["beyond_the_hold", "unknown_hold", "held_does_not_follow", "final_that_is_not", "other_destination", "late"],
)
def test_fold_raises_corrupt_log_on_a_forged_capture(forge, message: str) -> None:
    _, events = hold_log()
    captured = events[-1]
    assert isinstance(captured, HoldCaptured)
    second = msgspec.structs.replace(captured, transaction_id="c-2", seq=captured.seq + 1, amount="1.00")
    second = msgspec.structs.replace(second, balance="7.00", held="4.00")
    refold(events + [second])  # the genuine second capture folds
    with pytest.raises(CorruptLog, match=message):
        refold(events + [forge(second)])


def test_fold_raises_corrupt_log_on_an_expiry_before_its_time_and_on_holding_more_than_the_balance() -> None:
    _, events = hold_log()
    early = HoldExpired(
        account_id="alice",
        transaction_id="h-1",
        ts_ms=TS_MS + 1,
        command="tick",
        digest="d",
        actor="alice",
        seq=6,
        hold_id="h-1",
        released="3.00",
        currency="USD",
        held="2.00",
    )
    with pytest.raises(CorruptLog, match="before its time"):
        refold(events + [early])
    refold(events + [msgspec.structs.replace(early, ts_ms=TS_MS + MINUTE_MS)])
    placed_event = events[2]
    assert isinstance(placed_event, HoldPlaced)
    with pytest.raises(CorruptLog, match="does not follow"):
        refold(events[:2] + [msgspec.structs.replace(placed_event, amount="10.01", held="10.01")])


def test_a_fold_over_accounts_alone_checks_the_held_arithmetic_without_the_holds() -> None:
    # The read model and the audit fold without the memory: the account's held total still
    # follows every hold event, and a forged one still stops the fold.
    live, events = hold_log()
    accounts_only = State(tracks_memory=False)
    for event in events:
        fold(accounts_only, event)
    assert accounts_only.accounts["alice"].held_minor == live.accounts["alice"].held_minor == 500
    assert accounts_only.accounts["alice"].balance_minor == 800
    assert accounts_only.holds == {}
    forged = msgspec.structs.replace(events[-1], seq=6, transaction_id="c-2", held="0.00")
    with pytest.raises(CorruptLog):
        fold(accounts_only, forged)


def test_a_late_retry_of_a_place_leaves_the_state_a_fold_of_the_events() -> None:
    # The retry answers from the hold and leaves no event, so it must not move the clock (and
    # forget what the clock's advance forgets) either: the state stays the fold of the log.
    state, events = State(), []
    command = place("alice", "shop", "5.00", tx="h-1", expires_in_ms=HOLD_EXPIRY_MS_MAX)
    for setup in (open_account("alice"), deposit("alice", "10.00"), command):
        events += apply(state, setup).events
    retry = apply(state, command, TS_MS + IDEMPOTENCY_WINDOW_MS + 5 * IDEMPOTENCY_EVICT_STEP_MS)
    assert retry.events == [] and retry.outcome is not None and retry.outcome.status == "success"
    rebuilt = refold(events)
    assert (rebuilt.clock_ms, rebuilt.memory) == (state.clock_ms, state.memory)
