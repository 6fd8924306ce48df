"""Ledger replay: fold wallet.events partition by partition and prove what the events say.

Nothing here does I/O. The records come as `PartitionLog`s (parallel lists of offsets, keys
and values, see log_reader.py); the replay decodes them with msgspec and folds them with the
core's `fold`, the same function the processors and the read model use, so "fold(events) ==
live state" compares like with like.

What is proved here, and where:
- every account's events carry seq 1, 2, 3, ... (no gap, no repeat) and each money event's
  balance is the previous balance moved by its amount (the core's fold refuses anything else);
- every transfer's legs agree with its debit, each debit is settled at most once, and the
  money between debit and settlement is listed as in flight (transfers.py); a hold's capture
  is a debit like a transfer's, settled by the same legs;
- no hold is captured beyond what it held, or changed after it ended (holds.py);
- conservation per currency, on the balances the events state (conservation.py);
- every decision in the log has exactly one answer on wallet.outcomes and every answer has
  its decision (answers.py);
- the fold at a snapshot's offset equals that snapshot (snapshots.py).
Re-deciding wallet.commands is determinism.py's.

After a violation the replay goes on with the value the log's amounts give, so that one forged
record yields one finding rather than a cascade, and every independent problem is still seen.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, cast

import msgspec

from consumers.audit.answers import AnswerEntry, UnansweredDecision, check_answers
from consumers.audit.conservation import CurrencyTotals, currency_totals
from consumers.audit.holds import HoldLedger, LoggedHold
from consumers.audit.snapshots import StateSnapshot, compare_snapshot
from consumers.audit.transfers import (
    CREDITED,
    DEBITED,
    LEG_NAMES,
    REFUNDED,
    REFUSED,
    InFlight,
    LoggedTransfer,
    TransferRecord,
    check_transfer,
    in_flight_of,
    settled_cleanly,
)
from consumers.audit.violations import Answer, Kind, RequestKey, Violation
from schemas.codec import SchemaError, decode_event, decode_outcome
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
from schemas.partitioning import partition_for
from streams.core.currencies import MINOR_UNITS
from streams.core.money import canonical_balance_minor, canonical_minor, format_amount
from streams.core.state import ACTIVE, BALANCE_SIGN, FAILURE, STATUS_AFTER, SUCCESS, Account, CorruptLog, State, fold

if TYPE_CHECKING:
    from infra.log_reader import PartitionLog

# Records of one partition replayed before the next partition's turn (see `LedgerReplay.replay`).
INTERLEAVE_SLICE_RECORDS = 1_024


class MoneyMovement(NamedTuple):
    """One event that moved money, and who asked for it: the answer to "who moved this money"."""

    partition: int
    offset: int
    type: str
    account_id: str
    transaction_id: str
    amount_minor: int  # what it moved on account_id, signed (a debit is negative)
    currency: str
    actor: str  # who asked (a leg's events carry the transfer's actor)

    def to_json(self) -> dict:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "type": self.type,
            "account_id": self.account_id,
            "transaction_id": self.transaction_id,
            "amount": format_amount(self.amount_minor, self.currency),
            "currency": self.currency,
            "actor": self.actor,
        }


@dataclass(slots=True)
class ReplayPart:
    """The findings and loose ends of a replay of some partitions (see LedgerReplay.summary)."""

    violations: list[Violation]
    states: dict[int, State]
    flows: dict[str, list[int]]
    misstated_minor: dict[str, int]
    open_transfers: dict[RequestKey, list[TransferRecord]]
    unanswered: dict[RequestKey, UnansweredDecision]
    answer_flags: bytes  # per indexed answer, in index order: 2 = decided by an event, 1 = transfer settled
    holds: dict[tuple[str, str], LoggedHold]
    events_replayed: int
    snapshots_compared: int
    movements: list[MoneyMovement] | None


class _Cut(NamedTuple):
    """Where a snapshot is compared: before the record at `position` of its partition's log."""

    position: int
    order: int  # among the snapshots given, so that cuts at one position sort without comparing snapshots
    snapshot: StateSnapshot


