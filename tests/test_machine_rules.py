"""Every rule of the pure state machine, and every reason it refuses a command for.

Most tests run one partition's `State` and carry the saga legs by hand, which lets a test
hold a leg "in transit" while other commands happen; the cross-partition tests use two
states, one per partition, as the processor does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import cast

import msgspec
import pytest

from schemas.codec import command_digest, decode_command, encode
from schemas.commands import (
    AccountKind,
    Close,
    Command,
    CreditLeg,
    Deposit,
    Freeze,
    OpenAccount,
    PayMerchant,
    RefundLeg,
    Role,
    Transfer,
    Unfreeze,
    WireCommand,
    Withdraw,
    owner_account,
)
from schemas.events import (
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    CommandRejected,
    Deposited,
    TransferCredited,
    TransferDebited,
    TransferRefunded,
    Withdrawn,
)
from schemas.outcomes import Outcome, Reason
from streams.core.errors import UndecidableInput
from streams.core.machine import Decision
from streams.core.machine import apply as core_apply
from streams.core.money import AMOUNT_MINOR_MAX, BALANCE_MINOR_MAX, format_amount
from streams.core.state import (
    ACTIVE,
    CLOSED,
    FROZEN,
    IDEMPOTENCY_EVICT_STEP_MS,
    IDEMPOTENCY_WINDOW_MS,
    Account,
    CorruptLog,
    State,
    fold,
)

TS_MS = 1_700_000_000_000  # the record time of these tests' commands unless a test says otherwise
BANK, OPERATOR = "bank", "operator"
_tx_numbers = itertools.count(1)


def new_tx() -> str:
    return f"tx-{next(_tx_numbers)}"


def open_account(
    account_id: str,
    currency: str = "USD",
    kind: AccountKind = "user",
    *,
    tx: str | None = None,
    actor: str | None = None,
) -> OpenAccount:
    return OpenAccount(
        transaction_id=tx or new_tx(),
        actor=actor or account_id,
        role="user",
        account_id=account_id,
        currency=currency,
        kind=kind,
    )


def deposit(
    account_id: str,
    amount: str,
    currency: str = "USD",
    *,
    tx: str | None = None,
    actor: str = BANK,
    role: Role = "bank",
) -> Deposit:
    return Deposit(
        transaction_id=tx or new_tx(), actor=actor, role=role, account_id=account_id, amount=amount, currency=currency
    )


def withdraw(
    account_id: str,
    amount: str,
    currency: str = "USD",
    *,
    tx: str | None = None,
    actor: str = BANK,
    role: Role = "bank",
) -> Withdraw:
    return Withdraw(
        transaction_id=tx or new_tx(), actor=actor, role=role, account_id=account_id, amount=amount, currency=currency
    )


def transfer(
    from_account: str,
    to_account: str,
    amount: str,
    currency: str = "USD",
    *,
    tx: str | None = None,
    merchant: bool = False,
    actor: str | None = None,
    role: Role = "user",
) -> Transfer | PayMerchant:
    kind = PayMerchant if merchant else Transfer
    return kind(
        transaction_id=tx or new_tx(),
        actor=actor or from_account,
        role=role,
        from_account=from_account,
        to_account=to_account,
        amount=amount,
        currency=currency,
    )


def freeze(account_id: str, *, tx: str | None = None, actor: str = OPERATOR, role: Role = "operator") -> Freeze:
    return Freeze(transaction_id=tx or new_tx(), actor=actor, role=role, account_id=account_id)


def unfreeze(account_id: str, *, tx: str | None = None, actor: str = OPERATOR, role: Role = "operator") -> Unfreeze:
    return Unfreeze(transaction_id=tx or new_tx(), actor=actor, role=role, account_id=account_id)


def close(account_id: str, *, tx: str | None = None, actor: str = OPERATOR, role: Role = "operator") -> Close:
    return Close(transaction_id=tx or new_tx(), actor=actor, role=role, account_id=account_id)


def apply(state: State, command: WireCommand, record_time_ms: int = TS_MS) -> Decision:
    """The core's apply, at the record time of these tests unless one is given."""
    return core_apply(state, command, record_time_ms)


def succeed(state: State, *commands: Command, at_ms: int = TS_MS) -> State:
    """Applies client commands that must each be accepted outright (no legs)."""
    for command in commands:
        decision = apply(state, command, at_ms)
        assert decision.outcome is not None and decision.outcome.status == "success", decision
    return state


def ledger(*accounts: tuple[str, str, AccountKind, str]) -> State:
    """One partition holding (account, currency, kind, opening deposit or '') accounts."""
    state = State()
    for account_id, currency, kind, amount in accounts:
        succeed(state, open_account(account_id, currency, kind))
        if amount:
            succeed(state, deposit(account_id, amount, currency))
    return state


def settle(state: State, command: WireCommand, at_ms: int = TS_MS) -> list[Decision]:
    """Applies a command and every leg it leads to on one partition, in the order Kafka would deliver them."""
    decisions = []
    pending: list[WireCommand] = [command]
    while pending:
        decision = apply(state, pending.pop(0), at_ms)
        decisions.append(decision)
        pending.extend(decision.follow_ups)
    return decisions


