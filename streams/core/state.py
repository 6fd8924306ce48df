"""The state of the accounts one partition owns, and how events fold into it.

State changes only here, in `fold`: the state machine decides events and folds them, the
runtime restores by folding the log, and the audit folds the log to check the runtime. One
function for all three is what makes "folding wallet.events yields exactly the live state"
true by construction.

Holds: an account's `held_minor` is what its open holds reserve, inside its balance (available
= balance - held, never negative); `State.holds` keeps every open hold and every ended one
for an idempotency window after its end, so that a late capture or void gets the hold's fate
as its reason. Holds are tracked with the memory (`tracks_memory`): a fold over accounts alone
(the read model, the audit's replay) checks the hold events' arithmetic on `held_minor` and
the balance only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec

from schemas.commands import HOLD_EXPIRY_MS_MAX, SHARDS_MAX, merchant_of_shard
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
    event_type,
)
from schemas.outcomes import FOREIGN_REFUSALS
from streams.core.currencies import MINOR_UNITS
from streams.core.money import BALANCE_MINOR_MAX, canonical_balance_minor, canonical_minor, format_amount

# How long a transaction id is remembered, on the partition's clock (the largest decision time
# folded so far: record times from the broker, never a client's field, never the wall clock):
# an id is kept until that clock passes `ts_ms + IDEMPOTENCY_WINDOW_MS`, rounded to the
# eviction step. A retry before then gets the first answer; a retry after it is a new request
# (so "one answer per request" holds within the window). A quiet partition's clock stands
# still, and so does its forgetting.
# Part of the rules: changing it changes what replay produces.
IDEMPOTENCY_WINDOW_MS = 24 * 60 * 60 * 1000
# The horizon moves in steps of this size, so forgetting is paid once a minute of command
# time, not per event.
IDEMPOTENCY_EVICT_STEP_MS = 60 * 1000


def memory_horizon_ms(clock_ms: int) -> int:
    """Ids with `ts_ms` below this are forgotten. The memory is exactly the set of decided ids
    with `ts_ms >= memory_horizon_ms(clock_ms)`, whatever the order they were folded in, so a
    snapshot stored in any order restores to the same memory."""
    return (clock_ms // IDEMPOTENCY_EVICT_STEP_MS) * IDEMPOTENCY_EVICT_STEP_MS - IDEMPOTENCY_WINDOW_MS


# A credit leg older than this on the receiver's clock (its `issued_ms` behind the decision
# time) is refused and refunded (`leg_expired`). So a copy of a genuine leg that is still
# accepted is young enough that the receiver still remembers crediting the original.
LEG_AGE_MAX_MS = IDEMPOTENCY_WINDOW_MS // 2
# How far the clocks of two partitions' leaders may differ for the rules to hold (record times
# are the leaders' LogAppendTime). A credit leg older than the window less this cannot be
# decided: the receiver may have credited it and forgotten so, while the sender, its clock
# behind, still remembers the debit as pending, so a refusal's refund could pay it back twice.
LEG_CLOCK_SKEW_MAX_MS = 60 * 60 * 1000
LEG_DECIDABLE_AGE_MAX_MS = IDEMPOTENCY_WINDOW_MS - LEG_CLOCK_SKEW_MAX_MS

# A key of the idempotency memory: (account, transaction id, sender). A transaction id is its
# owning account's, so the account's own requests are remembered with sender "", and a credit
# leg the account decided (credited or refused) under the paying account's id, so that no
# payment can take, or be refused for, an id of the receiver's or of another sender's. Account
# ids are never empty, so the two kinds never meet.
MemoryKey = tuple[str, str, str]


def own_key(account_id: str, transaction_id: str) -> MemoryKey:
    return (account_id, transaction_id, "")


def credit_key(to_account: str, transaction_id: str, from_account: str) -> MemoryKey:
    return (to_account, transaction_id, from_account)


def memory_key(event: Event) -> MemoryKey:
    """The key under which folding `event` remembers its request. A refused credit leg of a log
    before contract v4 (no `from_account`) is remembered as the receiver's own, as it was then."""
    event_class = type(event)
    if event_class is TransferCredited:
        if TYPE_CHECKING:
            assert isinstance(event, TransferCredited)
        return credit_key(event.account_id, event.transaction_id, event.from_account)
    if event_class is CommandRejected:
        if TYPE_CHECKING:
            assert isinstance(event, CommandRejected)
        if event.from_account is not None:
            return credit_key(event.account_id, event.transaction_id, event.from_account)
    return own_key(event.account_id, event.transaction_id)


