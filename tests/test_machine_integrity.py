"""Ledger integrity and authorisation in the pure core (issues 12 and 13).

Legs reach the core only after the runtime verified their MAC; these tests hand the core legs
directly, as a compromised-but-signed or replayed record would arrive, and check that it
validates every leg fully, never lets one record move money twice, keeps the balance cap and
decides who may move whose money.
"""

from __future__ import annotations

import msgspec
import pytest

from schemas.codec import SchemaError, command_digest, decode_command, encode
from schemas.commands import CreditLeg, RefundLeg, Role
from schemas.events import AccountOpened, CommandRejected, Deposited, TransferCredited
from schemas.leg_auth import LegKeyError, LegKeyring
from schemas.outcomes import Reason
from streams.core.errors import UndecidableInput
from streams.core.money import AMOUNT_MINOR_MAX, BALANCE_MINOR_MAX, format_amount
from streams.core.state import IDEMPOTENCY_WINDOW_MS, LEG_AGE_MAX_MS, LEG_CLOCK_SKEW_MAX_MS, State, fold
from tests.test_machine_holds import capture, payer_and_payee, place, placed, void
from tests.test_machine_rules import (
    TS_MS,
    apply,
    assert_rejected,
    balance,
    close,
    debit_in_transit,
    deposit,
    freeze,
    ledger,
    open_account,
    outcomes_of,
    settle,
    snapshot,
    succeed,
    transfer,
    unfreeze,
    withdraw,
)


