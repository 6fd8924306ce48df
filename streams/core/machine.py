"""The wallet state machine: (state, command) -> (state, events, follow-up commands, outcome).

Pure and deterministic: no clock but the command's own `ts_ms`, no randomness, no I/O, and
no import of Kafka, RocksDB or HTTP. The machine decides; `fold` (state.py) records. Every
command it decides leaves at least one event, rejections included, so that the partition's
state, idempotency memory included, is a fold of `wallet.events` alone.

A transfer is a saga with one path whatever the partitions: the sender's side debits and
emits a credit leg keyed by the receiver; the receiver's side credits and answers
`success`, or refuses and emits a refund leg back; the sender's side refunds and answers
`failure`. Between the legs the money is in flight.
"""
from __future__ import annotations

from typing import NamedTuple

from schemas.codec import command_digest
from schemas.commands import (
    Close, Command, CreditLeg, Deposit, Freeze, OpenAccount, PayMerchant, RefundLeg, Transfer, Unfreeze, Withdraw,
    command_type, owner_account,
)
from schemas.events import (
    AccountClosed, AccountFrozen, AccountOpened, AccountUnfrozen, CommandRejected, Deposited, Event,
    TransferCredited, TransferDebited, TransferRefunded, Withdrawn,
)
from schemas.outcomes import Outcome, Reason
from streams.core.money import (
    BALANCE_MINOR_MAX, AmountError, canonical_minor, format_amount, minor_units_of, parse_amount_minor,
)
from streams.core.state import CLOSED, FAILURE, FROZEN, PENDING, SUCCESS, Account, State, fold


class Decision(NamedTuple):
    state: State  # the same object that was passed in, with the decided events folded
    events: list[Event]
    follow_ups: list[Command]
    outcome: Outcome | None


def apply(state: State, command: Command) -> Decision:
    handler = _HANDLERS[type(command)]
    if type(command) in (CreditLeg, RefundLeg):
        return handler(state, command)
    digest = command_digest(command)
    remembered = state.memory.get((owner_account(command), command.transaction_id))
    if remembered is not None:
        return _repeat(state, command, digest, remembered)
    return handler(state, command, digest)


def _repeat(state: State, command: Command, digest: str, remembered) -> Decision:
    """A transaction id this account has already decided: the first answer, never a second effect."""
    if remembered.digest != digest:
        return _reject(state, command, digest, Reason.DUPLICATE_CONFLICT)
    if remembered.status == PENDING:
        # The transfer is still in flight (or its success was decided on the receiver's side):
        # ask the receiver to repeat its answer; a resent leg can never move money.
        leg = _credit_leg(command, format_amount(parse_amount_minor(command.amount, command.currency), command.currency),
                          digest, resend=True)
        return Decision(state, [], [leg], None)
    return Decision(state, [], [], Outcome(transaction_id=command.transaction_id, status=remembered.status,
                                           reason=remembered.reason, digest=digest,
                                           account_id=owner_account(command), actor=command.actor))


def _open_account(state: State, command: OpenAccount, digest: str) -> Decision:
    try:
        minor_units_of(command.currency)
    except AmountError as error:
        return _reject(state, command, digest, error.reason)
    if command.account_id in state.accounts:
        return _reject(state, command, digest, Reason.ACCOUNT_EXISTS)
    event = AccountOpened(account_id=command.account_id, transaction_id=command.transaction_id, ts_ms=command.ts_ms,
                          command="open_account", digest=digest, seq=1, currency=command.currency, kind=command.kind,
                          balance=format_amount(0, command.currency), owner=command.actor)
    return _accept(state, command, digest, event)


def _deposit(state: State, command: Deposit, digest: str) -> Decision:
    account, amount_minor, reason = _usable_account(state, command.account_id, command.amount, command.currency)
    if reason is None and account.balance_minor + amount_minor > BALANCE_MINOR_MAX:
        reason = Reason.BALANCE_LIMIT_EXCEEDED
    if reason is not None:
        return _reject(state, command, digest, reason)
    event = _move_money(state, Deposited, command, digest, account, command.account_id, amount_minor)
    return Decision(state, [event], [], _success(command, digest))


def _withdraw(state: State, command: Withdraw, digest: str) -> Decision:
    account, amount_minor, reason = _usable_account(state, command.account_id, command.amount, command.currency)
    if reason is None and account.balance_minor < amount_minor:
        reason = Reason.INSUFFICIENT_FUNDS
    if reason is not None:
        return _reject(state, command, digest, reason)
    event = _move_money(state, Withdrawn, command, digest, account, command.account_id, -amount_minor)
    return Decision(state, [event], [], _success(command, digest))