def decode_wire(command: Command) -> Command:
    """The command as the next partition reads it from Kafka."""
    decoded = decode_command(encode(command))
    assert type(decoded) is type(command)
    return cast(Command, decoded)


def outcomes_of(decisions: Iterable[Decision]) -> list[Outcome]:
    return [decision.outcome for decision in decisions if decision.outcome is not None]


def balance(state: State, account_id: str) -> int:
    return state.accounts[account_id].balance_minor


def snapshot(state: State) -> tuple:
    """A deep copy of what a command may change: accounts, memory (in order) and clock."""
    accounts = {
        key: (account.currency, account.kind, account.status, account.balance_minor, account.seq)
        for key, account in state.accounts.items()
    }
    return accounts, list(state.memory.items()), state.clock_ms


def assert_rejected(decision: Decision, command: Command, reason: str) -> None:
    """Refused: one decision event naming the reason, no leg, and a failure outcome for this request."""
    assert decision.outcome == Outcome(
        transaction_id=command.transaction_id,
        account_id=owner_account(command),
        actor=command.actor,
        status="failure",
        reason=reason,
        digest=command_digest(command),
    )
    assert decision.follow_ups == []
    [event] = decision.events
    assert type(event) is CommandRejected
    assert event.reason == reason
    assert event.digest == command_digest(command)


# --- opening accounts -------------------------------------------------------------------------------------------------


def test_open_account_starts_active_at_zero_with_sequence_one() -> None:
    state = State()
    command = open_account("alice", "BHD", "merchant")
    decision = apply(state, command)
    assert decision.events == [
        AccountOpened(
            account_id="alice",
            transaction_id=command.transaction_id,
            ts_ms=TS_MS,
            command="open_account",
            digest=command_digest(command),
            actor="alice",
            seq=1,
            owner="alice",
            currency="BHD",
            kind="merchant",
            balance="0.000",
        )
    ]
    assert decision.outcome is not None and decision.outcome.status == "success"
    assert state.accounts["alice"] == Account("BHD", "merchant", ACTIVE, 0, 1, "alice")


def test_open_account_in_an_unknown_currency_is_refused() -> None:
    state = State()
    command = open_account("alice", "XYZ")
    assert_rejected(apply(state, command), command, Reason.UNKNOWN_CURRENCY)
    assert state.accounts == {}


def test_opening_an_existing_account_is_refused_and_keeps_the_first_one() -> None:
    state = ledger(("alice", "USD", "user", "5.00"))
    command = open_account("alice", "JPY", "merchant")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_EXISTS)
    assert state.accounts["alice"] == Account("USD", "user", ACTIVE, 500, 2, "alice")


def test_a_closed_account_cannot_be_opened_again() -> None:
    state = succeed(ledger(("alice", "USD", "user", "")), close("alice"))
    command = open_account("alice")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_EXISTS)
    assert state.accounts["alice"].status == CLOSED


# --- deposits and withdrawals -----------------------------------------------------------------------------------------


def test_deposit_adds_to_the_balance_and_takes_the_next_sequence_number() -> None:
    state = ledger(("alice", "USD", "user", "5.00"))
    command = deposit("alice", "12.3")
    decision = apply(state, command)
    assert decision.events == [
        Deposited(
            account_id="alice",
            transaction_id=command.transaction_id,
            ts_ms=TS_MS,
            command="deposit",
            digest=command_digest(command),
            actor=BANK,
            seq=3,
            amount="12.30",
            currency="USD",
            balance="17.30",
        )
    ]
    assert decision.follow_ups == []
    assert balance(state, "alice") == 1730


def test_withdraw_takes_from_the_balance() -> None:
    state = ledger(("alice", "USD", "user", "5.00"))
    decision = apply(state, withdraw("alice", "5"))
    [event] = decision.events
    assert isinstance(event, Withdrawn)
    assert (type(event), event.amount, event.balance, event.seq) == (Withdrawn, "5.00", "0.00", 3)
    assert decision.outcome is not None and decision.outcome.status == "success"
    assert balance(state, "alice") == 0


def test_withdrawing_more_than_the_balance_is_insufficient_funds() -> None:
    state = ledger(("alice", "USD", "user", "5.00"))
    command = withdraw("alice", "5.01")
    assert_rejected(apply(state, command), command, Reason.INSUFFICIENT_FUNDS)
    assert balance(state, "alice") == 500


def test_deposit_that_would_pass_the_balance_limit_is_refused() -> None:
    state = ledger(("alice", "USD", "user", ""))
    largest = format_amount(AMOUNT_MINOR_MAX, "USD")
    succeed(state, *(deposit("alice", largest) for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)))
    assert balance(state, "alice") == BALANCE_MINOR_MAX
    command = deposit("alice", "0.01")
    assert_rejected(apply(state, command), command, Reason.BALANCE_LIMIT_EXCEEDED)
    assert balance(state, "alice") == BALANCE_MINOR_MAX