ACTIVE, FROZEN, CLOSED = "active", "frozen", "closed"
PENDING: Final = "pending"
SUCCESS: Final = "success"  # Final: these two are also outcome statuses (a Literal type)
FAILURE: Final = "failure"


# The states of a hold: open until captured whole or finally, voided, or expired.
OPEN, CAPTURED, VOIDED, EXPIRED = "open", "captured", "voided", "expired"
HOLD_STATUSES = frozenset({OPEN, CAPTURED, VOIDED, EXPIRED})


class CorruptLog(Exception):
    """An event that cannot follow the state it is folded into: a gap, a fork, a forgery."""


@dataclass(slots=True)
class Account:
    currency: str
    kind: str
    status: str
    balance_minor: int
    seq: int
    owner: str = ""  # the actor that opened the account
    # Debits of this account whose transfer the account still remembers as pending (not refunded,
    # not forgotten): how many, and how much. The balance cap holds for balance + in flight, so
    # a refund can never pass it; close is refused while any is pending.
    in_flight_count: int = 0
    in_flight_minor: int = 0
    # What the account's open holds reserve: part of the balance, not available to move.
    held_minor: int = 0


@dataclass(slots=True)
class Hold:
    """A hold of an account (the key of `State.holds` is (account, hold id)), open or ended.

    `amount_minor` = `held_minor` + `captured_minor` + what was released, at every point: a
    capture takes from `held_minor`, a final capture, a void or the expiry release the rest."""

    to_account: str
    amount_minor: int  # placed
    held_minor: int  # still held: 0 once ended
    captured_minor: int
    expires_ms: int
    digest: str  # of the place_hold request: a retry of it is told apart from a reuse of its id
    actor: str  # who placed it
    placed_ms: int
    status: str = OPEN
    ended_ms: int | None = None


class Remembered(msgspec.Struct, frozen=True, gc=False):
    """What the partition remembers of a transaction id, to answer retries alike.

    For a pending debit (status pending) also what a refund must match: the amount (in the
    account's currency) and the receiving account."""

    digest: str
    status: str  # pending (a debited transfer in flight), success or failure
    reason: str | None
    ts_ms: int
    amount_minor: int = 0
    to_account: str | None = None
    # For a credit leg decided on this side (credited or refused): the leg's issued_ms, so a
    # copy of that leg is told apart from a later debit of the same request.
    issued_ms: int | None = None


@dataclass(slots=True)
class State:
    accounts: dict[str, Account] = field(default_factory=dict)
    memory: dict[MemoryKey, Remembered] = field(default_factory=dict)
    clock_ms: int = 0
    # An index of `memory` by eviction step (ts_ms // IDEMPOTENCY_EVICT_STEP_MS), so that
    # forgetting costs what is forgotten, not a scan of everything remembered: a replay of a
    # long log crosses a step every minute of command time. Derived from `memory`, so not
    # part of the state's identity; it may name keys already forgotten or re-remembered.
    expiry: dict[int, list[MemoryKey]] = field(default_factory=dict, compare=False, repr=False)
    # False for a fold over accounts alone (the read model folds rows it stored, without the
    # idempotency memory): refunds are then not paired with their pending debits and money in
    # flight is not counted. The processor, its restore and the audit fold with the memory.
    tracks_memory: bool = field(default=True, compare=False, repr=False)
    # Key: (account, hold id). Open holds, and ended ones until the clock passes
    # `ended_ms + IDEMPOTENCY_WINDOW_MS` (the memory's horizon, rounded alike).
    holds: dict[tuple[str, str], Hold] = field(default_factory=dict)
    # Derived from `holds`, so not part of the state's identity: a heap of (expires_ms, account,
    # hold id) of every open hold (entries of holds that ended since stay until popped and are
    # skipped: `due_holds`), and the ended holds by the eviction step of their end.
    hold_deadlines: list[tuple[int, str, str]] = field(default_factory=list, compare=False, repr=False)
    ended_holds: dict[int, list[tuple[str, str]]] = field(default_factory=dict, compare=False, repr=False)