def refused_transfer(amount: str = "4.00") -> tuple[State, CreditLeg, RefundLeg]:
    """alice sent `amount` to a frozen bob: (state, the credit leg, the refund leg not yet applied)."""
    state = succeed(ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", "")), freeze("bob"))
    leg = debit_in_transit(state, transfer("alice", "bob", amount, tx="t-1"))
    [refund] = apply(state, leg).follow_ups
    assert isinstance(refund, RefundLeg)
    return state, leg, refund


# --- legs are validated fully before the core decides them ------------------------------------------------------------


@pytest.mark.parametrize("amount", ["-5.00", "0.00", "-0.00", "-.50", "00005.00", "5.0", "5", "1e3", ""])
@pytest.mark.parametrize("leg_type", ["credit", "refund"])
def test_a_leg_that_is_not_a_positive_canonical_amount_is_undecidable_and_folds_nothing(
    leg_type: str, amount: str
) -> None:
    state, credit, refund = refused_transfer()
    leg = msgspec.structs.replace(credit if leg_type == "credit" else refund, amount=amount)
    before = snapshot(state)
    with pytest.raises(UndecidableInput):
        apply(state, leg)
    assert snapshot(state) == before


def test_a_leg_in_an_unknown_currency_is_undecidable() -> None:
    state, credit, _ = refused_transfer()
    with pytest.raises(UndecidableInput):
        apply(state, msgspec.structs.replace(credit, currency="XYZ", transaction_id="t-x"))


def test_a_negative_credit_leg_cannot_take_money_from_the_receiver() -> None:
    state = ledger(("bob", "USD", "user", "10.00"))
    leg = CreditLeg(
        transaction_id="forged",
        actor="mallory",
        issued_ms=TS_MS,
        from_account="mallory",
        to_account="bob",
        amount="-5.00",
        currency="USD",
        digest="d",
    )
    with pytest.raises(UndecidableInput):
        apply(state, leg)
    assert balance(state, "bob") == 1000


def test_a_refund_leg_with_no_pending_debit_is_undecidable_and_pays_nobody() -> None:
    state = ledger(("alice", "USD", "user", "10.00"))
    forged = RefundLeg(
        transaction_id="never-sent",
        actor="alice",
        issued_ms=TS_MS,
        from_account="alice",
        to_account="bob",
        amount="5.00",
        currency="USD",
        digest="d",
        reason="account_frozen",
        debit_ms=TS_MS,
    )
    with pytest.raises(UndecidableInput):
        apply(state, forged)
    assert balance(state, "alice") == 1000


@pytest.mark.parametrize(
    "change",
    [
        {"currency": "JPY", "amount": "100"},  # once credited 1.00 USD: read with the leg's decimals
        {"amount": "5.00"},
        {"digest": "another"},
        {"transaction_id": "t-2"},
        {"to_account": "carol"},
        {"debit_ms": TS_MS - 1},
    ],
    ids=["other_currency", "other_amount", "other_digest", "other_transaction", "other_receiver", "other_debit"],
)
def test_a_refund_leg_that_does_not_match_the_pending_debit_is_undecidable(change: dict) -> None:
    state, _, refund = refused_transfer()
    before = snapshot(state)
    with pytest.raises(UndecidableInput):
        apply(state, msgspec.structs.replace(refund, **change))
    assert snapshot(state) == before
    outcome = apply(state, refund).outcome
    assert outcome is not None and outcome.status == "failure"  # the genuine refund still applies
    assert balance(state, "alice") == 1000


def test_a_copy_of_a_refund_leg_already_applied_is_undecidable() -> None:
    state, _, refund = refused_transfer()
    apply(state, refund)
    with pytest.raises(UndecidableInput):
        apply(state, refund)
    assert balance(state, "alice") == 1000


def test_a_replayed_credit_leg_moves_nothing_and_repeats_the_answer() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00"))
    first = apply(state, leg)
    for later_ms in (TS_MS, TS_MS + 1000, TS_MS + LEG_AGE_MAX_MS):
        again = apply(state, leg, later_ms)
        assert (again.events, again.follow_ups) == ([], [])
        assert encode(again.outcome) == encode(first.outcome)
    assert (balance(state, "alice"), balance(state, "bob")) == (600, 400)


def test_a_replayed_refused_credit_leg_sends_no_second_refund() -> None:
    state, credit, refund = refused_transfer()
    again = apply(state, credit, TS_MS + 1000)
    assert again == (state, [], [], None)
    apply(state, refund)
    assert balance(state, "alice") == 1000


def test_a_credit_leg_older_than_half_the_window_is_refunded_as_leg_expired() -> None:
    # Only a leg young enough that the receiver still remembers crediting its original can be
    # accepted: any older copy is refused, and the refund returns the money to the sender, who
    # remembers its pending debit for a whole window.
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00"))
    decision = apply(state, leg, TS_MS + LEG_AGE_MAX_MS + 1)
    [event] = decision.events
    assert isinstance(event, CommandRejected)
    assert (type(event), event.reason) == (CommandRejected, Reason.LEG_EXPIRED)
    [refund] = decision.follow_ups
    outcome = apply(state, refund, TS_MS + LEG_AGE_MAX_MS + 2).outcome
    assert outcome is not None and outcome.reason == Reason.LEG_EXPIRED
    assert (balance(state, "alice"), balance(state, "bob")) == (1000, 0)


def test_a_later_debit_of_a_request_whose_first_leg_expired_is_decided_afresh_not_taken_for_a_copy() -> None:
    # The first leg reached the receiver a whole window late (undecidable: dead-lettered, with
    # the operators) while the sender had forgotten the debit and the client's retry debited
    # again: the second leg has its own issued_ms, so it is credited, not ignored as a copy.
    sender = ledger(("alice", "USD", "user", "10.00"))
    receiver = ledger(("bob", "USD", "user", ""))
    command = transfer("alice", "bob", "1.00", tx="t-1")
    [first_leg] = apply(sender, command, TS_MS).follow_ups
    retry_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + 2 * 60_000
    [second_leg] = apply(sender, command, retry_ms).follow_ups
    with pytest.raises(UndecidableInput):
        apply(receiver, first_leg, retry_ms)
    [event] = apply(receiver, second_leg, retry_ms).events
    assert type(event) is TransferCredited
    assert balance(receiver, "bob") == 100


def test_a_late_refund_of_a_forgotten_debit_never_refunds_a_later_debit_of_the_same_request() -> None:
    # A copy of a refused leg replayed after the receiver forgot it is refused again (expired);
    # its refund names the first debit's time, so it cannot pay back the retry's debit, which
    # the receiver credits.
    sender = ledger(("alice", "USD", "user", "10.00"))
    receiver = succeed(ledger(("bob", "USD", "user", "")), freeze("bob"))
    command = transfer("alice", "bob", "1.00", tx="t-1")
    [first_leg] = apply(sender, command, TS_MS).follow_ups
    [first_refund] = apply(receiver, first_leg, TS_MS).follow_ups
    apply(sender, first_refund, TS_MS)
    retry_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + 2 * 60_000
    succeed(receiver, unfreeze("bob"), at_ms=retry_ms)
    [second_leg] = apply(sender, command, retry_ms).follow_ups
    with pytest.raises(UndecidableInput):  # the replayed copy, a whole window old
        apply(receiver, first_leg, retry_ms)
    assert [type(e) for e in apply(receiver, second_leg, retry_ms).events] == [TransferCredited]
    assert balance(sender, "alice") + balance(receiver, "bob") == 1000


@pytest.mark.parametrize("skew_ms", [0, 3 * 60_000, LEG_CLOCK_SKEW_MAX_MS])
def test_a_copy_of_a_credited_leg_replayed_once_the_receiver_forgot_it_refunds_nothing(skew_ms: int) -> None:
    # The receiver credited the leg, and forgot it a window later. A copy written to the log
    # then must not be refused and refunded: the sender, whose partition leader's clock is
    # `skew_ms` behind the receiver's, may still remember its debit as pending and would pay
    # the money back a second time.
    sender = ledger(("alice", "USD", "user", "10.00"))
    receiver = ledger(("bob", "USD", "user", ""))
    [leg] = apply(sender, transfer("alice", "bob", "4.00", tx="t-1"), TS_MS).follow_ups
    assert [type(e) for e in apply(receiver, leg, TS_MS + 1000).events] == [TransferCredited]
    forgotten_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + 2 * 60_000
    succeed(receiver, deposit("bob", "1.00"), at_ms=forgotten_ms)  # the receiver's clock passes the window
    try:
        refunds = apply(receiver, leg, forgotten_ms).follow_ups
    except UndecidableInput:
        refunds = []  # dead-lettered
    for refund in refunds:
        try:
            apply(sender, refund, forgotten_ms - skew_ms)
        except UndecidableInput:
            pass
    assert balance(sender, "alice") + balance(receiver, "bob") == 1000 + 100


def test_a_credit_leg_in_another_currency_than_the_receiver_is_refunded() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "EUR", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00"))
    [refund] = apply(state, leg).follow_ups
    assert isinstance(refund, RefundLeg)
    assert refund.reason == Reason.CURRENCY_MISMATCH
    apply(state, refund)
    assert (balance(state, "alice"), balance(state, "bob")) == (1000, 0)


# --- the balance cap --------------------------------------------------------------------------------------------------


def test_the_balance_cap_counts_money_in_flight_so_a_refund_can_never_pass_it() -> None:
    # A refund cannot be refused (the money is the sender's), so the cap applies to balance +
    # pending debits: while alice's 1.00 is in flight, nothing may fill its place.
    state = ledger(("alice", "USD", "user", ""), ("bob", "USD", "user", ""))
    succeed(state, freeze("bob"))
    largest = format_amount(AMOUNT_MINOR_MAX, "USD")
    succeed(state, *(deposit("alice", largest) for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)))
    leg = debit_in_transit(state, transfer("alice", "bob", "1.00"))
    command = deposit("alice", "0.01")
    assert_rejected(apply(state, command), command, Reason.BALANCE_LIMIT_EXCEEDED)
    [refund] = apply(state, leg).follow_ups
    apply(state, refund)
    assert balance(state, "alice") == BALANCE_MINOR_MAX