def client_money_command(kind: str, account_id: str, amount: str, currency: str) -> Command:
    if kind == "deposit":
        return deposit(account_id, amount, currency)
    if kind == "withdraw":
        return withdraw(account_id, amount, currency)
    return transfer(account_id, "bob", amount, currency, merchant=kind == "pay_merchant")


MONEY_COMMANDS = ["deposit", "withdraw", "transfer", "pay_merchant"]


def sender_ledger() -> State:
    return ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "merchant", ""))


@pytest.mark.parametrize("kind", MONEY_COMMANDS)
def test_money_command_on_a_missing_account_is_account_not_found(kind: str) -> None:
    state = sender_ledger()
    command = client_money_command(kind, "nobody", "1.00", "USD")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_NOT_FOUND)
    assert "nobody" not in state.accounts


@pytest.mark.parametrize("kind", MONEY_COMMANDS)
def test_money_command_on_a_frozen_account_is_account_frozen(kind: str) -> None:
    state = succeed(sender_ledger(), freeze("alice"))
    command = client_money_command(kind, "alice", "1.00", "USD")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_FROZEN)
    assert balance(state, "alice") == 1000


@pytest.mark.parametrize("kind", MONEY_COMMANDS)
def test_money_command_on_a_closed_account_is_account_closed(kind: str) -> None:
    state = succeed(ledger(("alice", "USD", "user", ""), ("bob", "USD", "merchant", "")), close("alice"))
    command = client_money_command(kind, "alice", "1.00", "USD")
    assert_rejected(apply(state, command), command, Reason.ACCOUNT_CLOSED)
    assert balance(state, "alice") == 0


@pytest.mark.parametrize("kind", MONEY_COMMANDS)
def test_money_command_in_another_currency_than_the_account_is_currency_mismatch(kind: str) -> None:
    state = sender_ledger()
    command = client_money_command(kind, "alice", "1.00", "EUR")
    assert_rejected(apply(state, command), command, Reason.CURRENCY_MISMATCH)
    assert balance(state, "alice") == 1000


@pytest.mark.parametrize("kind", MONEY_COMMANDS)
def test_money_command_in_an_unknown_currency_is_unknown_currency(kind: str) -> None:
    state = sender_ledger()
    command = client_money_command(kind, "alice", "1.00", "ZZZ")
    assert_rejected(apply(state, command), command, Reason.UNKNOWN_CURRENCY)
    assert balance(state, "alice") == 1000


@pytest.mark.parametrize(
    "amount",
    ["1e3", "1E2", "-1.00", "0", "0.00", "1.001", "", "  ", "1.0.0", "+1", format_amount(AMOUNT_MINOR_MAX + 1, "USD")],
)
@pytest.mark.parametrize("kind", MONEY_COMMANDS)
def test_money_command_with_an_unacceptable_amount_is_invalid_amount(kind: str, amount: str) -> None:
    state = sender_ledger()
    before = snapshot(state)
    command = client_money_command(kind, "alice", amount, "USD")
    decision = apply(state, command)
    assert_rejected(decision, command, Reason.INVALID_AMOUNT)
    assert snapshot(state)[0] == before[0]


def test_yen_has_no_minor_unit_and_dinar_has_three() -> None:
    state = ledger(("yen", "JPY", "user", ""), ("yen2", "JPY", "user", ""), ("dinar", "BHD", "user", ""))
    [yen_event] = apply(state, deposit("yen", "1000", "JPY")).events
    assert isinstance(yen_event, Deposited)
    assert (yen_event.amount, yen_event.balance) == ("1000", "1000")
    assert balance(state, "yen") == 1000
    [dinar_event] = apply(state, deposit("dinar", "1.5", "BHD")).events
    assert isinstance(dinar_event, Deposited)
    assert (dinar_event.amount, dinar_event.balance) == ("1.500", "1.500")
    assert balance(state, "dinar") == 1500
    for too_precise in (deposit("yen", "1.5", "JPY"), deposit("dinar", "0.0001", "BHD")):
        assert_rejected(apply(state, too_precise), too_precise, Reason.INVALID_AMOUNT)
    outcomes = outcomes_of(settle(state, transfer("yen", "yen2", "1", "JPY")))
    assert [o.status for o in outcomes] == ["success"]
    assert (balance(state, "yen"), balance(state, "yen2")) == (999, 1)


# --- transfers --------------------------------------------------------------------------------------------------------