class _Cursor:
    """How far the replay of one partition has come, and the snapshots still ahead of it."""

    __slots__ = ("log", "state", "position", "cuts")

    def __init__(self, log: PartitionLog, state: State, cuts: list[_Cut]) -> None:
        self.log, self.state, self.position, self.cuts = log, state, 0, cuts


_decode_event = msgspec.json.Decoder(Event).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, TypeError)  # TypeError: a record without a value
_SUCCESS: Answer = (SUCCESS, None)
# The answer on wallet.outcomes each kind of event implies for its request (None: none of its own).
_ANSWER_OF: dict[type, Answer | None] = {
    AccountOpened: _SUCCESS,
    Deposited: _SUCCESS,
    Withdrawn: _SUCCESS,
    AccountFrozen: _SUCCESS,
    AccountUnfrozen: _SUCCESS,
    AccountClosed: _SUCCESS,
    TransferCredited: _SUCCESS,
    TransferDebited: None,
    HoldPlaced: _SUCCESS,
    HoldCaptured: None,  # in flight: answered by the destination's credit or the refund, as a transfer
    HoldVoided: _SUCCESS,
    HoldExpired: None,  # answers no request
}
_MONEY_EVENTS = frozenset({Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded, HoldCaptured})
# The events of a transfer's saga; a capture is its debit.
_TRANSFER_EVENTS = frozenset({TransferDebited, TransferCredited, TransferRefunded, HoldCaptured})
_HOLD_EVENTS = frozenset({HoldPlaced, HoldCaptured, HoldVoided, HoldExpired})