def test_fold_refuses_an_event_that_would_pass_the_cap() -> None:
    state = ledger(("alice", "USD", "user", ""))
    events: list[Deposited] = []
    largest = format_amount(AMOUNT_MINOR_MAX, "USD")
    for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX):
        [deposited] = apply(state, deposit("alice", largest)).events
        assert isinstance(deposited, Deposited)
        events.append(deposited)
    rebuilt = ledger(("alice", "USD", "user", ""))
    for event in events:
        fold(rebuilt, event)
    from streams.core.state import CorruptLog

    with pytest.raises(CorruptLog):
        fold(
            rebuilt,
            msgspec.structs.replace(
                events[-1], seq=events[-1].seq + 1, amount="0.01", balance=format_amount(BALANCE_MINOR_MAX + 1, "USD")
            ),
        )


# --- the clock --------------------------------------------------------------------------------------------------------


def test_the_core_clock_never_runs_backwards() -> None:
    state = ledger(("alice", "USD", "user", ""))
    [late] = apply(state, deposit("alice", "1.00"), TS_MS + 5000).events
    [early] = apply(state, deposit("alice", "1.00"), TS_MS).events
    assert (late.ts_ms, early.ts_ms, state.clock_ms) == (TS_MS + 5000, TS_MS + 5000, TS_MS + 5000)