def test_transfer_debits_the_sender_then_credits_the_receiver_and_answers_success() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", "1.00"))
    command = transfer("alice", "bob", "2.5", tx="t-1")
    digest = command_digest(command)
    debit = apply(state, command)
    assert debit.events == [
        TransferDebited(
            account_id="alice",
            transaction_id="t-1",
            ts_ms=TS_MS,
            command="transfer",
            digest=digest,
            actor="alice",
            seq=3,
            amount="2.50",
            currency="USD",
            balance="7.50",
            to_account="bob",
            merchant_only=False,
        )
    ]
    assert debit.follow_ups == [
        CreditLeg(
            transaction_id="t-1",
            actor="alice",
            issued_ms=TS_MS,
            from_account="alice",
            to_account="bob",
            amount="2.50",
            currency="USD",
            digest=digest,
            merchant_only=False,
            resend=False,
        )
    ]
    assert debit.outcome is None  # not final while the money is in flight
    credit = apply(state, debit.follow_ups[0])
    assert credit.events == [
        TransferCredited(
            account_id="bob",
            transaction_id="t-1",
            ts_ms=TS_MS,
            command="credit_leg",
            digest=digest,
            actor="alice",
            seq=3,
            amount="2.50",
            currency="USD",
            balance="3.50",
            from_account="alice",
            issued_ms=TS_MS,
        )
    ]
    assert credit.follow_ups == []
    assert credit.outcome == Outcome(
        transaction_id="t-1", account_id="alice", actor="alice", status="success", reason=None, digest=digest
    )


def test_transfer_across_two_partitions_takes_the_same_two_legs() -> None:
    sender = ledger(("alice", "USD", "user", "10.00"))
    receiver = ledger(("bob", "USD", "user", ""))
    debit = apply(sender, transfer("alice", "bob", "4.00"))
    [leg] = debit.follow_ups
    credit = apply(receiver, decode_wire(leg))
    assert credit.outcome is not None and credit.outcome.status == "success"
    assert (balance(sender, "alice"), balance(receiver, "bob")) == (600, 400)
    assert "bob" not in sender.accounts and "alice" not in receiver.accounts


def test_transfer_to_oneself_is_refused() -> None:
    state = sender_ledger()
    command = transfer("alice", "alice", "1.00")
    assert_rejected(apply(state, command), command, Reason.SAME_ACCOUNT)
    assert balance(state, "alice") == 1000


def test_transfer_of_more_than_the_balance_is_insufficient_funds_and_sends_no_leg() -> None:
    state = sender_ledger()
    command = transfer("alice", "bob", "10.01")
    assert_rejected(apply(state, command), command, Reason.INSUFFICIENT_FUNDS)
    assert balance(state, "alice") == 1000


# reason -> the commands that leave bob unable to receive USD for that reason
RECEIVER_SETUPS: dict[str, Callable[[], list[Command]]] = {
    Reason.ACCOUNT_NOT_FOUND: lambda: [],
    Reason.ACCOUNT_FROZEN: lambda: [open_account("bob"), freeze("bob")],
    Reason.ACCOUNT_CLOSED: lambda: [open_account("bob"), close("bob")],
    Reason.CURRENCY_MISMATCH: lambda: [open_account("bob", "EUR")],
}


@pytest.mark.parametrize("reason", list(RECEIVER_SETUPS))
def test_transfer_the_receiver_cannot_take_is_refunded_and_fails_with_its_reason(reason: str) -> None:
    state = succeed(ledger(("alice", "USD", "user", "10.00")), *RECEIVER_SETUPS[reason]())
    command = transfer("alice", "bob", "3.00")
    decisions = settle(state, command)
    events = [event for decision in decisions for event in decision.events]
    assert [type(event) for event in events] == [TransferDebited, CommandRejected, TransferRefunded]
    assert decisions[1].follow_ups == [
        RefundLeg(
            transaction_id=command.transaction_id,
            actor="alice",
            issued_ms=TS_MS,
            from_account="alice",
            to_account="bob",
            amount="3.00",
            currency="USD",
            digest=command_digest(command),
            reason=reason,
            debit_ms=TS_MS,
        )
    ]
    assert isinstance(events[1], CommandRejected) and isinstance(events[2], TransferRefunded)
    assert (events[1].account_id, events[1].command, events[1].reason) == ("bob", "credit_leg", reason)
    assert (events[2].account_id, events[2].reason, events[2].balance) == ("alice", reason, "10.00")
    assert outcomes_of(decisions) == [
        Outcome(
            transaction_id=command.transaction_id,
            account_id="alice",
            actor="alice",
            status="failure",
            reason=reason,
            digest=command_digest(command),
        )
    ]
    assert balance(state, "alice") == 1000
    assert "bob" not in state.accounts or balance(state, "bob") == 0


def test_paying_a_user_as_a_merchant_is_refunded_as_not_a_merchant() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    outcomes = outcomes_of(settle(state, transfer("alice", "bob", "1.00", merchant=True)))
    assert [(o.status, o.reason) for o in outcomes] == [("failure", Reason.NOT_A_MERCHANT)]
    assert (balance(state, "alice"), balance(state, "bob")) == (1000, 0)


def test_paying_a_merchant_succeeds_and_so_does_a_plain_transfer_to_one() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("shop", "USD", "merchant", ""))
    for merchant in (True, False):
        outcomes = outcomes_of(settle(state, transfer("alice", "shop", "1.00", merchant=merchant)))
        assert [o.status for o in outcomes] == ["success"]
    assert (balance(state, "alice"), balance(state, "shop")) == (800, 200)