class LedgerReplay:
    """Folds wallet.events partition by partition and checks it against wallet.outcomes.

    Use: `index_outcomes`, then `replay`, then `finish`.
    """

    def __init__(
        self, events_topic: str, outcomes_topic: str, partition_count: int, *, record_movements: bool = False
    ) -> None:
        self.events_topic = events_topic
        self.outcomes_topic = outcomes_topic
        self.partition_count = partition_count
        self.violations: list[Violation] = []
        self.states: dict[int, State] = {}
        self.events_replayed = 0
        self.outcomes_indexed = 0
        self.snapshots_compared = 0
        self.explained_by_later_events = 0
        # Every money event with its actor, when asked for (one row per money event: the JSON
        # report's answer to who moved money).
        self.movements: list[MoneyMovement] | None = [] if record_movements else None
        # Every request answered on wallet.outcomes, in the order first answered.
        self._answered: dict[RequestKey, AnswerEntry] = {}
        # Requests whose events decide an answer that is not the first one on wallet.outcomes
        # (or that has none there).
        self._unanswered: dict[RequestKey, UnansweredDecision] = {}
        # Transfers not (yet) settled cleanly: request -> its records. A transfer whose debit
        # and settling legs have all been seen and agree leaves at once (its answer's entry
        # remembers it), so this holds the transfers in flight and the anomalies only.
        self._open_transfers: dict[RequestKey, list[TransferRecord]] = {}
        self._flows: dict[str, list[int]] = {}  # currency -> [deposited, withdrawn] in minor units
        self.holds = HoldLedger(self._violation)
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
                value = values[index]
                # wallet.outcomes has no tombstones; decoding None would raise TypeError all the same.
                assert value is not None
                try:
                    outcome = decode_outcome(value)
                except SchemaError as error:
                    self._violation(
                        Kind.UNDECODABLE_OUTCOME, str(error), partition, offsets[index], topic=self.outcomes_topic
                    )
                    continue
                transaction_id = outcome.transaction_id
                if keys[index] != transaction_id.encode():
                    self._violation(
                        Kind.MISKEYED_OUTCOME,
                        f"record key {keys[index]!r} is not the outcome's transaction id",
                        partition,
                        offsets[index],
                        topic=self.outcomes_topic,
                        transaction_id=transaction_id,
                    )
                key = (transaction_id, outcome.digest)
                answer = (outcome.status, outcome.reason)
                account_id = outcome.account_id
                entry = answered.get(key)
                if entry is None:
                    answered[key] = AnswerEntry(answer, (partition, offsets[index]), account_id)
                    continue
                if answer != entry.answer:
                    entry.add_other(answer, (partition, offsets[index]))
                if account_id != entry.account_id:
                    self._violation(
                        Kind.OUTCOME_WRONG_ACCOUNT,
                        f"answers of one request name two accounts: "
                        f"{entry.account_id!r} at partition {entry.location[0]} offset "
                        f"{entry.location[1]}, then {account_id!r}",
                        partition,
                        offsets[index],
                        topic=self.outcomes_topic,
                        account_id=account_id,
                        transaction_id=transaction_id,
                    )
            self.outcomes_indexed += len(log)
            if on_progress is not None:
                on_progress(len(log))

    # -- wallet.events -------------------------------------------------------------------------

    def replay(
        self,
        logs: dict[int, PartitionLog],
        snapshots: Iterable[StateSnapshot] = (),
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Folds every partition's events, comparing the fold with each snapshot at its offset.

        The partitions advance together, a slice of each in turn: the two sides of a transfer
        are then replayed close together, so the transfers waiting for their other side stay
        few, and their table small enough to stay in the processor's cache.
        """
        cursors = []
        for number, log in sorted(logs.items()):
            cuts = sorted(
                _Cut(bisect.bisect_left(log.offsets, snapshot.events_offset), order, snapshot)
                for order, snapshot in enumerate(snapshots)
                if snapshot.partition == number
            )
            # The audit compares accounts only: the idempotency memory would grow with the log.
            cursors.append(_Cursor(log, self.states.setdefault(number, State(tracks_memory=False)), cuts))
        while cursors:
            for cursor in list(cursors):
                log, state, position, cuts = cursor.log, cursor.state, cursor.position, cursor.cuts
                while cuts and cuts[0].position == position:
                    self._compare_snapshot(cuts.pop(0).snapshot, state, log.end_offset)
                if position == len(log):
                    cursors.remove(cursor)
                    continue
                stop = min(position + INTERLEAVE_SLICE_RECORDS, len(log), cuts[0].position if cuts else len(log))
                self._replay_chunk(log, state, position, stop)
                cursor.position = stop
                if on_progress is not None:
                    on_progress(stop - position)

    def _replay_chunk(self, log: PartitionLog, state: State, start: int, stop: int) -> None:
        # The hot loop of the audit. The common path (a well-formed event that follows) costs one
        # decode, one fold and one or two lookups; everything unusual is out of line.
        partition = log.partition
        offsets, keys, values = log.offsets, log.keys, log.values
        account_keys = self._keys_by_partition.setdefault(partition, {})
        answered = self._answered
        answer_of, transfer_events = _ANSWER_OF, _TRANSFER_EVENTS
        # The decoder itself rather than codec.decode_event: one Python call less per event.
        decode, decode_errors = _decode_event, _DECODE_ERRORS
        for index in range(start, stop):
            offset = offsets[index]
            try:
                # A record without a value raises TypeError, caught below as an undecodable event.
                event = decode(values[index])  # type: ignore[arg-type]
            except decode_errors as error:
                self._violation(Kind.UNDECODABLE_EVENT, f"not a valid event: {error}", partition, offset)
                continue
            event_class = type(event)
            account_id = event.account_id
            expected_key = account_keys.get(account_id)
            if expected_key is None:
                expected_key = account_keys[account_id] = self._first_sight(account_id, partition, offset, event)
            if keys[index] != expected_key:
                self._violation(
                    Kind.MISROUTED_EVENT,
                    f"record key {keys[index]!r} is not the event's account",
                    partition,
                    offset,
                    event,
                )

            if event_class is CommandRejected:
                # Not folded: a decision event changes no account; the fold would only remember
                # its answer for retries, and the audit compares accounts, not that memory.
                # A refused credit leg is answered by the refund on the sender's side, not here.
                answer = None if event.command == "credit_leg" else (FAILURE, event.reason)
                amount_minor, currency = 0, None
            else:
                folded = self._fold_change(state, event, partition, offset)
                if folded is None:
                    continue  # not folded: named as a violation
                amount_minor, currency = folded
                answer = answer_of[event_class] if event_class is not TransferRefunded else (FAILURE, event.reason)
                if event_class in _HOLD_EVENTS:
                    self.holds.file(event, partition, offset)
                    if event_class is HoldExpired:
                        continue  # no request, no transfer: what it released is balance again

            key = (event.transaction_id, event.digest)
            entry = None
            if answer is not None:
                entry = answered.get(key)
                if entry is not None and entry.answer == answer:
                    entry.decided = True
                    if entry.account_id is not None:
                        self._check_answer_account(entry, event, partition, offset)
                else:
                    self._decided_unanswered(key, answer, partition, offset, account_id)
            if event_class in transfer_events or event_class is CommandRejected and answer is None:
                self._file_transfer_record(
                    key, _transfer_record(event, partition, offset, amount_minor, currency), entry
                )
        self.events_replayed += stop - start

    def _fold_change(self, state: State, event, partition: int, offset: int) -> tuple[int, str] | None:
        """Folds an event that changes an account, after checking its sequence; returns (the
        amount it moved, the account's currency), or None if it is not folded (a violation)."""
        event_class = type(event)
        account_id = event.account_id
        accounts = state.accounts
        account = accounts.get(account_id)
        if account is None or event.seq != account.seq + 1 or event_class is AccountOpened:
            if not self._sequence_ok(state, event, partition, offset):
                return None
            account = accounts.get(account_id)  # None until an account_opened is folded
        balance_before_minor = account.balance_minor if account is not None else 0
        try:
            fold(state, event)
        except (CorruptLog, ValueError, KeyError) as error:
            self._violation(Kind.BALANCE_MISMATCH, str(error), partition, offset, event)
            self._fold_by_amount(state, event)
        else:
            if self._misstated_minor and event_class in _MONEY_EVENTS:
                self._misstated_minor.pop(account_id, None)  # this event states a balance that follows again
        if account is None:
            account = accounts[account_id]
        currency = account.currency
        amount_minor = abs(account.balance_minor - balance_before_minor)
        if self.movements is not None and event_class in _MONEY_EVENTS:
            self.movements.append(
                MoneyMovement(
                    partition,
                    offset,
                    event_type(event),
                    account_id,
                    event.transaction_id,
                    account.balance_minor - balance_before_minor,
                    currency,
                    event.actor,
                )
            )
        if event_class is Deposited or event_class is Withdrawn:
            flow = self._flows.get(currency)
            if flow is None:
                flow = self._flows[currency] = [0, 0]
            flow[1 if event_class is Withdrawn else 0] += amount_minor
        return amount_minor, currency

    def _check_answer_account(self, entry: AnswerEntry, event, partition: int, offset: int) -> None:
        """The answer names the account that owns the request its event decides."""
        if type(event) is TransferCredited:
            owner = event.from_account
        elif type(event) is AccountOpened and event.shard_of is not None:
            owner = event.shard_of  # a shard's opening is part of its merchant's open request
        else:
            owner = event.account_id
        if entry.account_id != owner:
            self._violation(
                Kind.OUTCOME_WRONG_ACCOUNT,
                f"the answer names account {entry.account_id!r} but the "
                f"request belongs to {owner!r}, whose event at partition {partition} offset {offset} "
                f"decides it",
                *entry.location,
                topic=self.outcomes_topic,
                account_id=entry.account_id,
                transaction_id=event.transaction_id,
            )

    def _file_transfer_record(self, key: RequestKey, record: TransferRecord, entry: AnswerEntry | None) -> None:
        records = self._open_transfers.get(key)
        if records is None:
            self._open_transfers[key] = [record]
        else:
            records.append(record)
            if settled_cleanly(records):
                self._settle(key, records, entry)

    def _settle(self, key: RequestKey, records: list[TransferRecord], entry: AnswerEntry | None) -> None:
        """Drops a transfer whose debit and legs have all been seen and agree; its answer's entry
        remembers it, so that anything more of the same request is seen as what it is."""
        del self._open_transfers[key]
        if entry is None:
            entry = self._answered.get(key)
        if entry is None:
            return  # unanswered: named as a decision without outcome
        if entry.settled:
            debit = next(record for record in records if record.kind == DEBITED)
            transaction_id, _ = key
            self._violation(
                Kind.DEBITED_TWICE,
                "the whole transfer, debit and legs, is in the log twice",
                *debit.location,
                account_id=debit.account_id,
                transaction_id=transaction_id,
            )
        entry.settled = True

    def _after_settlement(self, key: RequestKey, records: list[TransferRecord]) -> None:
        """Records of a transfer whose debit and legs had all been seen already."""
        transaction_id, _ = key
        for record in records:
            self._violation(
                Kind.DEBITED_TWICE if record.kind == DEBITED else Kind.SETTLED_TWICE,
                f"{LEG_NAMES[record.kind]} of a transfer already debited and settled",
                *record.location,
                account_id=record.account_id,
                transaction_id=transaction_id,
            )

    def _decided_unanswered(
        self, key: RequestKey, answer: Answer, partition: int, offset: int, account_id: str
    ) -> None:
        decision = self._unanswered.get(key)
        if decision is None:
            self._unanswered[key] = UnansweredDecision(partition, offset, account_id, {answer})
        else:
            decision.answers.add(answer)

    def _sequence_ok(self, state: State, event, partition: int, offset: int) -> bool:
        """Checks an event that opens an account or does not follow its account's last seq.
        Returns whether to fold it; resynchronises the account's seq after a gap so that the
        events after it are checked against what they claim to follow."""
        account = state.accounts.get(event.account_id)
        if account is None:
            return self._opening_ok(state, event, partition, offset)
        seq = event.seq
        if seq <= account.seq:
            self._violation(
                Kind.SEQ_REPEATED,
                f"seq {seq} again after seq {account.seq}: a duplicate or replayed event (not folded)",
                partition,
                offset,
                event,
            )
            return False
        if type(event) is AccountOpened:
            self._violation(
                Kind.ACCOUNT_REOPENED,
                f"account_opened at seq {seq} for an account already open (not folded)",
                partition,
                offset,
                event,
            )
            account.seq = seq
            return False
        if seq != account.seq + 1:
            self._violation(
                Kind.SEQ_GAP,
                f"seq {seq} follows seq {account.seq}: {seq - account.seq - 1} event(s) missing",
                partition,
                offset,
                event,
            )
            account.seq = seq - 1
        return True

    def _opening_ok(self, state: State, event, partition: int, offset: int) -> bool:
        """Checks the first event of an account: an account_opened, in a known currency, at seq 1."""
        seq = event.seq
        if type(event) is not AccountOpened:
            self._violation(
                Kind.EVENT_BEFORE_OPEN,
                f"{event_type(event)} seq {seq} for an account with no account_opened before it",
                partition,
                offset,
                event,
            )
            return False
        if event.currency not in MINOR_UNITS:
            self._violation(
                Kind.EVENT_BEFORE_OPEN,
                f"account_opened in unknown currency {event.currency!r}: the account's events cannot be folded",
                partition,
                offset,
                event,
            )
            return False
        if seq != 1:
            self._violation(Kind.SEQ_GAP, f"account_opened has seq {seq}, expected 1", partition, offset, event)
            state.accounts[event.account_id] = Account(event.currency, event.kind, ACTIVE, 0, seq)
            return False  # opened by hand: the fold refuses an opening that is not seq 1
        return True

    def _first_sight(self, account_id: str, partition: int, offset: int, event) -> bytes:
        owner = partition_for(account_id, self.partition_count)
        if owner != partition:
            self._violation(
                Kind.MISROUTED_EVENT,
                f"account {account_id!r} belongs to partition {owner}, but its events are on partition {partition}",
                partition,
                offset,
                event,
            )
        return account_id.encode()

    def _fold_by_amount(self, state: State, event) -> None:
        """Applies an event the fold refused, moving the balance by the event's amount, so the
        replay continues from the balance the log's amounts give (never the stated one)."""
        event_class = cast(msgspec.StructMeta, type(event))  # every event is a msgspec Struct
        account = state.accounts.get(event.account_id)
        if account is None:  # an opening the fold refused (say, with a balance): opened empty
            state.accounts[event.account_id] = Account(event.currency, event.kind, ACTIVE, 0, event.seq)
            return
        account.seq = event.seq
        if event_class in BALANCE_SIGN:
            try:
                same_currency = event.currency == account.currency
                amount_minor = canonical_minor(event.amount, account.currency) if same_currency else 0
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
        if event_class in _HOLD_EVENTS:
            try:  # the held total the event states (a hold event states it after itself)
                account.held_minor = canonical_balance_minor(event.held, account.currency)
            except ValueError:
                pass  # unreadable: the held total stays what it was

    def _compare_snapshot(self, snapshot: StateSnapshot, state: State, log_end_offset: int) -> None:
        self.snapshots_compared += 1
        self.violations.extend(compare_snapshot(snapshot, state, log_end_offset, self.events_topic))

    # -- replaying in several processes -------------------------------------------------------

    def summary(self) -> ReplayPart:
        """What `replay` found, to send from a worker process that replayed some partitions
        (with an index of outcomes inherited from its parent) back to the parent."""
        flags = bytes((2 if entry.decided else 0) | (1 if entry.settled else 0) for entry in self._answered.values())
        return ReplayPart(
            self.violations,
            self.states,
            self._flows,
            self._misstated_minor,
            self._open_transfers,
            self._unanswered,
            flags,
            self.holds.holds,
            self.events_replayed,
            self.snapshots_compared,
            self.movements,
        )

    def absorb(self, part: ReplayPart) -> None:
        """Adds what a worker's `summary` holds, as if this replay had replayed its partitions."""
        self.violations += part.violations
        self.states.update(part.states)
        for currency, (deposited_minor, withdrawn_minor) in part.flows.items():
            flow = self._flows.setdefault(currency, [0, 0])
            flow[0] += deposited_minor
            flow[1] += withdrawn_minor
        self._misstated_minor.update(part.misstated_minor)
        for key, decision in part.unanswered.items():
            held = self._unanswered.get(key)
            if held is None:
                self._unanswered[key] = decision
            else:
                held.merge(decision)
        for entry, flag in zip(self._answered.values(), part.answer_flags, strict=True):
            entry.decided = entry.decided or bool(flag & 2)
            entry.settled = entry.settled or bool(flag & 1)
        for key, records in part.open_transfers.items():
            held_records = self._open_transfers.get(key)
            if held_records is None:
                self._open_transfers[key] = records
            else:
                held_records += records
                if settled_cleanly(held_records):
                    self._settle(key, held_records, None)
        self.holds.absorb(part.holds)
        self.events_replayed += part.events_replayed
        self.snapshots_compared += part.snapshots_compared
        if self.movements is not None and part.movements is not None:
            self.movements += part.movements

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
                assert value is not None  # wallet.events has no tombstones (decode_event(None) is a TypeError)
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

    def finish(
        self, settled: bool, read_later_events: Callable[[], Iterable[bytes | None]] | None = None
    ) -> tuple[list[InFlight], list[CurrencyTotals]]:
        """The transfer, answer and conservation checks; returns the in-flight transfers and the
        totals per currency.

        `settled`: the pipeline has been drained, so a transfer still in flight is a violation.
        `read_later_events`: gives the events written to the topic since the snapshot (called at
        most once, only when a finding could be explained by one of them).
        """
        self._read_later_events = read_later_events
        in_flight, in_flight_minor = self._check_open_transfers(settled)
        check_answers(
            self._answered,
            self._unanswered,
            self._open_transfers,
            self._later_event,
            self._violation,
            self.events_topic,
            self.outcomes_topic,
        )
        totals = currency_totals(self.states.values(), self._misstated_minor, self._flows, in_flight_minor)
        self.violations += [violation for row in totals if (violation := row.violation(self.events_topic))]
        return in_flight, totals

    def _check_open_transfers(self, settled: bool) -> tuple[list[InFlight], dict[str, int]]:
        """The transfers that did not settle cleanly: (those in flight, the money in flight per currency)."""
        in_flight: list[InFlight] = []
        in_flight_minor: dict[str, int] = {}
        for key, records in self._open_transfers.items():
            answered = self._answered.get(key)
            if answered is not None and answered.settled:
                self._after_settlement(key, records)
                continue
            transfer = LoggedTransfer(records)
            contribution_minor = check_transfer(key, transfer, self._later_event, self._violation)
            if contribution_minor:
                assert transfer.currency is not None  # only a debited transfer contributes; its debit has one
                in_flight_minor[transfer.currency] = in_flight_minor.get(transfer.currency, 0) + contribution_minor
            flying = in_flight_of(key, transfer)
            if flying is None:
                continue
            in_flight.append(flying)
            if settled:
                self._violation(
                    Kind.IN_FLIGHT_WHEN_SETTLED,
                    f"{flying.amount} {flying.currency} from "
                    f"{flying.from_account} to {flying.to_account} is still in flight "
                    f"({'refund' if flying.refused_reason else 'credit'} pending) after the pipeline "
                    f"was drained",
                    *flying.debited_at,
                    account_id=flying.from_account,
                    transaction_id=flying.transaction_id,
                )
        in_flight.sort(key=lambda flying: flying.debited_at)
        return in_flight, in_flight_minor

    def _violation(
        self,
        kind: str,
        message: str,
        partition: int | None = None,
        offset: int | None = None,
        event=None,
        *,
        topic: str | None = None,
        account_id: str | None = None,
        transaction_id: str | None = None,
    ) -> None:
        if event is not None:
            account_id = account_id or event.account_id
            transaction_id = transaction_id or event.transaction_id
        self.violations.append(
            Violation(kind, message, topic or self.events_topic, partition, offset, account_id, transaction_id)
        )


def _transfer_record(event, partition: int, offset: int, amount_minor: int, currency: str | None) -> TransferRecord:
    """The record of a transfer event (or of the receiver's refusal of a credit leg)."""
    event_class = type(event)
    if event_class is TransferDebited or event_class is HoldCaptured:
        return TransferRecord(
            DEBITED, partition, offset, event.account_id, event.to_account, amount_minor, currency, None
        )
    if event_class is TransferCredited:
        return TransferRecord(
            CREDITED, partition, offset, event.account_id, event.from_account, amount_minor, currency, None
        )
    if event_class is TransferRefunded:
        return TransferRecord(
            REFUNDED, partition, offset, event.account_id, event.to_account, amount_minor, currency, event.reason
        )
    return TransferRecord(REFUSED, partition, offset, event.account_id, None, 0, None, event.reason)
