"""The wallet state machine: (state, command, record time) -> (state, events, follow-up commands, outcome).

Pure and deterministic: the only clock is the record time the runtime passes in (the broker's
LogAppendTime of the command's record), and the core's clock never runs backwards: a
decision's time is `max(state.clock_ms, record_time_ms)`, and every event carries it as
`ts_ms`. No randomness, no I/O, no import of Kafka, RocksDB or HTTP. The machine decides;
`fold` (state.py) records. Every command it decides leaves at least one event, rejections
included, so that the partition's state, idempotency memory included, is a fold of
`wallet.events` alone.

Who may ask what (rejection `not_authorized`): `open_account` any role (the actor becomes the
owner); `deposit` role bank; `withdraw` role bank or the owner; `transfer` and `pay_merchant`
the owner of `from_account`; `freeze`, `unfreeze`, `close` role operator; `place_hold` the
owner of the held account; `capture_hold` and `void_hold` the owner of the held (paying)
account or role operator. The destination's owner cannot capture: the capture is decided on
the payer's partition, which does not know who owns the destination. A request the actor may
not ask (and an open of an account another actor owns: `account_exists`) is refused before
anything else is looked at, its id included, unless the account remembers this very request (a
retry gets its first answer), and the refusal is not remembered: a stranger can neither take an
id of the account's nor be answered as a conflict with one.

Holds (Try-Confirm/Cancel). available = balance - held; a hold, withdraw, transfer and
pay_merchant need available funds. A hold reserves money for `to_account` until it is
captured (once or in several parts; `final` releases the rest; never beyond what it still
holds: `capture_exceeds_hold`), voided, or expires. A capture moves money exactly as a
transfer does: the captured amount leaves the balance at once and is in flight, a credit leg
(digest = the capture's) goes to the destination, which credits and answers `success`, or
refuses and sends a refund leg back; the refund makes the money available again (the hold is
not re-opened). A frozen account cannot place or capture; its holds may be voided and do
expire; close is refused while a hold is open. Before ANY command is decided at decision time
T, every open hold of the partition with expires_ms <= T expires (`hold_expired`, in expiry
order then key order), so the time of the log alone decides what is expired; a processor's
`tick` is a command that does only that, for partitions without traffic.

A transfer is a saga with one path whatever the partitions: the sender's side debits and
emits a credit leg keyed by the receiver; the receiver's side credits and answers
`success`, or refuses and emits a refund leg back; the sender's side refunds and answers
`failure`. Between the legs the money is in flight. Legs reach the core only after the
runtime verified their MAC (schemas.leg_auth); the core still validates every leg fully and
raises `UndecidableInput`, folding nothing, for one it cannot decide:
- a leg's amount must be a positive canonical amount of a known currency;
- a refund must match the sender's pending debit (transaction id, digest, amount, currency,
  receiving account, and the debit's time `debit_ms`) that the sender still remembers; anything else (a copy of a refund
  already applied, a refund of a debit forgotten because the saga outlived the idempotency
  window) is dead-lettered and, in the second case, listed in flight by the audit;
- a copy of a credit leg already decided (same receiver, transaction id, digest and issued_ms,
  remembered from the credit or refusal event) moves nothing and repeats the answer;
- a credit leg older than LEG_AGE_MAX_MS on the receiver's clock is refused (`leg_expired`)
  and refunded: the sender, which remembers its pending debit for a whole window, gets its
  money back, and any copy of a leg the receiver still accepts is one it still remembers;
- a credit leg older than LEG_DECIDABLE_AGE_MAX_MS (the window less the clock skew the rules
  allow between partitions' leaders) is undecidable: the receiver may have credited it and
  forgotten so, and a refund would reach a sender that, its clock behind, still remembers the
  debit. Such a saga is the operators' (the audit lists it in flight), as one outliving the
  window is.
The balance cap holds for balance + the account's pending debits, so a refund never passes it.

Sharded merchants (schemas.commands): `open_account` with `shards` N > 1 opens the merchant as
shard 0 and emits one `open_shard` leg per other shard; the shard's partition opens it (same
owner and currency, kind merchant), and a copy of the leg changes nothing. A client never
opens an id with `::` (`reserved_account_id`). A transfer or pay_merchant with `to_shards` N
debits the payer as usual with the picked shard as the receiver; from there it is an ordinary
saga (a missing shard refuses, the payer is refunded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from schemas.codec import command_digest
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    HOLD_EXPIRY_MS_MAX,
    SHARDS_MAX,
    CaptureHold,
    ClientCommand,
    Close,
    Command,
    CreditLeg,
    Deposit,
    Freeze,
    Leg,
    OpenAccount,
    OpenShard,
    PayMerchant,
    PlaceHold,
    RefundLeg,
    Tick,
    Transfer,
    Unfreeze,
    VoidHold,
    WireCommand,
    Withdraw,
    command_type,
    is_reserved_id,
    owner_account,
    shard_account_id,
    shard_index,
)
from schemas.events import (
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
)
from schemas.outcomes import Outcome, OutcomeStatus, Reason
from streams.core.errors import UndecidableInput
from streams.core.money import (
    BALANCE_MINOR_MAX,
    AmountError,
    canonical_minor,
    format_amount,
    minor_units_of,
    parse_amount_minor,
)
from streams.core.state import (
    CAPTURED,
    CLOSED,
    EXPIRED,
    FAILURE,
    FROZEN,
    LEG_AGE_MAX_MS,
    LEG_DECIDABLE_AGE_MAX_MS,
    OPEN,
    PENDING,
    SUCCESS,
    VOIDED,
    Account,
    Hold,
    Remembered,
    State,
    advance_clock,
    credit_key,
    due_holds,
    fold,
    own_key,
    recall,
)

if TYPE_CHECKING:
    from collections.abc import Callable

# The balance events `_move_money` builds.
_MoneyEvent = TypeVar("_MoneyEvent", Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded)


class Decision(NamedTuple):
    state: State  # the same object that was passed in, with the decided events folded
    events: list[Event]
    follow_ups: list[Leg]  # legs only: a credit or refund leg of a saga, or the open_shard legs of a sharded open
    outcome: Outcome | None


def apply(state: State, command: WireCommand, record_time_ms: int) -> Decision:
    """Decides one command at the record's time (the broker's LogAppendTime of its record)."""
    assert type(record_time_ms) is int and record_time_ms >= 0, f"record time {record_time_ms!r}: a runtime bug"
    now_ms = state.clock_ms if state.clock_ms > record_time_ms else record_time_ms
    command_class = type(command)
    # `command_class is X` dispatches on the exact class; the `if TYPE_CHECKING` asserts only
    # tell mypy what each test established. A leg is validated before anything is folded (the
    # due expiries included): what the core cannot decide leaves the state untouched.
    if command_class is CreditLeg:
        if TYPE_CHECKING:
            assert isinstance(command, CreditLeg)
        amount_minor = _leg_amount_minor(command)
        if now_ms - command.issued_ms > LEG_DECIDABLE_AGE_MAX_MS:
            raise UndecidableInput(
                f"credit_leg {command.transaction_id!r} issued {now_ms - command.issued_ms} ms ago: "
                f"older than {LEG_DECIDABLE_AGE_MAX_MS} ms, it may be a copy of a leg credited and forgotten"
            )
        expired = _expire_due_holds(state, now_ms, command)
        decision = _on_credit_leg(state, command, amount_minor, now_ms)
        return _after(expired, decision) if expired else decision
    if command_class is RefundLeg:
        if TYPE_CHECKING:
            assert isinstance(command, RefundLeg)
        account, amount_minor = _refunded_debit(state, command, now_ms)
        expired = _expire_due_holds(state, now_ms, command)
        decision = _on_refund_leg(state, command, account, amount_minor, now_ms)
        return _after(expired, decision) if expired else decision
    if command_class is OpenShard:
        if TYPE_CHECKING:
            assert isinstance(command, OpenShard)
        _check_open_shard(state, command)
        expired = _expire_due_holds(state, now_ms, command)
        decision = _on_open_shard(state, command, now_ms)
        return _after(expired, decision) if expired else decision
    if command_class is Tick:
        return Decision(state, _expire_due_holds(state, now_ms, command), [], None)
    if TYPE_CHECKING:
        assert not isinstance(command, (CreditLeg, RefundLeg, OpenShard, Tick))
    handler = _HANDLERS[command_class]
    digest = command_digest(command)
    expired = _expire_due_holds(state, now_ms, command)
    remembered = recall(state, own_key(owner_account(command), command.transaction_id), now_ms)
    if remembered is not None and remembered.digest == digest:
        decision = _repeat(state, command, digest, remembered, now_ms)
    elif (refusal := _refusal_of_stranger(state, command)) is not None:
        # Before the memory, and never remembered (`fold`): a stranger's request, whatever its
        # id, neither takes an id of the account's nor is answered as a conflict with one.
        decision = _reject(state, command, digest, refusal, now_ms)
    elif remembered is not None:
        decision = _repeat(state, command, digest, remembered, now_ms)
    elif command_class is PlaceHold and (owner_account(command), command.transaction_id) in state.holds:
        decision = _placed_before(state, cast(PlaceHold, command), digest, now_ms)
    else:
        # From here on the command leaves an event at `now_ms`: forget first what that forgets.
        advance_clock(state, now_ms)
        decision = handler(state, command, digest, now_ms)
    return _after(expired, decision) if expired else decision


def _refusal_of_stranger(state: State, command: ClientCommand) -> str | None:
    """`not_authorized` if the actor may not ask this of the account (see the module's "Who may
    ask what"), `account_exists` for an open of an account another actor owns, else None. An
    account not open yet has no owner to ask: its handler refuses `account_not_found`."""
    command_class = type(command)
    if command_class is Deposit:
        return None if command.role == "bank" else Reason.NOT_AUTHORIZED
    if command_class in _OPERATOR_COMMANDS:
        return None if command.role == "operator" else Reason.NOT_AUTHORIZED
    account = state.accounts.get(owner_account(command))
    if account is None or command.actor == account.owner:
        return None
    if command_class is OpenAccount:
        return Reason.ACCOUNT_EXISTS
    if command_class is Withdraw:
        return None if command.role == "bank" else Reason.NOT_AUTHORIZED
    if command_class is CaptureHold or command_class is VoidHold:
        return None if command.role == "operator" else Reason.NOT_AUTHORIZED
    return Reason.NOT_AUTHORIZED  # transfer, pay_merchant, place_hold: the owner's alone


_OPERATOR_COMMANDS = frozenset({Freeze, Unfreeze, Close})


def _expire_due_holds(state: State, now_ms: int, command: WireCommand) -> list[Event]:
    """Expires (and folds) every open hold of the partition due at `now_ms`: what a decision of
    `command` at that time must see first."""
    deadlines = state.hold_deadlines
    if not deadlines or deadlines[0][0] > now_ms:
        return []  # the common case, at the cost of one comparison
    command_name = command_type(command)
    expired: list[Event] = []
    for account_id, hold_id in due_holds(state, now_ms):
        hold, account = state.holds[(account_id, hold_id)], state.accounts[account_id]
        event = HoldExpired(
            account_id=account_id,
            transaction_id=hold_id,
            ts_ms=now_ms,
            command=command_name,
            digest=hold.digest,
            actor=hold.actor,
            seq=account.seq + 1,
            hold_id=hold_id,
            released=format_amount(hold.held_minor, account.currency),
            currency=account.currency,
            held=format_amount(account.held_minor - hold.held_minor, account.currency),
        )
        fold(state, event)
        expired.append(event)
    return expired


def _after(expired: list[Event], decision: Decision) -> Decision:
    """The decision with the expiries its time caused first, as they were folded."""
    return Decision(decision.state, expired + decision.events, decision.follow_ups, decision.outcome)


def _repeat(state: State, command: ClientCommand, digest: str, remembered: Remembered, now_ms: int) -> Decision:
    """A transaction id this account has already decided: the first answer, never a second effect."""
    if remembered.digest != digest:
        return _reject(state, command, digest, Reason.DUPLICATE_CONFLICT, now_ms)
    if remembered.status == PENDING:
        # The transfer or capture is still in flight (or its success was decided on the
        # receiver's side): ask the receiver to repeat its answer; a resent leg can never move
        # money. Only a debit or a capture is remembered pending, and the digest matched.
        assert isinstance(command, (Transfer, PayMerchant, CaptureHold)), command
        assert remembered.to_account is not None, remembered  # a pending entry names its receiver
        currency = state.accounts[owner_account(command)].currency
        amount = format_amount(remembered.amount_minor, currency)
        leg = _credit_leg(command, remembered.to_account, amount, currency, digest, now_ms, resend=True)
        return Decision(state, [], [leg], None)
    # Not pending, so a decided answer: `fold` remembers only success or failure besides pending.
    status = cast(OutcomeStatus, remembered.status)
    return Decision(state, [], [], _outcome(command, status, remembered.reason, digest))


def _open_account(state: State, command: OpenAccount, digest: str, now_ms: int) -> Decision:
    try:
        minor_units_of(command.currency)
    except AmountError as error:
        return _reject(state, command, digest, error.reason, now_ms)
    if is_reserved_id(command.account_id):
        # Derived shard ids are opened by the core only (`open_shard`), never by a client.
        return _reject(state, command, digest, Reason.RESERVED_ACCOUNT_ID, now_ms)
    shards = command.shards
    if not 1 <= shards <= SHARDS_MAX or (
        shards > 1
        and (
            command.kind != "merchant" or len(shard_account_id(command.account_id, shards - 1)) > ACCOUNT_ID_LENGTH_MAX
        )
    ):
        return _reject(state, command, digest, Reason.INVALID_SHARDS, now_ms)
    if command.account_id in state.accounts:
        return _reject(state, command, digest, Reason.ACCOUNT_EXISTS, now_ms)
    event = AccountOpened(
        account_id=command.account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command="open_account",
        digest=digest,
        actor=command.actor,
        seq=1,
        owner=command.actor,
        currency=command.currency,
        kind=command.kind,
        balance=format_amount(0, command.currency),
        shards=shards,
    )
    fold(state, event)
    # Shards 1..N-1 are opened on their own partitions by legs of this decision, in the same
    # Kafka transaction as its answer: a payment sent after the answer finds every shard open.
    legs: list[Leg] = [
        OpenShard(
            transaction_id=command.transaction_id,
            actor=command.actor,
            issued_ms=now_ms,
            account_id=shard_account_id(command.account_id, index),
            merchant_account=command.account_id,
            shard_index=index,
            shards=shards,
            owner=command.actor,
            currency=command.currency,
            digest=digest,
        )
        for index in range(1, shards)
    ]
    return Decision(state, [event], legs, _success(command, digest))


def _check_open_shard(state: State, leg: OpenShard) -> None:
    """An `open_shard` leg names the shard's derived id and a known currency, else it cannot be
    decided (UndecidableInput, nothing folded). A copy of a leg already decided is told apart
    from a conflicting one here too: the shard exists, as a shard of that merchant and owner."""
    try:
        minor_units_of(leg.currency)
        derived = not is_reserved_id(leg.merchant_account) and leg.shard_index < leg.shards
        derived = derived and shard_account_id(leg.merchant_account, leg.shard_index) == leg.account_id
    except AmountError:
        derived = False
    if not derived:
        raise UndecidableInput(
            f"open_shard {leg.transaction_id!r}: {leg.account_id!r} is not shard {leg.shard_index} of "
            f"{leg.shards} of merchant {leg.merchant_account!r} in a known currency"
        )
    account = state.accounts.get(leg.account_id)
    if account is not None and (account.owner != leg.owner or account.currency != leg.currency):
        raise UndecidableInput(
            f"open_shard {leg.transaction_id!r}: {leg.account_id!r} is open already for another owner"
        )


def _on_open_shard(state: State, leg: OpenShard, now_ms: int) -> Decision:
    if leg.account_id in state.accounts:
        return Decision(state, [], [], None)  # a copy of the leg that opened it: no second effect
    advance_clock(state, now_ms)
    event = AccountOpened(
        account_id=leg.account_id,
        transaction_id=leg.transaction_id,
        ts_ms=now_ms,
        command="open_shard",
        digest=leg.digest,
        actor=leg.actor,
        seq=1,
        owner=leg.owner,
        currency=leg.currency,
        kind="merchant",
        balance=format_amount(0, leg.currency),
        shards=leg.shards,
        shard_of=leg.merchant_account,
    )
    fold(state, event)
    return Decision(state, [event], [], None)  # the merchant's open has answered already


def _deposit(state: State, command: Deposit, digest: str, now_ms: int) -> Decision:
    account, amount_minor, reason = _usable_account(state, command.account_id, command.amount, command.currency)
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None  # _usable_account names a reason whenever it finds no account
    if account.balance_minor + account.in_flight_minor + amount_minor > BALANCE_MINOR_MAX:
        return _reject(state, command, digest, Reason.BALANCE_LIMIT_EXCEEDED, now_ms)
    event = _move_money(state, Deposited, command, digest, now_ms, account, command.account_id, amount_minor)
    return Decision(state, [event], [], _success(command, digest))


def _withdraw(state: State, command: Withdraw, digest: str, now_ms: int) -> Decision:
    account, amount_minor, reason = _spendable_account(state, command.account_id, command.amount, command.currency)
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None  # _spendable_account names a reason whenever it finds no account
    event = _move_money(state, Withdrawn, command, digest, now_ms, account, command.account_id, -amount_minor)
    return Decision(state, [event], [], _success(command, digest))


def _transfer(state: State, command: Transfer | PayMerchant, digest: str, now_ms: int) -> Decision:
    to_account = command.to_account
    shards = command.to_shards
    if shards != 1:
        # The client's shard count only chooses among to_account's own derived ids; a shard
        # that does not exist refuses the credit and the payer is refunded.
        if not 1 <= shards <= SHARDS_MAX or is_reserved_id(to_account):
            return _reject(state, command, digest, Reason.INVALID_SHARDS, now_ms)
        to_account = shard_account_id(to_account, shard_index(command.transaction_id, shards))
    if command.from_account == to_account:
        return _reject(state, command, digest, Reason.SAME_ACCOUNT, now_ms)
    account, amount_minor, reason = _spendable_account(state, command.from_account, command.amount, command.currency)
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None  # _spendable_account names a reason whenever it finds no account
    event = _move_money(
        state,
        TransferDebited,
        command,
        digest,
        now_ms,
        account,
        command.from_account,
        -amount_minor,
        to_account=to_account,
        merchant_only=type(command) is PayMerchant,
    )
    leg = _credit_leg(command, to_account, event.amount, command.currency, digest, now_ms, resend=False)
    return Decision(state, [event], [leg], None)


def _credit_leg(
    command: Transfer | PayMerchant | CaptureHold,
    to_account: str,
    amount: str,
    currency: str,
    digest: str,
    now_ms: int,
    resend: bool,
) -> CreditLeg:
    """The credit leg of a transfer or a capture, from the account that owns the command."""
    return CreditLeg(
        transaction_id=command.transaction_id,
        actor=command.actor,
        issued_ms=now_ms,
        from_account=owner_account(command),
        to_account=to_account,
        amount=amount,
        currency=currency,
        digest=digest,
        merchant_only=type(command) is PayMerchant,
        resend=resend,
    )


def _leg_amount_minor(leg: CreditLeg | RefundLeg) -> int:
    """The leg's amount; a leg that is not a positive canonical amount of a known currency, or
    that names one account on both sides, cannot be decided."""
    if leg.from_account == leg.to_account:
        raise UndecidableInput(f"{command_type(leg)} {leg.transaction_id!r} names {leg.to_account!r} on both sides")
    try:
        return canonical_minor(leg.amount, leg.currency)
    except ValueError as error:
        raise UndecidableInput(f"{command_type(leg)} {leg.transaction_id!r}: {error}") from None


def _on_credit_leg(state: State, leg: CreditLeg, amount_minor: int, now_ms: int) -> Decision:
    remembered = recall(state, credit_key(leg.to_account, leg.transaction_id, leg.from_account), now_ms)
    if leg.resend:
        # Only a success is answered from here: a refusal's answer belongs to the sender's
        # side, which gives it when the refund leg arrives.
        if remembered is not None and remembered.digest == leg.digest and remembered.status == SUCCESS:
            return Decision(state, [], [], _leg_outcome(leg, SUCCESS, None))
        return Decision(state, [], [], None)
    if remembered is not None and remembered.digest == leg.digest and remembered.issued_ms == leg.issued_ms:
        # A copy of a leg this receiver already decided (a replayed record): no second effect.
        # Another leg under the id (another issued_ms, or another request) is another debit,
        # taken by a sender that had forgotten the first: it is decided afresh below, and its
        # decision is what the receiver remembers from then on. A copy of the first one arriving
        # later is older than the sender's window less the clock skew, so undecidable (`apply`).
        if remembered.status == SUCCESS:
            return Decision(state, [], [], _leg_outcome(leg, SUCCESS, None))
        return Decision(state, [], [], None)
    advance_clock(state, now_ms)  # the leg leaves an event at `now_ms`
    account = state.accounts.get(leg.to_account)
    reason: str | None
    if now_ms - leg.issued_ms > LEG_AGE_MAX_MS:
        reason = Reason.LEG_EXPIRED
    else:
        reason = _refusal_to_receive(account, leg.currency)
    if reason is None:
        assert account is not None  # _refusal_to_receive refuses a missing account
        if leg.merchant_only and account.kind != "merchant":
            reason = Reason.NOT_A_MERCHANT
        elif account.balance_minor + account.in_flight_minor + amount_minor > BALANCE_MINOR_MAX:
            reason = Reason.BALANCE_LIMIT_EXCEEDED
    if reason is not None:
        event = CommandRejected(
            account_id=leg.to_account,
            transaction_id=leg.transaction_id,
            ts_ms=now_ms,
            command="credit_leg",
            digest=leg.digest,
            actor=leg.actor,
            reason=reason,
            issued_ms=leg.issued_ms,
            from_account=leg.from_account,
        )
        refund = RefundLeg(
            transaction_id=leg.transaction_id,
            actor=leg.actor,
            issued_ms=now_ms,
            from_account=leg.from_account,
            to_account=leg.to_account,
            amount=leg.amount,
            currency=leg.currency,
            digest=leg.digest,
            reason=reason,
            debit_ms=leg.issued_ms,
        )
        fold(state, event)
        return Decision(state, [event], [refund], None)
    assert account is not None  # no refusal, so the account exists (see above)
    credited = _move_money(
        state,
        TransferCredited,
        leg,
        leg.digest,
        now_ms,
        account,
        leg.to_account,
        amount_minor,
        from_account=leg.from_account,
        issued_ms=leg.issued_ms,
    )
    return Decision(state, [credited], [], _leg_outcome(leg, SUCCESS, None))


def _refunded_debit(state: State, leg: RefundLeg, now_ms: int) -> tuple[Account, int]:
    """The account a refund leg pays back and the amount, or UndecidableInput (nothing folded)."""
    amount_minor = _leg_amount_minor(leg)
    account = state.accounts.get(leg.from_account)
    pending = recall(state, own_key(leg.from_account, leg.transaction_id), now_ms)
    if (
        account is None
        or pending is None
        or pending.status != PENDING
        or pending.digest != leg.digest
        or pending.to_account != leg.to_account
        or pending.amount_minor != amount_minor
        or pending.ts_ms != leg.debit_ms
        or leg.currency != account.currency
    ):
        raise UndecidableInput(
            f"refund_leg {leg.transaction_id!r} of {leg.amount} {leg.currency} to "
            f"{leg.from_account!r} matches no debit that account remembers as pending"
        )
    return account, amount_minor


def _on_refund_leg(state: State, leg: RefundLeg, account: Account, amount_minor: int, now_ms: int) -> Decision:
    advance_clock(state, now_ms)
    # A refund is never refused: the money is the sender's whatever happened to the account
    # meanwhile (frozen, closed), and refusing it would destroy it. It cannot pass the cap:
    # the cap holds for the balance plus the pending debits, this one included. The refund of
    # a capture makes the money available again: the hold it came from is not re-opened.
    event = _move_money(
        state,
        TransferRefunded,
        leg,
        leg.digest,
        now_ms,
        account,
        leg.from_account,
        amount_minor,
        to_account=leg.to_account,
        reason=leg.reason,
    )
    return Decision(state, [event], [], _leg_outcome(leg, FAILURE, leg.reason))


def _placed_before(state: State, command: PlaceHold, digest: str, now_ms: int) -> Decision:
    """A place whose id the memory forgot but whose hold the account still keeps (a hold
    outlives the idempotency window): a retry gets the first answer and leaves no event, so the
    clock does not move either; another request under the hold's id is a conflict."""
    if state.holds[(command.account_id, command.transaction_id)].digest == digest:
        return Decision(state, [], [], _success(command, digest))
    return _reject(state, command, digest, Reason.DUPLICATE_CONFLICT, now_ms)


def _place_hold(state: State, command: PlaceHold, digest: str, now_ms: int) -> Decision:
    if command.to_account == command.account_id:
        return _reject(state, command, digest, Reason.SAME_ACCOUNT, now_ms)
    expires_in_ms = command.expires_in_ms
    if not 1 <= expires_in_ms <= HOLD_EXPIRY_MS_MAX:
        return _reject(state, command, digest, Reason.INVALID_EXPIRY, now_ms)
    account, amount_minor, reason = _spendable_account(state, command.account_id, command.amount, command.currency)
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None  # _spendable_account names a reason whenever it finds no account
    currency = account.currency
    event = HoldPlaced(
        account_id=command.account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command="place_hold",
        digest=digest,
        actor=command.actor,
        seq=account.seq + 1,
        hold_id=command.transaction_id,
        to_account=command.to_account,
        amount=format_amount(amount_minor, currency),
        currency=currency,
        expires_ms=now_ms + expires_in_ms,
        held=format_amount(account.held_minor + amount_minor, currency),
        balance=format_amount(account.balance_minor, currency),
    )
    return _accept(state, command, digest, event)


def _capture_hold(state: State, command: CaptureHold, digest: str, now_ms: int) -> Decision:
    account, hold, reason = _open_hold(state, command)
    amount_minor = 0
    if reason is None:
        assert account is not None and hold is not None  # _open_hold names a reason otherwise
        if command.amount is None:
            amount_minor = hold.held_minor
        else:
            try:
                amount_minor = parse_amount_minor(command.amount, account.currency)
            except AmountError as error:
                reason = error.reason
        if reason is None:
            if account.status == FROZEN:
                reason = Reason.ACCOUNT_FROZEN
            elif amount_minor > hold.held_minor:
                reason = Reason.CAPTURE_EXCEEDS_HOLD  # never partly done
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None and hold is not None  # as above: no reason, so both were found
    currency = account.currency
    ends = command.final or amount_minor == hold.held_minor
    released_minor = hold.held_minor - amount_minor if ends else 0
    event = HoldCaptured(
        account_id=command.account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command="capture_hold",
        digest=digest,
        actor=command.actor,
        seq=account.seq + 1,
        amount=format_amount(amount_minor, currency),
        currency=currency,
        balance=format_amount(account.balance_minor - amount_minor, currency),
        hold_id=command.hold_id,
        to_account=hold.to_account,
        held=format_amount(account.held_minor - amount_minor - released_minor, currency),
        released=format_amount(released_minor, currency),
        final=ends,
    )
    fold(state, event)
    leg = _credit_leg(command, hold.to_account, event.amount, currency, digest, now_ms, resend=False)
    return Decision(state, [event], [leg], None)


def _void_hold(state: State, command: VoidHold, digest: str, now_ms: int) -> Decision:
    account, hold, reason = _open_hold(state, command)
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None and hold is not None  # _open_hold names a reason otherwise
    currency = account.currency
    event = HoldVoided(
        account_id=command.account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command="void_hold",
        digest=digest,
        actor=command.actor,
        seq=account.seq + 1,
        hold_id=command.hold_id,
        released=format_amount(hold.held_minor, currency),
        currency=currency,
        held=format_amount(account.held_minor - hold.held_minor, currency),
    )
    return _accept(state, command, digest, event)


# Why a capture or void of an ended hold is refused, by how it ended.
_HOLD_ENDED = {CAPTURED: Reason.HOLD_CAPTURED, VOIDED: Reason.HOLD_VOIDED, EXPIRED: Reason.HOLD_EXPIRED}


def _open_hold(state: State, command: CaptureHold | VoidHold) -> tuple[Account | None, Hold | None, str | None]:
    """The account and open hold a capture or void acts on, and why it cannot, if it cannot.

    The order of refusals: whether the account exists, whether the hold exists and is still
    open (a stranger was refused before: `_refusal_of_stranger`)."""
    account = state.accounts.get(command.account_id)
    if account is None:
        return None, None, Reason.ACCOUNT_NOT_FOUND
    hold = state.holds.get((command.account_id, command.hold_id))
    if hold is None:
        return account, None, Reason.HOLD_NOT_FOUND
    if hold.status != OPEN:
        return account, hold, _HOLD_ENDED[hold.status]
    return account, hold, None


def _freeze(state: State, command: Freeze, digest: str, now_ms: int) -> Decision:
    account = state.accounts.get(command.account_id)
    reason = _refusal_to_change(account)
    if reason is None:
        assert account is not None  # _refusal_to_change refuses a missing account
        reason = Reason.ACCOUNT_FROZEN if account.status == FROZEN else None
    return _status_change(state, command, digest, now_ms, account, reason, AccountFrozen)


def _unfreeze(state: State, command: Unfreeze, digest: str, now_ms: int) -> Decision:
    account = state.accounts.get(command.account_id)
    reason = _refusal_to_change(account)
    if reason is None:
        assert account is not None  # _refusal_to_change refuses a missing account
        reason = Reason.ACCOUNT_NOT_FROZEN if account.status != FROZEN else None
    return _status_change(state, command, digest, now_ms, account, reason, AccountUnfrozen)


def _close(state: State, command: Close, digest: str, now_ms: int) -> Decision:
    account = state.accounts.get(command.account_id)
    reason = _refusal_to_change(account)
    if reason is None:
        assert account is not None  # _refusal_to_change refuses a missing account
        # A refund of a debit in flight must find the account open to its money, and an open
        # hold must still find money it can be captured from.
        reason = (
            (Reason.TRANSFER_IN_FLIGHT if account.in_flight_count else None)
            or (Reason.HOLDS_OPEN if account.held_minor else None)
            or (Reason.BALANCE_NOT_ZERO if account.balance_minor != 0 else None)
        )
    return _status_change(state, command, digest, now_ms, account, reason, AccountClosed)


def _status_change(
    state: State, command, digest: str, now_ms: int, account: Account | None, reason: str | None, event_class
) -> Decision:
    if reason is not None:
        return _reject(state, command, digest, reason, now_ms)
    assert account is not None  # every caller refuses a missing account (_refusal_to_change)
    event = event_class(
        account_id=command.account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command=command_type(command),
        digest=digest,
        actor=command.actor,
        seq=account.seq + 1,
    )
    return _accept(state, command, digest, event)


def _refusal_to_change(account: Account | None) -> str | None:
    if account is None:
        return Reason.ACCOUNT_NOT_FOUND
    if account.status == CLOSED:
        return Reason.ACCOUNT_CLOSED
    return None


def _refusal_to_receive(account: Account | None, currency: str) -> str | None:
    reason = _refusal_to_change(account)
    if reason is not None:
        return reason
    assert account is not None  # _refusal_to_change refuses a missing account
    if account.status == FROZEN:
        return Reason.ACCOUNT_FROZEN
    if account.currency != currency:
        return Reason.CURRENCY_MISMATCH
    return None


def _usable_account(
    state: State, account_id: str, amount: str, currency: str
) -> tuple[Account | None, int, str | None]:
    """The account a client command moves money on, the amount, and why it cannot, if it cannot.

    The order of refusals: the amount, whether the account exists, then the account's state (a
    stranger was refused before: `_refusal_of_stranger`)."""
    try:
        amount_minor = parse_amount_minor(amount, currency)
    except AmountError as error:
        return None, 0, error.reason
    account = state.accounts.get(account_id)
    if account is None:
        return None, 0, Reason.ACCOUNT_NOT_FOUND
    return account, amount_minor, _refusal_to_receive(account, currency)


def _spendable_account(
    state: State, account_id: str, amount: str, currency: str
) -> tuple[Account | None, int, str | None]:
    """As `_usable_account`, for money going out: refused as well unless the available amount
    (the balance less held money) covers it."""
    account, amount_minor, reason = _usable_account(state, account_id, amount, currency)
    if reason is None:
        assert account is not None  # _usable_account names a reason whenever it finds no account
        if account.balance_minor - account.held_minor < amount_minor:  # held money is not available
            reason = Reason.INSUFFICIENT_FUNDS
    return account, amount_minor, reason


def _move_money(
    state: State,
    event_class: type[_MoneyEvent],
    command: Command,
    digest: str,
    now_ms: int,
    account: Account,
    account_id: str,
    signed_amount_minor: int,
    **details: Any,
) -> _MoneyEvent:
    """Builds the event of a balance change and folds it, handing fold the balance it has."""
    currency = account.currency
    balance_minor = account.balance_minor + signed_amount_minor
    assert 0 <= balance_minor <= BALANCE_MINOR_MAX and signed_amount_minor != 0, (account_id, balance_minor)
    event = event_class(
        account_id=account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command=command_type(command),
        digest=digest,
        actor=command.actor,
        seq=account.seq + 1,
        amount=format_amount(abs(signed_amount_minor), currency),
        currency=currency,
        balance=format_amount(balance_minor, currency),
        **details,
    )
    fold(state, event, balance_minor)
    return event


def _outcome(command: Command, status: OutcomeStatus, reason: str | None, digest: str) -> Outcome:
    return Outcome(
        transaction_id=command.transaction_id,
        account_id=owner_account(command),
        actor=command.actor,
        status=status,
        reason=reason,
        digest=digest,
    )


def _leg_outcome(leg: CreditLeg | RefundLeg, status: OutcomeStatus, reason: str | None) -> Outcome:
    # The request belongs to the sender's account, whichever side answers it.
    return Outcome(
        transaction_id=leg.transaction_id,
        account_id=leg.from_account,
        actor=leg.actor,
        status=status,
        reason=reason,
        digest=leg.digest,
    )


def _success(command: Command, digest: str) -> Outcome:
    return _outcome(command, SUCCESS, None, digest)


def _accept(state: State, command: Command, digest: str, event: Event) -> Decision:
    fold(state, event)
    return Decision(state, [event], [], _success(command, digest))


def _rejection(command: Command, account_id: str, digest: str, reason: str, now_ms: int) -> CommandRejected:
    return CommandRejected(
        account_id=account_id,
        transaction_id=command.transaction_id,
        ts_ms=now_ms,
        command=command_type(command),
        digest=digest,
        actor=command.actor,
        reason=reason,
    )


def _reject(state: State, command: Command, digest: str, reason: str, now_ms: int) -> Decision:
    event = _rejection(command, owner_account(command), digest, reason, now_ms)
    fold(state, event)
    return Decision(state, [event], [], _outcome(command, FAILURE, reason, digest))


# Each handler takes the client command class it is keyed by (hence Any for the command).
_HANDLERS: dict[type, Callable[[State, Any, str, int], Decision]] = {
    OpenAccount: _open_account,
    Deposit: _deposit,
    Withdraw: _withdraw,
    Transfer: _transfer,
    PayMerchant: _transfer,
    Freeze: _freeze,
    Unfreeze: _unfreeze,
    Close: _close,
    PlaceHold: _place_hold,
    CaptureHold: _capture_hold,
    VoidHold: _void_hold,
}