def _transfer(state: State, command: Transfer | PayMerchant, digest: str) -> Decision:
    if command.from_account == command.to_account:
        return _reject(state, command, digest, Reason.SAME_ACCOUNT)
    account, amount_minor, reason = _usable_account(state, command.from_account, command.amount, command.currency)
    if reason is None and account.balance_minor < amount_minor:
        reason = Reason.INSUFFICIENT_FUNDS
    if reason is not None:
        return _reject(state, command, digest, reason)
    event = _move_money(state, TransferDebited, command, digest, account, command.from_account, -amount_minor,
                        to_account=command.to_account, merchant_only=type(command) is PayMerchant)
    return Decision(state, [event], [_credit_leg(command, event.amount, digest, resend=False)], None)


def _credit_leg(command: Transfer | PayMerchant, amount: str, digest: str, resend: bool) -> CreditLeg:
    return CreditLeg(transaction_id=command.transaction_id, ts_ms=command.ts_ms, from_account=command.from_account,
                     to_account=command.to_account, amount=amount, currency=command.currency, digest=digest,
                     merchant_only=type(command) is PayMerchant, resend=resend, actor=command.actor)


def _on_credit_leg(state: State, leg: CreditLeg) -> Decision:
    # Kafka's exactly-once delivery hands every leg to the core once, so a leg that is not a
    # resend always answers a debit of its own, even one repeated after the sender forgot the
    # id: it is credited or refunded, never taken for a repeat (that would strand the money).
    remembered = state.memory.get((leg.to_account, leg.transaction_id))
    if leg.resend:
        # Only a success is answered from here: a refusal's answer belongs to the sender's
        # side, which gives it when the refund leg arrives.
        if remembered is not None and remembered.digest == leg.digest and remembered.status == SUCCESS:
            return Decision(state, [], [], Outcome(transaction_id=leg.transaction_id, status=SUCCESS,
                                                   digest=remembered.digest, account_id=leg.from_account,
                                                   actor=leg.actor))
        return Decision(state, [], [], None)
    account = state.accounts.get(leg.to_account)
    amount_minor = _leg_amount_minor(leg)
    # The receiver has used this transaction id for another request of its own: crediting
    # under it would make two answers for one id, so the transfer is refunded instead.
    conflicting = remembered is not None and remembered.digest != leg.digest
    reason = Reason.DUPLICATE_CONFLICT if conflicting else _refusal_to_receive(account, leg.currency)
    if reason is None and leg.merchant_only and account.kind != "merchant":
        reason = Reason.NOT_A_MERCHANT
    if reason is None and account.balance_minor + amount_minor > BALANCE_MINOR_MAX:
        reason = Reason.BALANCE_LIMIT_EXCEEDED
    if reason is not None:
        event = _rejection(leg, leg.to_account, leg.digest, reason)
        refund = RefundLeg(transaction_id=leg.transaction_id, ts_ms=leg.ts_ms, from_account=leg.from_account,
                           to_account=leg.to_account, amount=leg.amount, currency=leg.currency, digest=leg.digest,
                           reason=reason, actor=leg.actor)
        fold(state, event)
        return Decision(state, [event], [refund], None)
    event = _move_money(state, TransferCredited, leg, leg.digest, account, leg.to_account, amount_minor,
                        from_account=leg.from_account)
    return Decision(state, [event], [], Outcome(transaction_id=leg.transaction_id, status=SUCCESS, digest=leg.digest,
                                                account_id=leg.from_account, actor=leg.actor))


def _on_refund_leg(state: State, leg: RefundLeg) -> Decision:
    # Every refund leg answers one debit (exactly-once delivery), so it is always applied.
    account = state.accounts.get(leg.from_account)
    if account is None:
        raise AssertionError(f"refund of {leg.transaction_id!r} to account {leg.from_account!r} that was never debited")
    # A refund is never refused: the money is the sender's whatever happened to the account
    # meanwhile (frozen, closed), and refusing it would destroy it.
    event = _move_money(state, TransferRefunded, leg, leg.digest, account, leg.from_account, _leg_amount_minor(leg),
                        to_account=leg.to_account, reason=leg.reason)
    outcome = Outcome(transaction_id=leg.transaction_id, status=FAILURE, reason=leg.reason, digest=leg.digest,
                      account_id=leg.from_account, actor=leg.actor)
    return Decision(state, [event], [], outcome)