def test_credit_that_would_pass_the_receiver_balance_limit_is_refunded() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    largest = format_amount(AMOUNT_MINOR_MAX, "USD")
    succeed(state, *(deposit("bob", largest) for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)))
    outcomes = outcomes_of(settle(state, transfer("alice", "bob", "0.01")))
    assert [(o.status, o.reason) for o in outcomes] == [("failure", Reason.BALANCE_LIMIT_EXCEEDED)]
    assert (balance(state, "alice"), balance(state, "bob")) == (1000, BALANCE_MINOR_MAX)


def debit_in_transit(state: State, command: Command) -> CreditLeg:
    """Debits `command` and returns its credit leg, not yet delivered."""
    [leg] = apply(state, command).follow_ups
    assert isinstance(leg, CreditLeg)
    return leg


def test_refund_to_a_sender_frozen_meanwhile_is_applied() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "EUR", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00"))
    succeed(state, freeze("alice"))
    decisions = [apply(state, leg)]
    decisions += [apply(state, refund) for refund in decisions[0].follow_ups]
    assert [(o.status, o.reason) for o in outcomes_of(decisions)] == [("failure", Reason.CURRENCY_MISMATCH)]
    assert state.accounts["alice"].status == FROZEN
    assert balance(state, "alice") == 1000


def test_close_while_the_accounts_debit_is_in_flight_is_refused_as_transfer_in_flight() -> None:
    # Closing here once stranded the refund in a closed account for good.
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "EUR", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "10.00"))  # everything: the balance is now zero
    assert (state.accounts["alice"].in_flight_count, state.accounts["alice"].in_flight_minor) == (1, 1000)
    command = close("alice")
    assert_rejected(apply(state, command), command, Reason.TRANSFER_IN_FLIGHT)
    [refund] = apply(state, leg).follow_ups
    apply(state, refund)
    assert balance(state, "alice") == 1000
    assert (state.accounts["alice"].in_flight_count, state.accounts["alice"].in_flight_minor) == (0, 0)
    succeed(state, withdraw("alice", "10.00"), close("alice"))
    assert state.accounts["alice"].status == CLOSED


def test_a_debit_stays_in_flight_for_its_sender_until_refunded_or_forgotten() -> None:
    # The sender never hears of a credit on another partition: its pending debit counts as in
    # flight until the idempotency window forgets it; then the account may close.
    sender = ledger(("alice", "USD", "user", "10.00"))
    debit_in_transit(sender, transfer("alice", "bob", "10.00"))
    later_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + IDEMPOTENCY_EVICT_STEP_MS
    command = close("alice")
    assert_rejected(apply(sender, command, later_ms - IDEMPOTENCY_EVICT_STEP_MS), command, Reason.TRANSFER_IN_FLIGHT)
    succeed(sender, close("alice"), at_ms=later_ms)


# --- idempotency ------------------------------------------------------------------------------------------------------


def test_retry_after_success_returns_the_same_outcome_and_changes_nothing() -> None:
    state = ledger(("alice", "USD", "user", ""))
    command = deposit("alice", "5.00", tx="dep-1")
    first = apply(state, command)
    before = snapshot(state)
    retry = apply(state, command, TS_MS + 1000)
    assert (retry.events, retry.follow_ups) == ([], [])
    assert encode(retry.outcome) == encode(first.outcome)
    assert snapshot(state) == before


def test_retry_after_failure_returns_the_first_failure_even_when_it_would_now_succeed() -> None:
    state = ledger(("alice", "USD", "user", "1.00"))
    command = withdraw("alice", "5.00", tx="wd-1")
    first = apply(state, command)
    assert first.outcome is not None and first.outcome.reason == Reason.INSUFFICIENT_FUNDS
    succeed(state, deposit("alice", "100.00"))
    retry = apply(state, command, TS_MS + 1000)
    assert (retry.events, retry.follow_ups) == ([], [])
    assert encode(retry.outcome) == encode(first.outcome)
    assert balance(state, "alice") == 10100


@pytest.mark.parametrize("resend_first", [False, True], ids=["in_log_order", "resend_overtakes"])
def test_retry_of_a_transfer_in_flight_resends_a_credit_leg_that_never_moves_money(resend_first: bool) -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    command = transfer("alice", "bob", "4.00", tx="t-1")
    original = debit_in_transit(state, command)
    retry = apply(state, command, TS_MS + 500)
    assert (retry.events, retry.outcome) == ([], None)
    [resent] = retry.follow_ups
    assert resent == msgspec.structs.replace(original, issued_ms=TS_MS + 500, resend=True)
    legs = [resent, original] if resend_first else [original, resent]
    decisions = [apply(state, leg) for leg in legs]
    credited = [event for decision in decisions for event in decision.events]
    assert [type(event) for event in credited] == [TransferCredited]
    assert [decision.follow_ups for decision in decisions] == [[], []]
    outcomes = outcomes_of(decisions)
    assert outcomes and {encode(outcome) for outcome in outcomes} == {
        encode(
            Outcome(
                transaction_id="t-1",
                account_id="alice",
                actor="alice",
                status="success",
                digest=command_digest(command),
            )
        )
    }
    assert (balance(state, "alice"), balance(state, "bob")) == (600, 400)