def test_a_command_carrying_a_client_time_is_not_a_valid_command() -> None:
    text = encode(deposit("alice", "1.00"))[:-1] + b',"ts_ms":18446744073709551615}'
    with pytest.raises(SchemaError):
        decode_command(text)


def test_a_retry_is_remembered_for_the_window_of_record_time_whatever_the_client_says() -> None:
    state = ledger(("alice", "USD", "user", ""))
    command = deposit("alice", "5.00", tx="dep-1")
    apply(state, command, TS_MS)
    retry = apply(state, command, TS_MS + IDEMPOTENCY_WINDOW_MS - 1)
    assert retry.events == [] and retry.outcome is not None and retry.outcome.status == "success"
    assert balance(state, "alice") == 500


# --- who may move whose money -----------------------------------------------------------------------------------------


def test_opening_an_account_records_the_actor_as_its_owner() -> None:
    state = State()
    [event] = apply(state, open_account("acct-1", actor="alice")).events
    assert isinstance(event, AccountOpened)
    assert (event.owner, event.actor, state.accounts["acct-1"].owner) == ("alice", "alice", "alice")


@pytest.mark.parametrize(
    ("actor", "role", "allowed"),
    [("bank", "bank", True), ("alice", "user", False), ("alice", "operator", False), ("mallory", "user", False)],
)
def test_only_the_bank_deposits(actor: str, role: Role, allowed: bool) -> None:
    state = ledger(("alice", "USD", "user", ""))
    command = deposit("alice", "1.00", actor=actor, role=role)
    if allowed:
        succeed(state, command)
    else:
        assert_rejected(apply(state, command), command, Reason.NOT_AUTHORIZED)
    assert balance(state, "alice") == (100 if allowed else 0)


@pytest.mark.parametrize(
    ("actor", "role", "allowed"),
    [("bank", "bank", True), ("alice", "user", True), ("mallory", "user", False), ("mallory", "operator", False)],
)
def test_withdraw_is_for_the_bank_or_the_owner(actor: str, role: Role, allowed: bool) -> None:
    state = ledger(("alice", "USD", "user", "10.00"))
    command = withdraw("alice", "1.00", actor=actor, role=role)
    if allowed:
        succeed(state, command)
    else:
        assert_rejected(apply(state, command), command, Reason.NOT_AUTHORIZED)
    assert balance(state, "alice") == (900 if allowed else 1000)