def index_memory(state: State) -> State:
    """Rebuilds the derived indexes after `memory` and `holds` were filled directly (a snapshot restore)."""
    state.expiry.clear()
    for key, remembered in state.memory.items():
        state.expiry.setdefault(remembered.ts_ms // IDEMPOTENCY_EVICT_STEP_MS, []).append(key)
    state.hold_deadlines = sorted(
        (hold.expires_ms, *key) for key, hold in state.holds.items() if hold.status == OPEN
    )  # a sorted list is a heap
    state.ended_holds.clear()
    for hold_key, hold in state.holds.items():
        if hold.ended_ms is not None:
            state.ended_holds.setdefault(hold.ended_ms // IDEMPOTENCY_EVICT_STEP_MS, []).append(hold_key)
    return state


def due_holds(state: State, now_ms: int) -> list[tuple[str, str]]:
    """The open holds that expire at decision time `now_ms` (expires_ms <= now_ms), in expiry
    order then key order: the order the state machine expires them in. Pops them (and any
    entries of holds that ended otherwise) off the deadline heap."""
    deadlines, holds = state.hold_deadlines, state.holds
    due = []
    while deadlines and deadlines[0][0] <= now_ms:
        expires_ms, account_id, hold_id = heapq.heappop(deadlines)
        hold = holds.get((account_id, hold_id))
        if hold is not None and hold.status == OPEN and hold.expires_ms == expires_ms:
            due.append((account_id, hold_id))
    return due


def recall(state: State, key: MemoryKey, now_ms: int) -> Remembered | None:
    """What is remembered of `key` at decision time `now_ms`: entries the clock's advance to
    `now_ms` will forget are forgotten already."""
    remembered = state.memory.get(key)
    if remembered is not None and remembered.ts_ms < memory_horizon_ms(now_ms):
        return None
    return remembered


def fold(state: State, event: Event, balance_minor: int | None = None) -> State:
    """Applies one event to the state, in place, and returns it.

    The clock advances first (forgetting what falls behind the horizon), then the event is
    applied. Folding an event whose `seq` the account has already reached changes nothing, so
    a restore that starts from a conservative checkpoint is still exact. The state machine,
    which has just computed a money event's new balance, passes it as `balance_minor` to
    spare reading back the text it wrote; everyone else lets the event's text be checked.
    """
    # `event_class is X` dispatches on the exact class (cheaper than isinstance on this path);
    # the `if TYPE_CHECKING` asserts only tell mypy what each test established.
    event_class = type(event)
    if event_class is CommandRejected:
        if TYPE_CHECKING:
            assert isinstance(event, CommandRejected)
        advance_clock(state, event.ts_ms)
        # A conflict must not overwrite the first answer, and a stranger's refusal takes no id of
        # the account's (machine: `_refusal_of_stranger`): neither is remembered.
        if event.reason not in FOREIGN_REFUSALS:
            _remember(
                state,
                memory_key(event),
                Remembered(event.digest, FAILURE, event.reason, event.ts_ms, issued_ms=event.issued_ms),
            )
        return state
    if TYPE_CHECKING:
        assert not isinstance(event, CommandRejected)

    account = state.accounts.get(event.account_id)
    if account is None:
        if event_class is not AccountOpened:
            raise CorruptLog(f"{event_type(event)} for account {event.account_id!r} that was never opened")
        if TYPE_CHECKING:
            assert isinstance(event, AccountOpened)
        account = Account(event.currency, event.kind, ACTIVE, 0, 0, event.owner)
    if event.seq <= account.seq:
        return state  # already folded
    if event.seq != account.seq + 1:
        raise CorruptLog(f"account {event.account_id!r}: seq {event.seq} follows {account.seq}")
    if event_class is AccountOpened:
        if TYPE_CHECKING:
            assert isinstance(event, AccountOpened)
        if event.seq != 1 or event.currency not in MINOR_UNITS or event.balance != format_amount(0, event.currency):
            raise CorruptLog(
                f"account {event.account_id!r}: account_opened at seq {event.seq} with balance "
                f"{event.balance!r} {event.currency}: an account opens once, at seq 1, empty"
            )
        if not 1 <= event.shards <= SHARDS_MAX or (
            event.shard_of is not None and merchant_of_shard(event.account_id) != event.shard_of
        ):
            raise CorruptLog(
                f"account {event.account_id!r}: account_opened as a shard of {event.shard_of!r} "
                f"of {event.shards}: not a derived shard id, or a shard count outside 1..{SHARDS_MAX}"
            )
        state.accounts[event.account_id] = account
    advance_clock(state, event.ts_ms)

    key = memory_key(event)
    remembered: Remembered | None = Remembered(event.digest, SUCCESS, None, event.ts_ms)
    if event_class in _HOLD_EVENTS:
        if TYPE_CHECKING:
            assert isinstance(event, (HoldPlaced, HoldCaptured, HoldVoided, HoldExpired))
        remembered = _fold_hold(state, account, event)
    elif event_class in BALANCE_SIGN:
        if TYPE_CHECKING:
            assert isinstance(event, (Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded))
        if balance_minor is None:
            try:
                amount_minor = canonical_minor(event.amount, account.currency)
                balance_minor = canonical_balance_minor(event.balance, account.currency)
            except ValueError as error:
                raise CorruptLog(f"account {event.account_id!r} seq {event.seq}: {error}") from None
            expected_minor = account.balance_minor + BALANCE_SIGN[event_class] * amount_minor
        else:
            amount_minor = abs(balance_minor - account.balance_minor)
            expected_minor = balance_minor
        if (
            event.currency != account.currency
            or balance_minor != expected_minor
            or balance_minor < 0
            or amount_minor <= 0
        ):
            raise CorruptLog(
                f"account {event.account_id!r} seq {event.seq}: balance {event.balance} {event.currency} "
                f"does not follow {account.balance_minor} minor units {account.currency} and amount {event.amount}"
            )
        in_flight_count, in_flight_minor = account.in_flight_count, account.in_flight_minor
        if not state.tracks_memory:
            pass
        elif event_class is TransferCredited:
            if TYPE_CHECKING:
                assert isinstance(event, TransferCredited)
            remembered = Remembered(event.digest, SUCCESS, None, event.ts_ms, issued_ms=event.issued_ms)
        elif event_class is TransferDebited:
            if TYPE_CHECKING:
                assert isinstance(event, TransferDebited)
            in_flight_count += 1
            in_flight_minor += amount_minor
            remembered = Remembered(event.digest, PENDING, None, event.ts_ms, amount_minor, event.to_account)
        elif event_class is TransferRefunded:
            if TYPE_CHECKING:
                assert isinstance(event, TransferRefunded)
            pending = state.memory.get(key)
            if (
                pending is None
                or pending.status != PENDING
                or pending.digest != event.digest
                or pending.amount_minor != amount_minor
                or pending.to_account != event.to_account
            ):
                raise CorruptLog(
                    f"account {event.account_id!r} seq {event.seq}: refund of {event.transaction_id!r} "
                    f"matches no pending debit"
                )
            in_flight_count -= 1
            in_flight_minor -= amount_minor
            # A refund keeps the time of the debit it answers, so the pair is forgotten together.
            remembered = Remembered(event.digest, FAILURE, event.reason, pending.ts_ms, amount_minor, event.to_account)
        if balance_minor + in_flight_minor > BALANCE_MINOR_MAX or in_flight_minor < 0 or in_flight_count < 0:
            raise CorruptLog(
                f"account {event.account_id!r} seq {event.seq}: balance {balance_minor} + in flight "
                f"{in_flight_minor} minor units breaks the cap {BALANCE_MINOR_MAX}"
            )
        account.balance_minor = balance_minor
        account.in_flight_count, account.in_flight_minor = in_flight_count, in_flight_minor
    elif event_class in STATUS_AFTER:
        account.status = STATUS_AFTER[event_class]
    account.seq = event.seq
    if remembered is not None:
        _remember(state, key, remembered)
    return state


def _fold_hold(
    state: State, account: Account, event: HoldPlaced | HoldCaptured | HoldVoided | HoldExpired
) -> Remembered | None:
    """Applies a hold event to its account (and, tracking memory, to its hold); returns what the
    memory keeps of the event's request (None for an expiry, which answers no request, and
    when not tracking memory).

    Invariants, checked on every event: 0 <= held <= balance; a capture takes at most what the
    hold still holds, from an open hold, and a release is exactly what it still held."""
    currency = account.currency
    where = f"account {event.account_id!r} seq {event.seq}"
    try:
        if event.currency != currency:
            raise ValueError(f"{event.currency} is not the account's currency {currency}")
        held_after_minor = canonical_balance_minor(event.held, currency)
        if isinstance(event, HoldPlaced):
            if not event.ts_ms < event.expires_ms <= event.ts_ms + HOLD_EXPIRY_MS_MAX:
                raise ValueError(f"expires at {event.expires_ms}, not within 1 .. {HOLD_EXPIRY_MS_MAX} ms of its place")
            if event.to_account == event.account_id:
                raise ValueError("holds money for the account itself")
            amount_minor, released_minor = canonical_minor(event.amount, currency), 0
            balance_after_minor = canonical_balance_minor(event.balance, currency)
            expected_held_minor = account.held_minor + amount_minor
            expected_balance_minor = account.balance_minor
        elif isinstance(event, HoldCaptured):
            amount_minor = canonical_minor(event.amount, currency)
            released_minor = canonical_balance_minor(event.released, currency)
            balance_after_minor = canonical_balance_minor(event.balance, currency)
            expected_held_minor = account.held_minor - amount_minor - released_minor
            expected_balance_minor = account.balance_minor - amount_minor
        else:
            amount_minor, released_minor = 0, canonical_minor(event.released, currency)
            balance_after_minor = expected_balance_minor = account.balance_minor
            expected_held_minor = account.held_minor - released_minor
    except ValueError as error:
        raise CorruptLog(f"{where}: {event_type(event)} {error}") from None
    if (
        held_after_minor != expected_held_minor
        or balance_after_minor != expected_balance_minor
        or not 0 <= held_after_minor <= balance_after_minor
    ):
        raise CorruptLog(
            f"{where}: {event_type(event)} leaves held {event.held} of balance {balance_after_minor} minor "
            f"units, which does not follow held {account.held_minor} of balance {account.balance_minor}"
        )
    remembered: Remembered | None = None
    key = (event.account_id, event.hold_id)
    if state.tracks_memory:
        hold = state.holds.get(key)
        if type(event) is HoldPlaced:
            if hold is not None or event.hold_id != event.transaction_id:
                raise CorruptLog(f"{where}: hold {event.hold_id!r} placed twice, or under another id")
            state.holds[key] = Hold(
                event.to_account,
                amount_minor,
                amount_minor,
                0,
                event.expires_ms,
                event.digest,
                event.actor,
                event.ts_ms,
            )
            heapq.heappush(state.hold_deadlines, (event.expires_ms, *key))
            remembered = Remembered(event.digest, SUCCESS, None, event.ts_ms)
        else:
            if hold is None or hold.status != OPEN or amount_minor + released_minor > hold.held_minor:
                raise CorruptLog(
                    f"{where}: {event_type(event)} of {event.hold_id!r} takes {amount_minor + released_minor} "
                    f"minor units from a hold that is {'unknown' if hold is None else hold.status} and holds "
                    f"{0 if hold is None else hold.held_minor}"
                )
            ends = type(event) is not HoldCaptured or event.final
            if ends != (amount_minor + released_minor == hold.held_minor) or (
                type(event) is HoldCaptured and (event.to_account != hold.to_account or (released_minor and not ends))
            ):
                raise CorruptLog(f"{where}: {event_type(event)} of {event.hold_id!r} does not end the hold as it says")
            if type(event) is HoldExpired:
                if hold.expires_ms > event.ts_ms or event.hold_id != event.transaction_id:
                    raise CorruptLog(f"{where}: hold {event.hold_id!r} expired before its time {hold.expires_ms}")
            elif hold.expires_ms <= event.ts_ms:
                # Every decision at or after the expiry expires the hold first.
                raise CorruptLog(f"{where}: {event_type(event)} of hold {event.hold_id!r} after its expiry")
            hold.held_minor -= amount_minor + released_minor
            hold.captured_minor += amount_minor
            if ends:
                hold.status = _HOLD_END[type(event)]
                hold.ended_ms = event.ts_ms
                state.ended_holds.setdefault(event.ts_ms // IDEMPOTENCY_EVICT_STEP_MS, []).append(key)
            if type(event) is HoldCaptured:
                # The captured money is in flight to the destination, exactly as a debit is.
                account.in_flight_count += 1
                account.in_flight_minor += amount_minor
                remembered = Remembered(event.digest, PENDING, None, event.ts_ms, amount_minor, event.to_account)
            elif type(event) is HoldVoided:
                remembered = Remembered(event.digest, SUCCESS, None, event.ts_ms)
    account.held_minor = held_after_minor
    account.balance_minor = balance_after_minor
    return remembered


# The sign each money event gives its amount, and the status each status event leaves behind.
BALANCE_SIGN = {
    Deposited: 1,
    Withdrawn: -1,
    TransferDebited: -1,
    TransferCredited: 1,
    TransferRefunded: 1,
    HoldCaptured: -1,
}
STATUS_AFTER = {AccountFrozen: FROZEN, AccountUnfrozen: ACTIVE, AccountClosed: CLOSED}
_HOLD_EVENTS = frozenset({HoldPlaced, HoldCaptured, HoldVoided, HoldExpired})
# The state a hold ends in, by the event that ends it.
_HOLD_END = {HoldCaptured: CAPTURED, HoldVoided: VOIDED, HoldExpired: EXPIRED}


def _remember(state: State, key: MemoryKey, remembered: Remembered) -> None:
    if remembered.ts_ms < memory_horizon_ms(state.clock_ms):
        return  # decided after its id would already have been forgotten (only a refund can be)
    first = state.memory.get(key)
    state.memory[key] = remembered
    if first is None or first.ts_ms != remembered.ts_ms:
        step = remembered.ts_ms // IDEMPOTENCY_EVICT_STEP_MS
        bucket = state.expiry.get(step)
        if bucket is None:
            state.expiry[step] = [key]
        else:
            bucket.append(key)


def advance_clock(state: State, ts_ms: int) -> None:
    """Moves the clock to `ts_ms` if that is later, forgetting what falls behind the horizon.

    The state machine calls it before deciding a command that will leave an event of time
    `ts_ms` (whose fold would advance the clock the same way first), so that the decision
    sees exactly the state that folding its events produces."""
    if ts_ms <= state.clock_ms:
        return
    horizon_before_ms = memory_horizon_ms(state.clock_ms)
    state.clock_ms = ts_ms
    horizon_ms = memory_horizon_ms(ts_ms)
    if horizon_ms != horizon_before_ms:
        horizon_step = horizon_ms // IDEMPOTENCY_EVICT_STEP_MS
        memory = state.memory
        for step in [step for step in state.expiry if step < horizon_step]:
            for key in state.expiry.pop(step):
                remembered = memory.get(key)
                if remembered is not None and remembered.ts_ms < horizon_ms:
                    del memory[key]
                    if remembered.status == PENDING:
                        # A debit forgotten while pending is no longer the account's in flight:
                        # a refund of it would match nothing (the saga outlived the window).
                        account = state.accounts[key[0]]
                        account.in_flight_count -= 1
                        account.in_flight_minor -= remembered.amount_minor
                        assert account.in_flight_count >= 0 and account.in_flight_minor >= 0, key
        # Ended holds are forgotten like the ids: a window after their end.
        holds = state.holds
        for step in [step for step in state.ended_holds if step < horizon_step]:
            for hold_key in state.ended_holds.pop(step):
                hold = holds.get(hold_key)
                if hold is not None and hold.ended_ms is not None and hold.ended_ms < horizon_ms:
                    del holds[hold_key]