def test_retry_of_a_completed_transfer_gets_the_same_success_from_the_receiver() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    command = transfer("alice", "bob", "4.00")
    [first] = outcomes_of(settle(state, command))
    before = snapshot(state)
    retry = settle(state, command, TS_MS + 1)
    assert [event for decision in retry for event in decision.events] == []
    assert [encode(outcome) for outcome in outcomes_of(retry)] == [encode(first)]
    assert snapshot(state) == before


def test_retry_of_a_refunded_transfer_gets_the_same_failure() -> None:
    state = ledger(("alice", "USD", "user", "10.00"))
    command = transfer("alice", "ghost", "4.00")
    [first] = outcomes_of(settle(state, command))
    assert (first.status, first.reason) == ("failure", Reason.ACCOUNT_NOT_FOUND)
    succeed(state, open_account("ghost"))  # would succeed now: the first answer still stands
    retry = settle(state, command, TS_MS + 1)
    assert [event for decision in retry for event in decision.events] == []
    assert [encode(outcome) for outcome in outcomes_of(retry)] == [encode(first)]
    assert balance(state, "alice") == 1000


def test_same_transaction_id_with_another_payload_is_a_duplicate_conflict_that_keeps_the_first_answer() -> None:
    state = ledger(("alice", "USD", "user", ""))
    first_command = deposit("alice", "5.00", tx="dep-1")
    first = apply(state, first_command)
    conflicting = deposit("alice", "6.00", tx="dep-1")
    assert_rejected(apply(state, conflicting, TS_MS + 1), conflicting, Reason.DUPLICATE_CONFLICT)
    assert balance(state, "alice") == 500
    retry = apply(state, first_command, TS_MS + 2)
    assert encode(retry.outcome) == encode(first.outcome)


def test_transfer_reusing_the_id_of_one_in_flight_is_a_duplicate_conflict_and_sends_no_leg() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""), ("carol", "USD", "user", ""))
    debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    conflicting = transfer("alice", "carol", "4.00", tx="t-1")
    assert_rejected(apply(state, conflicting), conflicting, Reason.DUPLICATE_CONFLICT)
    assert balance(state, "alice") == 600


def test_transaction_ids_are_scoped_to_the_account_that_owns_the_command() -> None:
    state = ledger(("alice", "USD", "user", ""), ("bob", "USD", "user", ""))
    succeed(state, deposit("alice", "1.00", tx="same"), deposit("bob", "2.00", tx="same"))
    assert (balance(state, "alice"), balance(state, "bob")) == (100, 200)


def test_retry_within_the_idempotency_window_gets_the_first_answer() -> None:
    state = ledger(("alice", "USD", "user", ""))
    command = deposit("alice", "5.00", tx="dep-1")
    first = apply(state, command, TS_MS)
    last_moment_ms = TS_MS + IDEMPOTENCY_WINDOW_MS - 1
    succeed(state, deposit("alice", "1.00"), at_ms=last_moment_ms)  # moves the partition's clock
    retry = apply(state, command, last_moment_ms)
    assert encode(retry.outcome) == encode(first.outcome)
    assert balance(state, "alice") == 600


def test_retry_after_the_idempotency_window_of_the_partition_clock_is_a_new_request() -> None:
    state = ledger(("alice", "USD", "user", ""))
    command = deposit("alice", "5.00", tx="dep-1")
    apply(state, command, TS_MS)
    later_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + IDEMPOTENCY_EVICT_STEP_MS
    succeed(state, deposit("alice", "1.00"), at_ms=later_ms)
    assert ("alice", "dep-1", "") not in state.memory
    retry = apply(state, command, later_ms + 1)
    assert [type(event) for event in retry.events] == [Deposited]
    assert balance(state, "alice") == 1100


def test_identical_input_gives_byte_identical_events_and_outcomes() -> None:
    script: list[Command] = [
        open_account("alice", tx="o1"),
        open_account("bob", "USD", "merchant", tx="o2"),
        deposit("alice", "10.00", tx="d1"),
        transfer("alice", "bob", "2.50", tx="t1", merchant=True),
        transfer("alice", "nobody", "1.00", tx="t2"),
        withdraw("alice", "100", tx="w1"),
        freeze("bob", tx="f1"),
        transfer("alice", "bob", "1.00", tx="t3"),
        deposit("alice", "1.00", tx="d1"),
    ]

    def run() -> list[bytes]:
        state = State()
        records = []
        for command in script:
            for decision in settle(state, command):
                records += [encode(event) for event in decision.events]
                records += [encode(leg) for leg in decision.follow_ups]
                records += [encode(decision.outcome)] if decision.outcome else []
        return records

    first = run()
    assert len(first) > len(script)
    assert run() == first