@pytest.mark.parametrize("merchant", [False, True])
@pytest.mark.parametrize("role", ["user", "bank", "operator"])
def test_only_the_owner_sends_from_an_account_and_the_refusal_names_the_actor(role: Role, merchant: bool) -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "merchant", ""))
    command = transfer("alice", "bob", "1.00", actor="mallory", role=role, merchant=merchant)
    decision = apply(state, command)
    assert_rejected(decision, command, Reason.NOT_AUTHORIZED)
    assert decision.events[0].actor == "mallory"
    assert decision.outcome is not None and decision.outcome.actor == "mallory"
    assert balance(state, "alice") == 1000


def test_anyone_may_send_to_an_account_it_does_not_own() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "1.00"))
    [event] = apply(state, leg).events
    assert (type(event), event.actor) == (TransferCredited, "alice")


@pytest.mark.parametrize("make_command", [freeze, unfreeze, close])
@pytest.mark.parametrize(("actor", "role"), [("alice", "user"), ("bank", "bank")])
def test_status_changes_are_for_the_operator(make_command, actor: str, role: str) -> None:
    state = ledger(("alice", "USD", "user", ""))
    command = make_command("alice", actor=actor, role=role)
    assert_rejected(apply(state, command), command, Reason.NOT_AUTHORIZED)


def test_a_retry_under_another_actor_is_a_conflict_not_the_same_request() -> None:
    state = ledger(("alice", "USD", "user", "10.00"))
    first = withdraw("alice", "1.00", tx="w-1")
    succeed(state, first)
    other = withdraw("alice", "1.00", tx="w-1", actor="alice", role="user")
    assert_rejected(apply(state, other), other, Reason.DUPLICATE_CONFLICT)


# --- leg authentication -----------------------------------------------------------------------------------------------

KEYS = "k2:" + "22" * 32 + ",k1:" + "11" * 32


def a_leg() -> CreditLeg:
    return CreditLeg(
        transaction_id="t-1",
        actor="alice",
        issued_ms=TS_MS,
        from_account="alice",
        to_account="bob",
        amount="1.00",
        currency="USD",
        digest="d",
    )


def test_a_signed_leg_verifies_and_survives_the_wire() -> None:
    keyring = LegKeyring.parse(KEYS)
    signed = keyring.sign(a_leg())
    assert (signed.kid, len(signed.mac)) == ("k2", 32)
    record = keyring.signed_record(a_leg())
    assert record == encode(signed)
    decoded = decode_command(record)
    assert isinstance(decoded, CreditLeg)
    assert keyring.verify(decoded, record) is None
    assert keyring.sign(a_leg()) == signed  # deterministic: a replay re-signs byte for byte


@pytest.mark.parametrize("forgery", ["unsigned", "wrong_key", "unknown_kid", "altered_amount", "altered_mac"])
def test_forged_credit_leg_without_debit_is_refused_by_the_keyring(forgery: str) -> None:
    keyring = LegKeyring.parse(KEYS)
    signed = keyring.sign(a_leg())
    forged = {
        "unsigned": a_leg(),
        "wrong_key": LegKeyring.parse("k2:" + "33" * 32).sign(a_leg()),
        "unknown_kid": msgspec.structs.replace(signed, kid="k9"),
        "altered_amount": msgspec.structs.replace(signed, amount="1000.00"),
        "altered_mac": msgspec.structs.replace(signed, mac="0" * 32),
    }[forgery]
    assert keyring.verify(forged, encode(forged)) is not None


def test_an_old_key_still_verifies_after_rotation() -> None:
    old = LegKeyring.parse("k1:" + "11" * 32)
    assert LegKeyring.parse(KEYS).verify(old.sign(a_leg()), old.signed_record(a_leg())) is None


@pytest.mark.parametrize("text", ["", "k1", "k1:zz", "k1:" + "11" * 8, "k1:" + "11" * 32 + ",k1:" + "22" * 32])
def test_malformed_leg_keys_are_refused(text: str) -> None:
    with pytest.raises(LegKeyError):
        LegKeyring.parse(text)


# --- a transaction id is its sending account's: a payment under it burns nobody else's -------------------------------


