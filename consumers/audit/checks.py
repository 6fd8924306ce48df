"""The audit's checks: pure functions and accumulators over records already read from Kafka.

Nothing here does I/O. The records come as `PartitionLog`s (parallel lists of offsets, keys
and values, see log_reader.py); the checks decode them with msgspec and fold them with the
core's `fold`, the same function the processors and the read model use, so "fold(events) ==
live state" compares like with like.

What is proved, and how:
- every account's events carry seq 1, 2, 3, ... (no gap, no repeat) and each money event's
  balance is the previous balance moved by its amount (the core's fold refuses anything else);
- every transfer's legs agree with its debit, each debit is settled at most once, and the
  money between debit and settlement is listed as in flight;
- conservation per currency, on the balances the events state;
- every decision in the log has exactly one answer on wallet.outcomes and every answer has
  its decision; a request is (transaction id, digest), so a `duplicate_conflict` answer to a
  request that reused an id is never confused with the transaction's own;
- the fold at a snapshot's offset equals that snapshot (a processor's state dump, the read model);
- re-deciding wallet.commands with the core reproduces wallet.events byte for byte.

After a violation the replay goes on with the value the log's amounts give, so that one forged
record yields one finding rather than a cascade, and every independent problem is still seen.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from schemas.codec import SchemaError, decode_command, decode_event, decode_outcome, encode
from schemas.commands import LEG_COMMANDS, owner_account
from schemas.outcomes import Reason
from streams.core.errors import UndecidableInput
from schemas.events import (
    AccountClosed, AccountFrozen, AccountOpened, AccountUnfrozen, CommandRejected, Deposited, Event,
    TransferCredited, TransferDebited, TransferRefunded, Withdrawn, event_type,
)
from schemas.partitioning import partition_for
from streams.core.currencies import MINOR_UNITS
from streams.core.machine import apply
from streams.core.money import canonical_balance_minor, canonical_minor, format_amount
from streams.core.state import ACTIVE, BALANCE_SIGN, FAILURE, STATUS_AFTER, SUCCESS, Account, CorruptLog, State, fold

if TYPE_CHECKING:
    from consumers.audit.log_reader import PartitionLog

# Records of one partition replayed before the next partition's turn (see `LedgerReplay.replay`).
INTERLEAVE_SLICE_RECORDS = 1_024
# Commands re-decided between two progress reports: small enough for a live progress bar,
# large enough that reporting costs nothing.
PROGRESS_CHUNK_RECORDS = 16_384


# Reasons of the answers the processor gives records it dead-letters (no decision event).
_DEAD_LETTER_REASONS = (Reason.INVALID_COMMAND, Reason.WRONG_PARTITION)


class Kind:
    """Violation kinds: stable, machine-readable names (they appear in the JSON report)."""
    LOG_TRUNCATED = "log_truncated"
    PARTITION_COUNT = "partition_count_mismatch"
    UNDECODABLE_EVENT = "undecodable_event"
    MISROUTED_EVENT = "misrouted_event"
    EVENT_BEFORE_OPEN = "event_before_account_opened"
    ACCOUNT_REOPENED = "account_opened_twice"
    SEQ_REPEATED = "seq_repeated"
    SEQ_GAP = "seq_gap"
    BALANCE_MISMATCH = "balance_does_not_follow"
    CONSERVATION = "conservation"
    DEBITED_TWICE = "transfer_debited_twice"
    CREDIT_WITHOUT_DEBIT = "credit_without_debit"
    REFUND_WITHOUT_DEBIT = "refund_without_debit"
    REFUSAL_WITHOUT_DEBIT = "refusal_without_debit"
    REFUND_WITHOUT_REFUSAL = "refund_without_refusal"
    SETTLED_TWICE = "transfer_settled_twice"
    LEG_MISMATCH = "leg_does_not_match_debit"
    IN_FLIGHT_WHEN_SETTLED = "in_flight_when_settled"
    PENDING_WHEN_SETTLED = "command_pending_when_settled"
    UNDECODABLE_OUTCOME = "undecodable_outcome"
    MISKEYED_OUTCOME = "miskeyed_outcome"
    DECISION_WITHOUT_OUTCOME = "decision_without_outcome"
    OUTCOME_WITHOUT_DECISION = "outcome_without_decision"
    OUTCOME_BEFORE_SETTLEMENT = "outcome_before_settlement"
    OUTCOME_MISMATCH = "outcome_does_not_match_decision"
    OUTCOME_CONFLICT = "conflicting_outcomes"
    SNAPSHOT_AHEAD = "snapshot_ahead_of_log"
    NONDETERMINISTIC = "event_not_reproduced"
    EXTRA_EVENT = "event_without_command"
    CORE_ERROR = "core_error_on_command"
    NOT_DEAD_LETTERED = "poison_command_not_dead_lettered"

    @staticmethod
    def snapshot_mismatch(snapshot_kind: str) -> str:
        return f"{snapshot_kind}_mismatch"


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    message: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    account_id: str | None = None
    transaction_id: str | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.message, "topic": self.topic, "partition": self.partition,
                "offset": self.offset, "account_id": self.account_id, "transaction_id": self.transaction_id}


# Where a record is: (partition, offset).
Location = tuple[int, int]
# An answer to a request: (status, reason).
Answer = tuple[str, "str | None"]
# A request: (transaction id, digest).
RequestKey = tuple[str, str]


class Transfer:
    """What the log says about one transfer request: its debit and its legs.

    Built from the records the replay files under the request, each (kind, partition, offset,
    account, counterpart, amount_minor, currency, reason) with kind "debited", "credited",
    "refused" (the receiver's command_rejected of the credit leg) or "refunded".
    """
    __slots__ = ("from_account", "to_account", "amount_minor", "currency", "debited_at", "extra_debits", "legs")

    def __init__(self, records: list[tuple]) -> None:
        self.from_account: str | None = None
        self.to_account: str | None = None
        self.amount_minor = 0
        self.currency: str | None = None
        self.debited_at: Location | None = None
        self.extra_debits: list[Location] = []
        self.legs: list[tuple] = []  # (kind, location, account, counterpart, amount_minor, currency, reason)
        for kind, partition, offset, account_id, counterpart, amount_minor, currency, reason in records:
            if kind != "debited":
                self.legs.append((kind, (partition, offset), account_id, counterpart, amount_minor, currency, reason))
            elif self.debited_at is None:
                self.from_account, self.to_account = account_id, counterpart
                self.amount_minor, self.currency = amount_minor, currency
                self.debited_at = (partition, offset)
            else:
                self.extra_debits.append((partition, offset))

    def first(self, leg_kind: str) -> tuple | None:
        return next((leg for leg in self.legs if leg[0] == leg_kind), None)

    @property
    def settlements(self) -> list[tuple]:
        return [leg for leg in self.legs if leg[0] != "refused"]


def _settled_cleanly(records: list[tuple]) -> bool:
    """Whether a transfer's records are a debit and exactly the legs that settle it, all agreeing:
    a credit, or a refusal and its refund. Such a transfer needs no further look."""
    if len(records) == 2:
        debit, credit = records if records[0][0] == "debited" else (records[1], records[0])
        return (debit[0] == "debited" and credit[0] == "credited"
                and credit[3:7] == (debit[4], debit[3], debit[5], debit[6]))
    if len(records) == 3:
        by_kind = {record[0]: record for record in records}
        debit, refusal, refund = by_kind.get("debited"), by_kind.get("refused"), by_kind.get("refunded")
        return (debit is not None and refusal is not None and refund is not None and refusal[3] == debit[4]
                and refund[3:7] == debit[3:7] and refund[7] == refusal[7])
    return False


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
        return {"transaction_id": self.transaction_id, "from_account": self.from_account,
                "to_account": self.to_account, "amount": self.amount, "currency": self.currency,
                "debit_partition": self.debited_at[0], "debit_offset": self.debited_at[1],
                "state": "refund pending" if self.refused_reason else "credit pending",
                "refused_reason": self.refused_reason}


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    currency: str
    accounts: int
    deposited_minor: int
    withdrawn_minor: int
    balances_minor: int  # the balances the events state (each account's latest)
    in_flight_minor: int  # debited and not yet credited or refunded (the transfers listed)

    @property
    def created_minor(self) -> int:
        """Money the log makes out of nothing (negative: money it loses); 0 when conservation holds."""
        return self.balances_minor + self.in_flight_minor - (self.deposited_minor - self.withdrawn_minor)

    def to_json(self) -> dict:
        fmt = lambda minor: format_amount(minor, self.currency)  # noqa: E731
        return {"currency": self.currency, "accounts": self.accounts, "deposited": fmt(self.deposited_minor),
                "withdrawn": fmt(self.withdrawn_minor), "balances": fmt(self.balances_minor),
                "in_flight": fmt(self.in_flight_minor), "created": fmt(self.created_minor),
                "holds": self.created_minor == 0}


@dataclass(slots=True)
class ReplayPart:
    """The findings and loose ends of a replay of some partitions (see LedgerReplay.summary)."""
    violations: list[Violation]
    states: dict[int, State]
    flows: dict[str, list[int]]
    misstated_minor: dict[str, int]
    open_transfers: dict[RequestKey, list[tuple]]
    unanswered: dict[RequestKey, list]
    answer_flags: bytes  # per indexed answer, in index order: 2 = decided by an event, 1 = transfer settled
    events_replayed: int
    snapshots_compared: int


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """A state to compare with the fold: a processor's state dump or the read model, for one partition."""
    kind: str  # "state_dump" | "read_model"
    source: str  # file name or database URL, for messages
    partition: int
    events_offset: int  # the snapshot is the fold of the events at offsets below this
    accounts: dict[str, dict]  # account id -> {"currency", "kind", "status", "balance", "seq"}


def account_view(account: Account) -> dict:
    """An account as state dumps and the read model show it."""
    return {"currency": account.currency, "kind": account.kind, "status": account.status,
            "balance": format_amount(account.balance_minor, account.currency), "seq": account.seq}


def accounts_view(state: State) -> dict[str, dict]:
    return {account_id: account_view(account) for account_id, account in sorted(state.accounts.items())}


_decode_event = msgspec.json.Decoder(Event).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, TypeError)  # TypeError: a record without a value
_SUCCESS: Answer = (SUCCESS, None)
# The answer on wallet.outcomes each kind of event implies for its request (None: none of its own).
_ANSWER_OF = {AccountOpened: _SUCCESS, Deposited: _SUCCESS, Withdrawn: _SUCCESS, AccountFrozen: _SUCCESS,
              AccountUnfrozen: _SUCCESS, AccountClosed: _SUCCESS, TransferCredited: _SUCCESS, TransferDebited: None}