# --- freeze, unfreeze, close ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "make_command", "reason"),
    [
        ([], freeze, Reason.ACCOUNT_NOT_FOUND),
        ([], unfreeze, Reason.ACCOUNT_NOT_FOUND),
        ([], close, Reason.ACCOUNT_NOT_FOUND),
        (["freeze"], freeze, Reason.ACCOUNT_FROZEN),
        (["open"], unfreeze, Reason.ACCOUNT_NOT_FROZEN),
        (["close"], freeze, Reason.ACCOUNT_CLOSED),
        (["close"], unfreeze, Reason.ACCOUNT_CLOSED),
        (["close"], close, Reason.ACCOUNT_CLOSED),
        (["deposit"], close, Reason.BALANCE_NOT_ZERO),
    ],
    ids=[
        "freeze_missing",
        "unfreeze_missing",
        "close_missing",
        "freeze_frozen",
        "unfreeze_active",
        "freeze_closed",
        "unfreeze_closed",
        "close_closed",
        "close_with_money",
    ],
)
def test_status_change_refusals(setup: list[str], make_command, reason: str) -> None:
    state = State()
    steps: dict[str, list[Command]] = {
        "open": [],
        "freeze": [freeze("alice")],
        "close": [close("alice")],
        "deposit": [deposit("alice", "0.01")],
    }
    if setup:
        succeed(state, open_account("alice"), *steps[setup[0]])
    before = snapshot(state)[0]
    command = make_command("alice")
    assert_rejected(apply(state, command), command, reason)
    assert snapshot(state)[0] == before


def test_freeze_unfreeze_and_close_change_status_with_the_next_sequence_number() -> None:
    state = ledger(("alice", "USD", "user", ""))
    expected: list[tuple[Callable[[str], Command], type, str, int]] = [
        (freeze, AccountFrozen, FROZEN, 2),
        (unfreeze, AccountUnfrozen, ACTIVE, 3),
        (freeze, AccountFrozen, FROZEN, 4),
        (close, AccountClosed, CLOSED, 5),
    ]
    for make_command, event_class, status, seq in expected:
        [event] = apply(state, make_command("alice")).events
        assert isinstance(event, (AccountFrozen, AccountUnfrozen, AccountClosed))
        assert (type(event), event.seq) == (event_class, seq)
        assert state.accounts["alice"].status == status


def test_an_unfrozen_account_moves_money_again() -> None:
    state = succeed(ledger(("alice", "USD", "user", "")), freeze("alice"), unfreeze("alice"), deposit("alice", "1.00"))
    assert balance(state, "alice") == 100


def test_a_refusal_is_a_decision_event_without_a_sequence_number() -> None:
    state = ledger(("alice", "USD", "user", ""))
    [event] = apply(state, withdraw("alice", "1.00")).events
    assert type(event) is CommandRejected
    assert "seq" not in msgspec.structs.asdict(event)
    assert state.accounts["alice"].seq == 1


# --- fold -------------------------------------------------------------------------------------------------------------


def test_folding_the_events_rebuilds_exactly_the_live_state_and_its_memory() -> None:
    live = State()
    events = []
    script: list[Command] = [
        open_account("alice"),
        open_account("bob", kind="merchant"),
        deposit("alice", "10.00"),
        transfer("alice", "bob", "2.00", merchant=True),
        transfer("alice", "ghost", "1.00"),
        withdraw("alice", "50.00"),
        freeze("bob"),
        transfer("alice", "bob", "1.00"),
        deposit("bob", "1.00"),
    ]
    for command in script:
        for decision in settle(live, command):
            events += decision.events
    rebuilt = State()
    for event in events:
        fold(rebuilt, event)
    assert rebuilt.accounts == live.accounts
    assert rebuilt.memory == live.memory
    assert rebuilt.clock_ms == live.clock_ms


def opened_and_deposited() -> tuple[State, list]:
    state = State()
    events = []
    for command in (open_account("alice"), deposit("alice", "5.00")):
        events += apply(state, command).events
    return state, events


def test_fold_raises_corrupt_log_on_a_sequence_gap() -> None:
    state, [_, deposited] = opened_and_deposited()
    with pytest.raises(CorruptLog, match="seq 4 follows 2"):
        fold(state, msgspec.structs.replace(deposited, seq=4, balance="10.00"))


@pytest.mark.parametrize("balance_text", ["6.00", "9.99", "0.00"])
def test_fold_raises_corrupt_log_on_a_forged_balance(balance_text: str) -> None:
    state, [_, deposited] = opened_and_deposited()
    with pytest.raises(CorruptLog, match="does not follow"):
        fold(state, msgspec.structs.replace(deposited, seq=3, balance=balance_text))
    assert balance(state, "alice") == 500


def test_fold_raises_corrupt_log_on_an_event_in_another_currency_than_the_account() -> None:
    state, [_, deposited] = opened_and_deposited()
    with pytest.raises(CorruptLog):
        fold(state, msgspec.structs.replace(deposited, seq=3, currency="EUR", balance="10.00"))


def test_fold_raises_corrupt_log_on_a_money_event_below_zero() -> None:
    state, [_, deposited] = opened_and_deposited()
    withdrawn = Withdrawn(**{**msgspec.structs.asdict(deposited), "seq": 3, "amount": "6.00", "balance": "-1.00"})
    with pytest.raises(CorruptLog):
        fold(state, withdrawn)


