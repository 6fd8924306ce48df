"""An in-memory, multi-partition stand-in for the processor, to drive the pure core in tests.

Each partition has its own `State` and its own log of `wallet.commands` records (a FIFO of
encoded bytes, like a Kafka partition: order is the order of appending). A command goes to
the partition `partition_for(owner_account(command), N)`, exactly as the real producers place
it, and a partition's follow-up legs are appended to their owners' partitions when it decides
them — so legs between partitions, and between two accounts of one partition, take the same
path. The caller chooses which partition consumes its next record: that is how a test (or
hypothesis) explores interleavings. Every record is decoded from and every message encoded
to bytes with `schemas.codec`, as on the wire.

Each record is stamped, when appended, with the driver's clock (`clock_ms`, which the caller
moves), as the broker stamps LogAppendTime; the core decides it at that record time. The
driver does what the processor does around the core: a leg must verify with the processors'
keyring (else it is dead-lettered), the legs it emits are signed, and a record the core
cannot decide (`UndecidableInput`) or cannot decode is dead-lettered and changes nothing.
Kafka's exactly-once processing means a leg record is processed once: the driver itself
never duplicates a record. Duplicates come from clients, who may `submit` a command again,
and from an attacker, who may `inject` any bytes, copies of genuine legs included.

Money in flight is reported by folding the events (debited or captured − credited − refunded),
the way the audit does, not by asking the core.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from schemas.codec import decode_event, encode
from schemas.commands import TICK_TRANSACTION_ID, Command, Tick, WireCommand, owner_account
from schemas.events import (
    Deposited,
    Event,
    HoldCaptured,
    TransferCredited,
    TransferDebited,
    TransferRefunded,
    Withdrawn,
)
from schemas.leg_auth import LegKeyring
from schemas.outcomes import Outcome
from schemas.partitioning import partition_for
from streams.core.admission import Refusal, admit, decide
from streams.core.money import canonical_minor
from streams.core.state import State, fold

# A partition log longer than this means a test drives far more records than it can check
# step by step; failing loudly beats a test that silently runs for minutes.
QUEUE_LENGTH_MAX = 100_000
# `drain` gives up after this many steps: a saga that never settles is a bug to report, not a hang.
DRAIN_STEPS_MAX = 1_000_000
# The processors' leg key in these tests.
PROCESSOR_LEG_KEYS = "p1:" + "5a" * 32


class DriverError(AssertionError):
    """The driven system did something a correct one cannot (a saga that never settles, ...)."""


@dataclass
class Partition:
    state: State = field(default_factory=State)
    queue: deque[tuple[bytes, int]] = field(default_factory=deque)  # (value, record time)
    event_records: list[bytes] = field(default_factory=list)


@dataclass
class MoneyTotals:
    """Per currency, in minor units, folded from the events."""

    deposited: Counter = field(default_factory=Counter)
    withdrawn: Counter = field(default_factory=Counter)
    in_flight: Counter = field(default_factory=Counter)
    # (from_account, transaction_id, digest) -> debits not yet credited or refunded
    open_transfers: Counter = field(default_factory=Counter)

    def add(self, event: Event) -> None:
        event_class = type(event)
        if isinstance(event, Deposited):
            self.deposited[event.currency] += canonical_minor(event.amount, event.currency)
        elif isinstance(event, Withdrawn):
            self.withdrawn[event.currency] += canonical_minor(event.amount, event.currency)
        elif isinstance(event, (TransferDebited, HoldCaptured)):  # a capture is a debit towards its destination
            self.in_flight[event.currency] += canonical_minor(event.amount, event.currency)
            self.open_transfers[(event.account_id, event.transaction_id, event.digest)] += 1
        elif isinstance(event, (TransferCredited, TransferRefunded)):
            self.in_flight[event.currency] -= canonical_minor(event.amount, event.currency)
            sender = event.from_account if isinstance(event, TransferCredited) else event.account_id
            key = (sender, event.transaction_id, event.digest)
            self.open_transfers[key] -= 1
            if self.open_transfers[key] < 0:
                raise DriverError(f"{event_class.__name__} of {key} without a debit in flight")
            if self.open_transfers[key] == 0:
                del self.open_transfers[key]


@dataclass(frozen=True)
class Step:
    partition: int
    command: WireCommand | None  # None when the record was not a decodable command
    events: list[Event]
    outcome: Outcome | None


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    value: bytes
    reason: str
    command: WireCommand | None  # the command the core refused to decide (None: refused before the core)


class SagaDriver:
    def __init__(self, partition_count: int) -> None:
        self.partition_count = partition_count
        self.partitions = [Partition() for _ in range(partition_count)]
        self.money = MoneyTotals()
        self.outcome_records: list[bytes] = []
        self.outcomes: list[Outcome] = []
        self.keyring = LegKeyring.parse(PROCESSOR_LEG_KEYS)
        self.clock_ms = 0  # the "broker's" clock: the record time of what is appended now
        self.dead_letters: list[DeadLetter] = []
        self.leg_records: list[tuple[str, bytes]] = []  # (owner account, value) of every signed leg emitted

    def partition_of(self, account_id: str) -> int:
        return partition_for(account_id, self.partition_count)

    def submit(self, command: Command) -> int:
        """A client appends a command to its owner's partition; returns the partition."""
        return self._append(owner_account(command), encode(command))

    def _append(self, account_id: str, value: bytes) -> int:
        partition = self.partition_of(account_id)
        queue = self.partitions[partition].queue
        if len(queue) >= QUEUE_LENGTH_MAX:
            raise DriverError(f"partition {partition} holds {len(queue)} unconsumed records (bound {QUEUE_LENGTH_MAX})")
        queue.append((value, self.clock_ms))
        return partition

    def tick(self, partition: int, named_partition: int | None = None) -> None:
        """A processor appends a tick to `partition` (naming `named_partition`, its own unless a
        test forges one that names another)."""
        named = partition if named_partition is None else named_partition
        tick = Tick(transaction_id=TICK_TRANSACTION_ID, partition=named)
        self.partitions[partition].queue.append((encode(tick), self.clock_ms))

    def inject(self, account_id: str, value: bytes) -> int:
        """Anyone with write access to the topic appends any bytes under an account's key."""
        partition = self.partition_of(account_id)
        self.partitions[partition].queue.append((value, self.clock_ms))
        return partition

    def inject_at(self, partition: int, value: bytes) -> None:
        """The same, on a partition of the attacker's choosing (a misrouted record)."""
        self.partitions[partition].queue.append((value, self.clock_ms))

    def retry(self, command: Command) -> int:
        """A client sends a request again, as clients do after a timeout: the same command, a later record."""
        return self.submit(command)

    def waiting(self) -> list[int]:
        """Partitions with records not yet consumed."""
        return [index for index, partition in enumerate(self.partitions) if partition.queue]

    def step(self, partition: int) -> Step:
        """The processor of `partition` consumes and decides its next record."""
        owner = self.partitions[partition]
        if not owner.queue:
            raise DriverError(f"partition {partition} has no record to consume")
        value, record_time_ms = owner.queue.popleft()
        # The processor's own gate, so the driver dead-letters exactly what a processor would.
        admitted = admit(value, partition, self.partition_of, self.keyring)
        if isinstance(admitted, Refusal):
            return self._dead_letter(partition, value, admitted, None)
        decision = decide(owner.state, admitted, record_time_ms, partition, self.partition_of)
        if isinstance(decision, Refusal):
            return self._dead_letter(partition, value, decision, admitted)
        command = admitted
        for event in decision.events:
            owner.event_records.append(encode(event))
            self.money.add(event)
        for follow_up in decision.follow_ups:
            record = self.keyring.signed_record(follow_up)  # as a processor writes it
            self.leg_records.append((owner_account(follow_up), record))
            self._append(owner_account(follow_up), record)
        if decision.outcome is not None:
            self.outcome_records.append(encode(decision.outcome))
            self.outcomes.append(decision.outcome)
        return Step(partition, command, decision.events, decision.outcome)

    def _dead_letter(self, partition: int, value: bytes, refusal: Refusal, command: WireCommand | None) -> Step:
        self.dead_letters.append(DeadLetter(partition, value, refusal.reason, command))
        if refusal.forward_to is not None:  # as the processor forwards it
            self.partitions[refusal.forward_to.partition].queue.append((value, self.clock_ms))
        return Step(partition, command, [], None)

    def drain(self, steps_max: int = DRAIN_STEPS_MAX) -> int:
        """Consumes every partition round-robin until no record is left; returns the steps taken."""
        steps = 0
        while waiting := self.waiting():
            for partition in waiting:
                self.step(partition)
                steps += 1
            if steps > steps_max:
                raise DriverError(f"still {sum(len(p.queue) for p in self.partitions)} records after {steps} steps")
        return steps

    def balances(self) -> Counter:
        """Σ balances per currency, in minor units, from the live states."""
        total: Counter[str] = Counter()
        for partition in self.partitions:
            for account in partition.state.accounts.values():
                total[account.currency] += account.balance_minor
        return total

    def currencies(self) -> set[str]:
        return set(self.balances()) | set(self.money.deposited) | set(self.money.in_flight)

    def events(self, partition: int) -> list[Event]:
        return [decode_event(record) for record in self.partitions[partition].event_records]

    def refold(self, partition: int) -> State:
        """The partition's state rebuilt from its events alone, as a restore or the audit does it."""
        state = State()
        for event in self.events(partition):
            fold(state, event)
        return state