_MONEY_EVENTS = frozenset({Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded})
_TRANSFER_EVENTS = frozenset({TransferDebited, TransferCredited, TransferRefunded})


class LedgerReplay:
    """Folds wallet.events partition by partition and checks it against wallet.outcomes.

    Use: `index_outcomes`, then `replay`, then `finish`.
    """

    def __init__(self, events_topic: str, outcomes_topic: str, partition_count: int) -> None:
        self.events_topic = events_topic
        self.outcomes_topic = outcomes_topic
        self.partition_count = partition_count
        self.violations: list[Violation] = []
        self.states: dict[int, State] = {}
        self.events_replayed = 0
        self.outcomes_indexed = 0
        self.snapshots_compared = 0
        self.explained_by_later_events = 0
        # Per request answered on wallet.outcomes: [first answer, its location, whether an event
        # decided that answer, other answers {answer: location} or None, whether it is a transfer
        # whose debit and legs have all been seen and agree].
        self._answered: dict[RequestKey, list] = {}
        # Per request whose events decide an answer that is not the first one on wallet.outcomes
        # (or that has none there): [partition, offset, account, {answers}] of its first such event.
        self._unanswered: dict[RequestKey, list] = {}
        # Transfers not (yet) settled cleanly: request -> its records (see Transfer). A transfer
        # whose debit and settling legs have all been seen and agree leaves at once (its answer's
        # entry remembers it), so this holds the transfers in flight and the anomalies only.
        self._open_transfers: dict[RequestKey, list[tuple]] = {}
        self._flows: dict[str, list[int]] = {}  # currency -> [deposited, withdrawn] in minor units
        # account -> (stated balance - balance the amounts give), for accounts whose latest
        # money event states a balance that does not follow
        self._misstated_minor: dict[str, int] = {}
        # partition -> account -> its record key; per partition so that an account whose
        # events appear on two partitions is noticed on each.
        self._keys_by_partition: dict[int, dict[str, bytes]] = {}
        # request -> event class -> first such event written after the snapshot; read only
        # if a finding needs it (see `_later_event`)
        self._later: dict[RequestKey, dict[type, object]] | None = None
        self._read_later_events: Callable[[], Iterable[bytes | None]] | None = None

    # -- wallet.outcomes -----------------------------------------------------------------------

    def index_outcomes(self, logs: Iterable[PartitionLog], on_progress: Callable[[int], None] | None = None) -> None:
        """Indexes every answer on wallet.outcomes by the request it answers. Call first: the
        replay then matches each decision event with its answer as it folds."""
        answered = self._answered
        for log in logs:
            partition, offsets, keys, values = log.partition, log.offsets, log.keys, log.values
            for index in range(len(log)):
                try:
                    outcome = decode_outcome(values[index])
                except SchemaError as error:
                    self._violation(Kind.UNDECODABLE_OUTCOME, str(error), partition, offsets[index],
                                    topic=self.outcomes_topic)
                    continue
                transaction_id = outcome.transaction_id
                if outcome.reason in _DEAD_LETTER_REASONS:
                    continue  # the answer to a record nobody could decide: no decision event by design
                if keys[index] != transaction_id.encode():
                    self._violation(Kind.MISKEYED_OUTCOME, f"record key {keys[index]!r} is not the outcome's "
                                    f"transaction id", partition, offsets[index], topic=self.outcomes_topic,
                                    transaction_id=transaction_id)
                key = (transaction_id, outcome.digest)
                answer = (outcome.status, outcome.reason)
                entry = answered.get(key)
                if entry is None:
                    answered[key] = [answer, (partition, offsets[index]), False, None, False]
                elif answer != entry[0]:
                    others = entry[3]
                    if others is None:
                        others = entry[3] = {}
                    others.setdefault(answer, (partition, offsets[index]))
            self.outcomes_indexed += len(log)
            if on_progress is not None:
                on_progress(len(log))

    # -- wallet.events -------------------------------------------------------------------------

    def replay(self, logs: dict[int, PartitionLog], snapshots: Iterable[StateSnapshot] = (),
               on_progress: Callable[[int], None] | None = None) -> None:
        """Folds every partition's events, comparing the fold with each snapshot at its offset.

        The partitions advance together, a slice of each in turn: the two sides of a transfer
        are then replayed close together, so the transfers waiting for their other side stay
        few, and their table small enough to stay in the processor's cache.
        """
        cursors = []
        for number, log in sorted(logs.items()):
            cuts = sorted((bisect.bisect_left(log.offsets, snapshot.events_offset), order, snapshot)
                          for order, snapshot in enumerate(snapshots) if snapshot.partition == number)
            # Without the memory (cleared below): refunds are checked against debits by the
            # transfer checks here, not by the fold's pairing with its pending debit.
            cursors.append([log, self.states.setdefault(number, State(tracks_memory=False)), 0, cuts])
        while cursors:
            for cursor in list(cursors):
                log, state, position, cuts = cursor
                while cuts and cuts[0][0] == position:
                    self._compare_snapshot(cuts.pop(0)[2], state, log.end_offset)
                if position == len(log):
                    cursors.remove(cursor)
                    continue
                stop = min(position + INTERLEAVE_SLICE_RECORDS, len(log), cuts[0][0] if cuts else len(log))
                self._replay_chunk(log, state, position, stop)
                cursor[2] = stop
                # The audit compares accounts only; the idempotency memory the fold keeps would
                # grow with the log and make the fold's periodic eviction scans ever longer.
                state.memory.clear()
                if on_progress is not None:
                    on_progress(stop - position)

    def _replay_chunk(self, log: PartitionLog, state: State, start: int, stop: int) -> None:
        # The hot loop of the audit. The common path (a well-formed event that follows) costs one
        # decode, one fold and one or two lookups; everything unusual is out of line.
        partition = log.partition
        offsets, keys, values = log.offsets, log.keys, log.values
        accounts = state.accounts
        account_keys = self._keys_by_partition.setdefault(partition, {})
        answered = self._answered
        open_transfers = self._open_transfers
        misstated = self._misstated_minor
        flows = self._flows
        answer_of = _ANSWER_OF
        money_events = _MONEY_EVENTS
        transfer_events = _TRANSFER_EVENTS
        # The decoder itself rather than codec.decode_event: one Python call less per event.
        decode, decode_errors = _decode_event, _DECODE_ERRORS
        for index in range(start, stop):
            try:
                event = decode(values[index])
            except decode_errors as error:
                self._violation(Kind.UNDECODABLE_EVENT, f"not a valid event: {error}", partition, offsets[index])
                continue
            event_class = type(event)
            account_id = event.account_id
            expected_key = account_keys.get(account_id)
            if expected_key is None:
                expected_key = account_keys[account_id] = self._first_sight(account_id, partition, offsets[index],
                                                                            event)
            if keys[index] != expected_key:
                self._violation(Kind.MISROUTED_EVENT, f"record key {keys[index]!r} is not the event's account",
                                partition, offsets[index], event)

            if event_class is CommandRejected:
                # Not folded: a decision event changes no account; the fold would only remember
                # its answer for retries, and the audit compares accounts, not that memory.
                # A refused credit leg is answered by the refund on the sender's side, not here.
                answer = None if event.command == "credit_leg" else (FAILURE, event.reason)
            else:
                account = accounts.get(account_id)
                if account is None or event.seq != account.seq + 1 or event_class is AccountOpened:
                    if not self._sequence_ok(state, event, partition, offsets[index]):
                        continue  # not folded: named as a violation
                    account = accounts.get(account_id)  # None until an account_opened is folded
                balance_before_minor = account.balance_minor if account is not None else 0
                try:
                    fold(state, event)
                except (CorruptLog, ValueError, KeyError) as error:
                    self._violation(Kind.BALANCE_MISMATCH, str(error), partition, offsets[index], event)
                    self._fold_by_amount(state, event)
                else:
                    if misstated and event_class in money_events:
                        misstated.pop(account_id, None)  # this event states a balance that follows again
                if account is None:
                    account = accounts[account_id]
                currency = account.currency
                amount_minor = abs(account.balance_minor - balance_before_minor)
                if event_class is Deposited or event_class is Withdrawn:
                    flow = flows.get(currency)
                    if flow is None:
                        flow = flows[currency] = [0, 0]
                    flow[1 if event_class is Withdrawn else 0] += amount_minor
                answer = answer_of[event_class] if event_class is not TransferRefunded else (FAILURE, event.reason)

            key = (event.transaction_id, event.digest)
            entry = None
            if answer is not None:
                entry = answered.get(key)
                if entry is not None and entry[0] == answer:
                    entry[2] = True
                else:
                    self._decided_unanswered(key, answer, partition, offsets[index], account_id)
            if answer is None or event_class in transfer_events:
                if event_class is TransferDebited:
                    record = ("debited", partition, offsets[index], account_id, event.to_account, amount_minor,
                              currency, None)
                elif event_class is TransferCredited:
                    record = ("credited", partition, offsets[index], account_id, event.from_account, amount_minor,
                              currency, None)
                elif event_class is TransferRefunded:
                    record = ("refunded", partition, offsets[index], account_id, event.to_account, amount_minor,
                              currency, event.reason)
                else:
                    record = ("refused", partition, offsets[index], account_id, None, 0, None, event.reason)
                records = open_transfers.get(key)
                if records is None:
                    open_transfers[key] = [record]
                else:
                    records.append(record)
                    if _settled_cleanly(records):
                        self._settle(key, records, entry)
        self.events_replayed += stop - start

    def _settle(self, key: RequestKey, records: list[tuple], entry: list | None) -> None:
        """Drops a transfer whose debit and legs have all been seen and agree; its answer's entry
        remembers it, so that anything more of the same request is seen as what it is."""
        del self._open_transfers[key]
        if entry is None:
            entry = self._answered.get(key)
        if entry is None:
            return  # unanswered: named as a decision without outcome
        if entry[4]:
            debit = next(record for record in records if record[0] == "debited")
            self._violation(Kind.DEBITED_TWICE, "the whole transfer, debit and legs, is in the log twice",
                            *debit[1:3], account_id=debit[3], transaction_id=key[0])
        entry[4] = True

    def _after_settlement(self, key: RequestKey, records: list[tuple]) -> None:
        """Records of a transfer whose debit and legs had all been seen already."""
        for kind, partition, offset, account_id, *_ in records:
            self._violation(Kind.DEBITED_TWICE if kind == "debited" else Kind.SETTLED_TWICE,
                            f"{_LEG_NAMES.get(kind, 'transfer_debited')} of a transfer already debited and settled",
                            partition, offset, account_id=account_id, transaction_id=key[0])

    def _decided_unanswered(self, key: RequestKey, answer: Answer, partition: int, offset: int,
                            account_id: str) -> None:
        entry = self._unanswered.get(key)
        if entry is None:
            self._unanswered[key] = [partition, offset, account_id, {answer}]
        else:
            entry[3].add(answer)

    def _sequence_ok(self, state: State, event, partition: int, offset: int) -> bool:
        """Checks an event that opens an account or does not follow its account's last seq.
        Returns whether to fold it; resynchronises the account's seq after a gap so that the
        events after it are checked against what they claim to follow."""
        account = state.accounts.get(event.account_id)
        seq = event.seq
        if account is None:
            if type(event) is not AccountOpened:
                self._violation(Kind.EVENT_BEFORE_OPEN, f"{event_type(event)} seq {seq} for an account with no "
                                f"account_opened before it", partition, offset, event)
                return False
            if event.currency not in MINOR_UNITS:
                self._violation(Kind.EVENT_BEFORE_OPEN, f"account_opened in unknown currency {event.currency!r}: "
                                f"the account's events cannot be folded", partition, offset, event)
                return False
            if seq != 1:
                self._violation(Kind.SEQ_GAP, f"account_opened has seq {seq}, expected 1", partition, offset, event)
                state.accounts[event.account_id] = Account(event.currency, event.kind, ACTIVE, 0, seq)
                return False  # opened by hand: the fold refuses an opening that is not seq 1
            return True
        if seq <= account.seq:
            self._violation(Kind.SEQ_REPEATED, f"seq {seq} again after seq {account.seq}: a duplicate or replayed "
                            f"event (not folded)", partition, offset, event)
            return False
        if type(event) is AccountOpened:
            self._violation(Kind.ACCOUNT_REOPENED, f"account_opened at seq {seq} for an account already open "
                            f"(not folded)", partition, offset, event)
            account.seq = seq
            return False
        if seq != account.seq + 1:
            self._violation(Kind.SEQ_GAP, f"seq {seq} follows seq {account.seq}: {seq - account.seq - 1} event(s) "
                            f"missing", partition, offset, event)
            account.seq = seq - 1
        return True

    def _first_sight(self, account_id: str, partition: int, offset: int, event) -> bytes:
        owner = partition_for(account_id, self.partition_count)
        if owner != partition:
            self._violation(Kind.MISROUTED_EVENT, f"account {account_id!r} belongs to partition {owner}, but its "
                            f"events are on partition {partition}", partition, offset, event)
        return account_id.encode()

    def _fold_by_amount(self, state: State, event) -> None:
        """Applies an event the fold refused, moving the balance by the event's amount, so the
        replay continues from the balance the log's amounts give (never the stated one)."""
        event_class = type(event)
        account = state.accounts.get(event.account_id)
        if account is None:  # an opening the fold refused (say, with a balance): opened empty
            state.accounts[event.account_id] = Account(event.currency, event.kind, ACTIVE, 0, event.seq)
            return
        account.seq = event.seq
        if event_class in BALANCE_SIGN:
            try:
                amount_minor = canonical_minor(event.amount, account.currency) if event.currency == account.currency else 0
                stated_minor = canonical_balance_minor(event.balance, account.currency)
            except (ValueError, KeyError):
                amount_minor, stated_minor = 0, None
            account.balance_minor += BALANCE_SIGN[event_class] * amount_minor
            if stated_minor is not None and stated_minor != account.balance_minor:
                self._misstated_minor[event.account_id] = stated_minor - account.balance_minor
            else:
                self._misstated_minor.pop(event.account_id, None)
        elif event_class in STATUS_AFTER:
            account.status = STATUS_AFTER[event_class]

    def _compare_snapshot(self, snapshot: StateSnapshot, state: State, log_end_offset: int) -> None:
        self.snapshots_compared += 1
        if snapshot.events_offset > log_end_offset:
            self._violation(Kind.SNAPSHOT_AHEAD, f"{snapshot.source}, partition {snapshot.partition} at events offset "
                            f"{snapshot.events_offset}: the log of this partition ends at {log_end_offset}; a state "
                            f"must never be ahead of what Kafka committed", snapshot.partition, snapshot.events_offset)
            return
        self.violations.extend(compare_accounts(snapshot, accounts_view(state), self.events_topic))

    # -- replaying in several processes -------------------------------------------------------

    def summary(self) -> ReplayPart:
        """What `replay` found, to send from a worker process that replayed some partitions
        (with an index of outcomes inherited from its parent) back to the parent."""
        flags = bytes((2 if entry[2] else 0) | (1 if entry[4] else 0) for entry in self._answered.values())
        return ReplayPart(self.violations, self.states, self._flows, self._misstated_minor, self._open_transfers,
                          self._unanswered, flags, self.events_replayed, self.snapshots_compared)

    def absorb(self, part: ReplayPart) -> None:
        """Adds what a worker's `summary` holds, as if this replay had replayed its partitions."""
        self.violations += part.violations
        self.states.update(part.states)
        for currency, (deposited_minor, withdrawn_minor) in part.flows.items():
            flow = self._flows.setdefault(currency, [0, 0])
            flow[0] += deposited_minor
            flow[1] += withdrawn_minor
        self._misstated_minor.update(part.misstated_minor)
        for key, (partition, offset, account_id, answers) in part.unanswered.items():
            entry = self._unanswered.get(key)
            if entry is None:
                self._unanswered[key] = [partition, offset, account_id, answers]
            else:
                entry[3] |= answers
                if (partition, offset) < (entry[0], entry[1]):
                    entry[:3] = [partition, offset, account_id]
        for entry, flag in zip(self._answered.values(), part.answer_flags):
            entry[2] = entry[2] or bool(flag & 2)
            entry[4] = entry[4] or bool(flag & 1)
        for key, records in part.open_transfers.items():
            held = self._open_transfers.get(key)
            if held is None:
                self._open_transfers[key] = records
            else:
                held += records
                if _settled_cleanly(held):
                    self._settle(key, held, None)
        self.events_replayed += part.events_replayed
        self.snapshots_compared += part.snapshots_compared

    # -- events written after a partition was read ---------------------------------------------

    def _later_event(self, key: RequestKey, *event_classes: type):
        """The first event of `event_classes` for request `key` written after the snapshot, or None.

        Partitions are read one after another, so on a live log a credit can be in the snapshot
        while its debit, committed a moment later on a partition read earlier, is not. A finding
        that names such a missing event stands only if the event is not in what was written
        since; that is read once, on the first such finding.
        """
        if self._later is None:
            self._later = {}
            for value in self._read_later_events() if self._read_later_events is not None else ():
                try:
                    event = decode_event(value)
                except SchemaError:
                    continue  # not part of the snapshot: whoever audits next will judge it
                self._later.setdefault((event.transaction_id, event.digest), {}).setdefault(type(event), event)
        found = self._later.get(key)
        if found is not None:
            for event_class in event_classes:
                if event_class in found:
                    self.explained_by_later_events += 1
                    return found[event_class]
        return None

    # -- across partitions ---------------------------------------------------------------------

    def finish(self, settled: bool, read_later_events: Callable[[], Iterable[bytes | None]] | None = None
               ) -> tuple[list[InFlight], list[CurrencyTotals]]:
        """The transfer, answer and conservation checks; returns the in-flight transfers and the
        totals per currency.

        `settled`: the pipeline has been drained, so a transfer still in flight is a violation.
        `read_later_events`: gives the events written to the topic since the snapshot (called at
        most once, only when a finding could be explained by one of them).
        """
        self._read_later_events = read_later_events
        in_flight: list[InFlight] = []
        in_flight_minor: dict[str, int] = {}
        for key, records in self._open_transfers.items():
            answered = self._answered.get(key)
            if answered is not None and answered[4]:
                self._after_settlement(key, records)
                continue
            transfer = Transfer(records)
            contribution_minor = self._check_transfer(key, transfer)
            if contribution_minor:
                in_flight_minor[transfer.currency] = in_flight_minor.get(transfer.currency, 0) + contribution_minor
            if transfer.debited_at is None or transfer.settlements:
                continue
            refused = transfer.first("refused")
            flying = InFlight(key[0], transfer.from_account, transfer.to_account,
                              format_amount(transfer.amount_minor, transfer.currency), transfer.currency,
                              transfer.debited_at, refused[6] if refused else None)
            in_flight.append(flying)
            if settled:
                self._violation(Kind.IN_FLIGHT_WHEN_SETTLED, f"{flying.amount} {flying.currency} from "
                                f"{flying.from_account} to {flying.to_account} is still in flight "
                                f"({'refund' if flying.refused_reason else 'credit'} pending) after the pipeline "
                                f"was drained", *transfer.debited_at, account_id=transfer.from_account,
                                transaction_id=key[0])
        in_flight.sort(key=lambda flying: flying.debited_at)
        self._check_answers()
        return in_flight, self._conservation(in_flight_minor)

    def _check_transfer(self, key: RequestKey, transfer: Transfer) -> int:
        """Checks one transfer that did not settle cleanly; returns what it adds to the money in
        flight in this snapshot."""
        tid, digest = key
        settlements = transfer.settlements
        refused = transfer.first("refused")
        if transfer.debited_at is None:
            late_debit = self._later_event(key, TransferDebited)
            if late_debit is None:
                for leg_kind, location, account_id, *_ in transfer.legs:
                    kind = {"credited": Kind.CREDIT_WITHOUT_DEBIT, "refunded": Kind.REFUND_WITHOUT_DEBIT,
                            "refused": Kind.REFUSAL_WITHOUT_DEBIT}[leg_kind]
                    self._violation(kind, f"{_LEG_NAMES[leg_kind]} of a transfer that no transfer_debited "
                                    f"(digest {digest}) started", *location, account_id=account_id,
                                    transaction_id=tid)
                return 0  # its legs' money came from nowhere: conservation shows it
            # Debited after its partition was read, settled on a partition read later: in this
            # cut the money arrived before it left, which the in-flight sum must offset.
            transfer.from_account, transfer.to_account = late_debit.account_id, late_debit.to_account
            transfer.currency = late_debit.currency
            try:
                transfer.amount_minor = canonical_minor(late_debit.amount, late_debit.currency)
            except (ValueError, KeyError):
                transfer.amount_minor = 0
            contribution_minor = -transfer.amount_minor if settlements else 0
            where = "the debit written after its partition was read"
        else:
            contribution_minor = 0 if settlements else transfer.amount_minor
            where = f"the debit at partition {transfer.debited_at[0]} offset {transfer.debited_at[1]}"
        for location in transfer.extra_debits:
            self._violation(Kind.DEBITED_TWICE, f"transfer debited again ({where})", *location,
                            account_id=transfer.from_account, transaction_id=tid)
        if len(settlements) > 1 or (refused is not None and transfer.first("credited") is not None):
            leg_kind, location, account_id, *_ = settlements[-1]
            self._violation(Kind.SETTLED_TWICE, f"{_LEG_NAMES[leg_kind]} of a transfer already "
                            f"{'refused' if refused else 'settled'} (legs: "
                            f"{', '.join(leg[0] for leg in transfer.legs)})", *location, account_id=account_id,
                            transaction_id=tid)
        for leg_kind, location, account_id, counterpart, amount_minor, currency, reason in transfer.legs:
            expected_account = transfer.from_account if leg_kind == "refunded" else transfer.to_account
            expected_counterpart = transfer.to_account if leg_kind == "refunded" else transfer.from_account
            differences = []
            if account_id != expected_account:
                differences.append(f"account {account_id!r} instead of {expected_account!r}")
            if leg_kind != "refused":
                if counterpart != expected_counterpart:
                    differences.append(f"counterpart {counterpart!r} instead of {expected_counterpart!r}")
                if (amount_minor, currency) != (transfer.amount_minor, transfer.currency):
                    differences.append(f"{format_amount(amount_minor, currency)} {currency} instead of "
                                       f"{format_amount(transfer.amount_minor, transfer.currency)} {transfer.currency}")
            if leg_kind == "refunded" and refused is not None and reason != refused[6]:
                differences.append(f"reason {reason!r} but the receiver refused with {refused[6]!r}")
            if differences:
                self._violation(Kind.LEG_MISMATCH, f"{_LEG_NAMES[leg_kind]} does not match {where}: "
                                + "; ".join(differences), *location, account_id=account_id, transaction_id=tid)
        refund = transfer.first("refunded")
        if refund is not None and refused is None and self._later_event(key, CommandRejected) is None:
            self._violation(Kind.REFUND_WITHOUT_REFUSAL, f"refund of a transfer whose credit leg was never refused "
                            f"by {transfer.to_account!r}", *refund[1], account_id=transfer.from_account,
                            transaction_id=tid)
        return contribution_minor

    def _check_answers(self) -> None:
        """Every decision has exactly one answer on wallet.outcomes, and every answer its decision.

        Read order makes this exact on a live log: the outcomes are read after the events, and
        an answer is committed in the same transaction as its decision, so every decision in
        the snapshot has its answer in what was read; an answer may be newer than the snapshot,
        and only then can its decision be missing from it.
        """
        unanswered = self._unanswered
        for key, (answer, location, decided, others, _) in self._answered.items():
            if decided and others is None and key not in unanswered:
                continue  # the common case: one answer, and the request's events decide it
            transaction_id = key[0]
            given = {answer: location, **(others or {})}
            first = min(given.values())
            decided_answers = ({answer} if decided else set()) | (unanswered[key][3] if key in unanswered else set())
            if not decided_answers:
                records = self._open_transfers.get(key, ())
                debit = next((record for record in records if record[0] == "debited"), None)
                if debit is not None:
                    if self._later_event(key, TransferCredited, TransferRefunded) is None:
                        missing = "refund" if any(record[0] == "refused" for record in records) else "credit or refund"
                        self._violation(Kind.OUTCOME_BEFORE_SETTLEMENT, f"answer {_answers_text(given)} for a "
                                        f"transfer whose debit at partition {debit[1]} offset {debit[2]} has no "
                                        f"{missing} in the log", *first, topic=self.outcomes_topic,
                                        account_id=debit[3], transaction_id=transaction_id)
                elif self._later_event(key, *_ANY_EVENT) is None:
                    self._violation(Kind.OUTCOME_WITHOUT_DECISION, f"answer {_answers_text(given)} (digest {key[1]}) "
                                    f"has no decision event in {self.events_topic}", *first, topic=self.outcomes_topic,
                                    transaction_id=transaction_id)
                continue
            if set(given) != decided_answers:
                undecided = [location for answer, location in given.items() if answer not in decided_answers]
                self._violation(Kind.OUTCOME_MISMATCH, f"answered {_answers_text(given)} but the log's events decide "
                                f"{_answers_text(decided_answers)}", *min(undecided or [first]),
                                topic=self.outcomes_topic, transaction_id=transaction_id)
            elif len(given) > 1:
                self._violation(Kind.OUTCOME_CONFLICT, f"{len(given)} different answers to one request: "
                                f"{_answers_text(given)}", *first, topic=self.outcomes_topic,
                                transaction_id=transaction_id)
        for key, (partition, offset, account_id, answers) in unanswered.items():
            if key not in self._answered:
                self._violation(Kind.DECISION_WITHOUT_OUTCOME, f"decided {_answers_text(answers)} but "
                                f"{self.outcomes_topic} has no answer with digest {key[1]}", partition, offset,
                                account_id=account_id, transaction_id=key[0])

    def _conservation(self, in_flight_minor: dict[str, int]) -> list[CurrencyTotals]:
        balances_minor: dict[str, int] = {}
        account_counts: dict[str, int] = {}
        for state in self.states.values():
            for account_id, account in state.accounts.items():
                stated_minor = account.balance_minor + self._misstated_minor.get(account_id, 0)
                balances_minor[account.currency] = balances_minor.get(account.currency, 0) + stated_minor
                account_counts[account.currency] = account_counts.get(account.currency, 0) + 1
        totals = []
        for currency in sorted(set(balances_minor) | set(self._flows)):
            deposited, withdrawn = self._flows.get(currency, (0, 0))
            row = CurrencyTotals(currency, account_counts.get(currency, 0), deposited, withdrawn,
                                 balances_minor.get(currency, 0), in_flight_minor.get(currency, 0))
            totals.append(row)
            if row.created_minor:
                fmt = lambda minor: format_amount(minor, currency)  # noqa: E731
                self._violation(Kind.CONSERVATION, f"{currency}: balances {fmt(row.balances_minor)} + in flight "
                                f"{fmt(row.in_flight_minor)} != deposited {fmt(deposited)} - withdrawn "
                                f"{fmt(withdrawn)}: {fmt(abs(row.created_minor))} "
                                f"{'created' if row.created_minor > 0 else 'destroyed'}")
        return totals

    def _violation(self, kind: str, message: str, partition: int | None = None, offset: int | None = None,
                   event=None, *, topic: str | None = None, account_id: str | None = None,
                   transaction_id: str | None = None) -> None:
        if event is not None:
            account_id = account_id or event.account_id
            transaction_id = transaction_id or event.transaction_id
        self.violations.append(Violation(kind, message, topic or self.events_topic, partition, offset, account_id,
                                         transaction_id))