def test_fold_raises_corrupt_log_on_an_event_of_an_account_never_opened() -> None:
    _, [_, deposited] = opened_and_deposited()
    with pytest.raises(CorruptLog, match="never opened"):
        fold(State(), deposited)


def test_fold_raises_corrupt_log_on_an_account_opened_with_money() -> None:
    _, [opened, _] = opened_and_deposited()
    with pytest.raises(CorruptLog):
        fold(State(), msgspec.structs.replace(opened, balance="5.00"))


def test_fold_raises_corrupt_log_on_a_second_opening_of_an_account() -> None:
    # The next seq, so not "already folded": a fork of the account's history.
    state, [opened, _] = opened_and_deposited()
    with pytest.raises(CorruptLog):
        fold(state, msgspec.structs.replace(opened, seq=3, currency="JPY", balance="0"))


def test_fold_ignores_an_event_whose_sequence_number_was_already_folded() -> None:
    state, events = opened_and_deposited()
    before = snapshot(state)
    for event in events:
        fold(state, event)
    assert snapshot(state) == before


# --- regressions: defects of the first core (commit 42c12a7) that these tests found -----------------------------------


def test_fold_raises_corrupt_log_on_a_non_canonical_balance() -> None:
    # A torn or forged record must surface as CorruptLog, the one error the runtime and audit act on.
    state, [_, deposited] = opened_and_deposited()
    with pytest.raises(CorruptLog):
        fold(state, msgspec.structs.replace(deposited, seq=3, amount="5.00", balance="10.0"))


def test_fold_raises_corrupt_log_on_a_deposit_of_a_negative_amount() -> None:
    # balance 5.00 + (-1.00) = 4.00 is arithmetically consistent, yet no command can deposit a negative amount.
    state, [_, deposited] = opened_and_deposited()
    with pytest.raises(CorruptLog):
        fold(state, msgspec.structs.replace(deposited, seq=3, amount="-1.00", balance="4.00"))


@pytest.mark.parametrize("receiver_time", ["quiet_clock", "record_time"])
def test_a_transfer_retried_after_the_sender_forgot_it_is_credited_again_not_stranded_in_flight(
    receiver_time: str,
) -> None:
    # Two partitions. The sender's clock moved past the window, so it takes the retry as a new
    # request and debits again; the second leg is issued more than half a window after the
    # receiver's first credit, so it is not a copy of the first leg even where the receiver
    # still remembers that credit (a leg whose record time is behind the receiver's clock).
    sender = ledger(("alice", "USD", "user", "10.00"))
    receiver = ledger(("bob", "USD", "user", ""))
    command = transfer("alice", "bob", "1.00", tx="t-1")
    [leg] = apply(sender, command, TS_MS + 1).follow_ups
    outcome = apply(receiver, leg, TS_MS + 1).outcome
    assert outcome is not None and outcome.status == "success"
    later_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + IDEMPOTENCY_EVICT_STEP_MS
    succeed(sender, deposit("alice", "1.00"), at_ms=later_ms)
    [second_leg] = apply(sender, command, later_ms + 1).follow_ups
    assert balance(sender, "alice") == 900  # debited twice in all: 10.00 − 1.00 + 1.00 − 1.00
    decision = apply(receiver, second_leg, TS_MS + 1 if receiver_time == "quiet_clock" else later_ms + 1)
    assert [type(event) for event in decision.events] == [TransferCredited]
    assert balance(sender, "alice") + balance(receiver, "bob") == 1100  # nothing left in flight


def test_a_refund_of_a_debit_the_sender_has_forgotten_is_undecidable_and_changes_nothing() -> None:
    # The saga outlived the idempotency window: the sender no longer remembers the debit, so a
    # refund of it matches nothing (it could as well be a copy of one already applied). It is
    # dead-lettered and the audit lists the transfer in flight; a later debit of the same
    # request still gets its own refund.
    sender = ledger(("alice", "USD", "user", "10.00"))
    receiver = succeed(ledger(("bob", "USD", "user", "")), freeze("bob"))
    command = transfer("alice", "bob", "1.00", tx="t-1")
    [first_leg] = apply(sender, command, TS_MS + 1).follow_ups
    [first_refund] = apply(receiver, first_leg, TS_MS + 1).follow_ups
    later_ms = TS_MS + IDEMPOTENCY_WINDOW_MS + IDEMPOTENCY_EVICT_STEP_MS
    succeed(sender, deposit("alice", "1.00"), at_ms=later_ms)
    assert sender.accounts["alice"].in_flight_count == 0  # forgotten with its id
    before = snapshot(sender)
    with pytest.raises(UndecidableInput):
        apply(sender, first_refund, later_ms + 1)
    assert snapshot(sender) == before
    [second_leg] = apply(sender, command, later_ms + 1).follow_ups
    [second_refund] = apply(receiver, second_leg, later_ms + 1).follow_ups
    outcome = apply(sender, second_refund, later_ms + 2).outcome
    assert outcome is not None and outcome.status == "failure"
    assert balance(sender, "alice") == 1000  # the second debit is given back; the first is with the operators