def _freeze(state: State, command: Freeze, digest: str) -> Decision:
    account = state.accounts.get(command.account_id)
    reason = _refusal_to_change(account) or (Reason.ACCOUNT_FROZEN if account.status == FROZEN else None)
    return _status_change(state, command, digest, account, reason, AccountFrozen)


def _unfreeze(state: State, command: Unfreeze, digest: str) -> Decision:
    account = state.accounts.get(command.account_id)
    reason = _refusal_to_change(account) or (Reason.ACCOUNT_NOT_FROZEN if account.status != FROZEN else None)
    return _status_change(state, command, digest, account, reason, AccountUnfrozen)


def _close(state: State, command: Close, digest: str) -> Decision:
    account = state.accounts.get(command.account_id)
    reason = _refusal_to_change(account) or (Reason.BALANCE_NOT_ZERO if account.balance_minor != 0 else None)
    return _status_change(state, command, digest, account, reason, AccountClosed)


def _status_change(state: State, command, digest: str, account: Account | None, reason: str | None,
                   event_class) -> Decision:
    if reason is not None:
        return _reject(state, command, digest, reason)
    event = event_class(account_id=command.account_id, transaction_id=command.transaction_id, ts_ms=command.ts_ms,
                        command=command_type(command), digest=digest, seq=account.seq + 1)
    return _accept(state, command, digest, event)


def _refusal_to_change(account: Account | None) -> str | None:
    if account is None:
        return Reason.ACCOUNT_NOT_FOUND
    if account.status == CLOSED:
        return Reason.ACCOUNT_CLOSED
    return None


def _refusal_to_receive(account: Account | None, currency: str) -> str | None:
    reason = _refusal_to_change(account)
    if reason is None and account.status == FROZEN:
        reason = Reason.ACCOUNT_FROZEN
    if reason is None and account.currency != currency:
        reason = Reason.CURRENCY_MISMATCH
    return reason


def _usable_account(state: State, account_id: str, amount: str, currency: str) -> tuple[Account | None, int, str | None]:
    """The account a client command moves money on, the amount, and why it cannot, if it cannot."""
    try:
        amount_minor = parse_amount_minor(amount, currency)
    except AmountError as error:
        return None, 0, error.reason
    account = state.accounts.get(account_id)
    return account, amount_minor, _refusal_to_receive(account, currency)


def _leg_amount_minor(leg: CreditLeg | RefundLeg) -> int:
    # Legs are written by the processor in the currency's canonical form; anything else on
    # the topic is forged or corrupt and raises instead of being decided.
    return canonical_minor(leg.amount, leg.currency)


def _move_money(state: State, event_class, command, digest: str, account: Account, account_id: str,
                signed_amount_minor: int, **details) -> Event:
    """Builds the event of a balance change and folds it, handing fold the balance it has."""
    currency = account.currency
    balance_minor = account.balance_minor + signed_amount_minor
    event = event_class(account_id=account_id, transaction_id=command.transaction_id, ts_ms=command.ts_ms,
                        command=command_type(command), digest=digest, seq=account.seq + 1,
                        amount=format_amount(abs(signed_amount_minor), currency), currency=currency,
                        balance=format_amount(balance_minor, currency), **details)
    fold(state, event, balance_minor)
    return event


def _success(command: Command, digest: str) -> Outcome:
    return Outcome(transaction_id=command.transaction_id, status=SUCCESS, digest=digest,
                   account_id=owner_account(command), actor=command.actor)


def _accept(state: State, command: Command, digest: str, event: Event) -> Decision:
    fold(state, event)
    return Decision(state, [event], [], _success(command, digest))


def _rejection(command: Command, account_id: str, digest: str, reason: str) -> CommandRejected:
    return CommandRejected(account_id=account_id, transaction_id=command.transaction_id, ts_ms=command.ts_ms,
                           command=command_type(command), digest=digest, reason=reason)


def _reject(state: State, command: Command, digest: str, reason: str) -> Decision:
    event = _rejection(command, owner_account(command), digest, reason)
    fold(state, event)
    return Decision(state, [event], [], Outcome(transaction_id=command.transaction_id, status=FAILURE, reason=reason,
                                                digest=digest, account_id=owner_account(command),
                                                actor=command.actor))


_HANDLERS = {
    OpenAccount: _open_account, Deposit: _deposit, Withdraw: _withdraw, Transfer: _transfer, PayMerchant: _transfer,
    Freeze: _freeze, Unfreeze: _unfreeze, Close: _close, CreditLeg: _on_credit_leg, RefundLeg: _on_refund_leg,
}