_ANY_EVENT = (AccountOpened, Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded, AccountFrozen,
              AccountUnfrozen, AccountClosed, CommandRejected)
_LEG_NAMES = {"credited": "transfer_credited", "refunded": "transfer_refunded",
              "refused": "command_rejected of the credit leg"}


def _answer_text(answer: Answer) -> str:
    status, reason = answer
    return status if reason is None else f"{status}/{reason}"


def _answers_text(answers: Iterable[Answer]) -> str:
    return ", ".join(sorted(_answer_text(answer) for answer in answers))


def compare_accounts(snapshot: StateSnapshot, folded: dict[str, dict], events_topic: str) -> list[Violation]:
    """One violation per account where `snapshot` differs from the fold of the log at its offset."""
    kind = Kind.snapshot_mismatch(snapshot.kind)
    where = f"{snapshot.source}, partition {snapshot.partition} at events offset {snapshot.events_offset}"
    violations = []
    for account_id in sorted(set(folded) | set(snapshot.accounts)):
        mine, theirs = folded.get(account_id), snapshot.accounts.get(account_id)
        if mine == theirs:
            continue
        if theirs is None:
            detail = f"account missing; the log has {mine}"
        elif mine is None:
            detail = f"account {theirs} that the log never opened"
        else:
            detail = "; ".join(f"{name} {theirs.get(name)!r}, the log gives {mine[name]!r}"
                               for name in mine if theirs.get(name) != mine[name])
        violations.append(Violation(kind, f"{where}: {detail}", events_topic, snapshot.partition,
                                    snapshot.events_offset, account_id))
    return violations