def test_a_payment_under_the_receivers_own_id_leaves_that_id_the_receivers() -> None:
    # A stranger pays bob under the ids bob uses for its own requests, before and after them.
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    own_request = deposit("bob", "1.00", tx="bob-1")
    [own_answer] = outcomes_of(settle(state, own_request))
    paid_after = transfer("alice", "bob", "4.00", tx="bob-1")
    assert [outcome.status for outcome in outcomes_of(settle(state, paid_after))] == ["success"]
    paid_before = transfer("alice", "bob", "2.00", tx="bob-2")
    assert [outcome.status for outcome in outcomes_of(settle(state, paid_before))] == ["success"]
    later_own = withdraw("bob", "1.00", tx="bob-2")
    assert [outcome.status for outcome in outcomes_of(settle(state, later_own))] == ["success"]
    assert encode(apply(state, own_request, TS_MS + 1).outcome) == encode(own_answer)
    assert (balance(state, "alice"), balance(state, "bob")) == (400, 600)


def test_two_senders_paying_one_receiver_under_one_id_are_two_requests() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("carol", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    for sender, amount in (("alice", "4.00"), ("carol", "3.00")):
        command = transfer(sender, "bob", amount, tx="order-1")
        [answer] = outcomes_of(settle(state, command))
        assert (answer.account_id, answer.status, answer.digest) == (sender, "success", command_digest(command))
    assert (balance(state, "alice"), balance(state, "carol"), balance(state, "bob")) == (600, 700, 700)


def test_a_refused_leg_is_remembered_for_its_sender_only() -> None:
    state = succeed(
        ledger(("alice", "USD", "user", "10.00"), ("carol", "USD", "user", "10.00"), ("bob", "USD", "user", "")),
        freeze("bob"),
    )
    carols = debit_in_transit(state, transfer("carol", "bob", "3.00", tx="order-1"))
    refused = apply(state, carols)
    [rejection] = refused.events
    assert isinstance(rejection, CommandRejected) and rejection.from_account == "carol"
    succeed(state, unfreeze("bob"))
    [answer] = outcomes_of(settle(state, transfer("alice", "bob", "4.00", tx="order-1")))
    assert answer.status == "success"
    assert apply(state, carols, TS_MS + 1000) == (state, [], [], None)  # a copy of carol's refused leg: nothing
    [refund] = refused.follow_ups
    apply(state, refund)
    assert (balance(state, "alice"), balance(state, "carol"), balance(state, "bob")) == (600, 1000, 400)


# --- a stranger's refused request burns no id of the account's -------------------------------------------------------

# Per kind of request: (a stranger's, the rightful one) under one transaction id, on alice's
# account, which holds h-0 for the shop.
STRANGER_AND_RIGHTFUL = {
    "transfer": lambda tx: (
        transfer("alice", "shop", "1.00", tx=tx, actor="mallory"),
        transfer("alice", "shop", "1.00", tx=tx),
    ),
    "pay_merchant": lambda tx: (
        transfer("alice", "shop", "1.00", tx=tx, actor="mallory", merchant=True),
        transfer("alice", "shop", "1.00", tx=tx, merchant=True),
    ),
    "withdraw": lambda tx: (
        withdraw("alice", "1.00", tx=tx, actor="mallory", role="user"),
        withdraw("alice", "1.00", tx=tx, actor="alice", role="user"),
    ),
    "deposit": lambda tx: (
        deposit("alice", "1.00", tx=tx, actor="mallory", role="user"),
        deposit("alice", "1.00", tx=tx),
    ),
    "place_hold": lambda tx: (
        place("alice", "shop", "1.00", tx=tx, actor="mallory"),
        place("alice", "shop", "1.00", tx=tx),
    ),
    "capture_hold": lambda tx: (capture("alice", "h-0", tx=tx, actor="mallory"), capture("alice", "h-0", tx=tx)),
    "void_hold": lambda tx: (void("alice", "h-0", tx=tx, actor="mallory"), void("alice", "h-0", tx=tx)),
    "freeze": lambda tx: (freeze("alice", tx=tx, actor="mallory", role="user"), freeze("alice", tx=tx)),
}


@pytest.mark.parametrize("kind", sorted(STRANGER_AND_RIGHTFUL))
@pytest.mark.parametrize("stranger_first", [True, False], ids=["stranger first", "stranger after"])
def test_a_strangers_refused_request_burns_no_id_of_the_account(kind: str, stranger_first: bool) -> None:
    state = payer_and_payee()
    placed(state, place("alice", "shop", "2.00", tx="h-0"))
    strangers, rightful = STRANGER_AND_RIGHTFUL[kind]("t-1")
    first = apply(state, strangers) if stranger_first else None
    [answer] = outcomes_of(settle(state, rightful))
    assert (answer.status, answer.digest) == ("success", command_digest(rightful))
    again = apply(state, strangers, TS_MS + 1)
    assert_rejected(again, strangers, Reason.NOT_AUTHORIZED)  # never duplicate_conflict: no id was the stranger's
    if first is not None:
        assert_rejected(first, strangers, Reason.NOT_AUTHORIZED)
        assert encode(again.outcome) == encode(first.outcome)


def test_a_strangers_request_keeps_its_first_answer_when_the_account_opens_later() -> None:
    # Who owns an account is known only once it is open: a refusal decided before that is the
    # request's answer for good, so the authorisation check never overrides a remembered answer.
    state = ledger(("bob", "USD", "user", ""))
    strangers = transfer("alice", "bob", "1.00", tx="t-1", actor="mallory")
    first = apply(state, strangers)
    assert_rejected(first, strangers, Reason.ACCOUNT_NOT_FOUND)
    succeed(state, open_account("alice"))
    assert encode(apply(state, strangers, TS_MS + 1).outcome) == encode(first.outcome)


def test_a_strangers_open_of_an_existing_account_burns_no_id_of_the_owners() -> None:
    state = payer_and_payee()
    strangers = open_account("alice", tx="t-1", actor="mallory")
    first = apply(state, strangers)
    assert_rejected(first, strangers, Reason.ACCOUNT_EXISTS)
    [answer] = outcomes_of(settle(state, transfer("alice", "shop", "1.00", tx="t-1")))
    assert answer.status == "success"
    again = apply(state, strangers, TS_MS + 1)
    assert_rejected(again, strangers, Reason.ACCOUNT_EXISTS)  # not a conflict with alice's transfer
    assert encode(again.outcome) == encode(first.outcome)


def test_a_copy_of_a_leg_under_an_id_the_sender_reused_is_credited_at_most_once() -> None:
    # The sender forgot t-1 a minute before the receiver did (the debit fell in the last
    # millisecond of a minute, its credit in the next) and reused it for another transfer. Its
    # leg is another request, credited as such; replayed, it moves nothing again.
    sender, receiver = ledger(("alice", "USD", "user", "100.00")), ledger(("bob", "USD", "user", ""))
    first_ms = (TS_MS // 60_000 + 1) * 60_000 - 1
    [first_leg] = apply(sender, transfer("alice", "bob", "10.00", tx="t-1"), first_ms).follow_ups
    assert [type(e) for e in apply(receiver, first_leg, first_ms + 1).events] == [TransferCredited]
    reuse_ms = first_ms + 1 + IDEMPOTENCY_WINDOW_MS
    [second_leg] = apply(sender, transfer("alice", "bob", "20.00", tx="t-1"), reuse_ms).follow_ups
    for at_ms in (reuse_ms + 5, reuse_ms + 2 * 60_000):  # the leg, then a copy of it
        for refund in apply(receiver, second_leg, at_ms).follow_ups:
            apply(sender, refund, at_ms)
    assert balance(sender, "alice") + balance(receiver, "bob") == 10000
    assert balance(receiver, "bob") == 3000