# -- determinism: wallet.commands -> wallet.events ------------------------------------------------

@dataclass(slots=True)
class DeterminismResult:
    commands_replayed: int = 0
    events_reproduced: int = 0
    commands_dead_lettered: int = 0  # undecodable or misrouted: the processor sends them to the DLQ
    commands_pending: int = 0  # from the first command whose events are not in the log yet
    pending: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset) of each first one
    violations: list[Violation] = field(default_factory=list)

    def violations_in(self, partition: int) -> bool:
        return any(violation.partition == partition for violation in self.violations
                   if violation.kind in (Kind.NONDETERMINISTIC, Kind.CORE_ERROR))

    def absorb(self, other: DeterminismResult) -> None:
        """Adds the result of other partitions (checked in another process)."""
        self.commands_replayed += other.commands_replayed
        self.events_reproduced += other.events_reproduced
        self.commands_dead_lettered += other.commands_dead_lettered
        self.commands_pending += other.commands_pending
        self.pending += other.pending
        self.violations += other.violations


def check_determinism(commands: PartitionLog, events: PartitionLog, partition_count: int, commands_topic: str,
                      events_topic: str, dead_lettered: set[tuple[int, int]], result: DeterminismResult, *,
                      settled: bool, on_progress: Callable[[int], None] | None = None, keyring=None) -> None:
    """Re-decides one partition's commands with the core from an empty state and compares each
    event, encoded, with the log's event at the same position of the same partition.

    Each command is decided at its record's timestamp (LogAppendTime), as the processor did; a
    saga leg must verify with `keyring` (the processors' leg keys) first, and a leg that does
    not, or that the core cannot decide (UndecidableInput), belongs in the DLQ. Without a
    keyring every leg is taken as verified.

    Stops at the first difference: from there on the replayed state has diverged from the
    processor's and every later comparison would only repeat the finding. `dead_lettered` holds
    (partition, offset) of every command the DLQ names as its source; a record the processor
    cannot decide must be there once a later command of its partition has been decided (or,
    when `settled`, in any case).
    """
    partition = commands.partition
    state = State()
    event_values, event_offsets = events.values, events.offsets
    event_count = len(event_values)
    position = 0
    owner_partition: dict[str, int] = {}
    values, offsets, timestamps = commands.values, commands.offsets, commands.timestamps
    reported = 0
    undelivered: list[Violation] = []
    decided_offset = -1  # of the last command whose events are in the log
    for index in range(len(values)):
        if on_progress is not None and index - reported >= PROGRESS_CHUNK_RECORDS:
            on_progress(index - reported)
            reported = index
        offset = offsets[index]
        try:
            command = decode_command(values[index])
            owner = owner_account(command)
            owner_here = owner_partition.get(owner)
            if owner_here is None:
                owner_here = owner_partition[owner] = partition_for(owner, partition_count)
            if owner_here != partition:
                raise SchemaError(f"command for account {owner!r} (partition {owner_here}) on partition {partition}")
            if keyring is not None and type(command) in LEG_COMMANDS:
                refused = keyring.verify(command)
                if refused is not None:
                    raise SchemaError(refused)
            decision = apply(state, command, timestamps[index])
        except (SchemaError, UndecidableInput) as error:
            result.commands_dead_lettered += 1
            if (partition, offset) not in dead_lettered:
                undelivered.append(Violation(Kind.NOT_DEAD_LETTERED, f"the processor cannot decide this record "
                                             f"({error}) and the DLQ has no record of it", commands_topic, partition,
                                             offset))
            continue
        except Exception as error:  # noqa: BLE001 - any failure of the core on a logged command is a finding
            result.violations.append(Violation(Kind.CORE_ERROR, f"the core raised {type(error).__name__}: {error}",
                                               commands_topic, partition, offset, owner, command.transaction_id))
            break
        if position == event_count and decision.events:
            # The log ends before this command's events: it and what follows are not processed yet.
            result.pending.append((partition, offset))
            result.commands_pending += len(values) - index
            break
        result.commands_replayed += 1
        mismatch = _first_difference(decision.events, event_values, position)
        if mismatch is not None:
            at, event, logged = mismatch
            at_offset = event_offsets[at] if at < event_count else events.end_offset
            result.violations.append(Violation(
                Kind.NONDETERMINISTIC, f"command at {commands_topic} offset {offset} decides {encode(event).decode()} "
                f"but the log has {_describe_logged(logged)}", events_topic, partition, at_offset, event.account_id,
                event.transaction_id))
            break
        if decision.events:
            decided_offset = offset
        position += len(decision.events)
    if on_progress is not None:
        on_progress(len(values) - reported)
    result.events_reproduced += position
    result.violations += [violation for violation in undelivered if settled or violation.offset < decided_offset]
    if position < event_count and not result.violations_in(partition):
        event = _decoded_or_none(event_values[position])
        result.violations.append(Violation(
            Kind.EXTRA_EVENT, f"no command of {commands_topic} partition {partition} decides this event "
            f"({_describe_logged(event_values[position])}); the replay of all {len(values)} commands ends before it",
            events_topic, partition, event_offsets[position], event.account_id if event else None,
            event.transaction_id if event else None))


def _first_difference(decided: list, logged_values: list, position: int):
    """(position, decided event, logged value or None) of the first decided event that is not
    the logged one at its position, or None. A command's events are committed together, so
    the log ending in the middle of them is a difference too (a missing event)."""
    for event in decided:
        logged = logged_values[position] if position < len(logged_values) else None
        if logged is None or encode(event) != logged:
            return position, event, logged
        position += 1
    return None


def _decoded_or_none(value: bytes | None):
    try:
        return decode_event(value)
    except SchemaError:
        return None


def _describe_logged(value: bytes | None) -> str:
    return "nothing" if value is None else value.decode(errors="replace")
