"""Determinism: re-deciding wallet.commands with the core reproduces wallet.events byte for byte.

Each partition's commands are decided again from an empty state, in log order, exactly as the
processor that owns the partition decided them, and each event the core returns, encoded, is
compared with the log's event at the same position of the same partition. What the processor
cannot decide it dead-letters: an undecodable record, one on the wrong partition, a saga leg
whose MAC does not verify with the processors' keyring, and what the core refuses as
`UndecidableInput`. The replay passes every record through the processor's own gate
(`streams.core.admission`), skips the same records and checks that the DLQ names them. Each
command is decided at its record's timestamp (the broker's LogAppendTime), the time the
processor passed to the core, and its legs for the same partition are decided in the same step,
as the processor does (`admission.decide`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from consumers.audit.violations import Kind, Location, Violation
from schemas.codec import SchemaError, decode_event, encode
from schemas.commands import Tick, WireCommand, owner_account
from schemas.leg_auth import LegKeyring
from schemas.partitioning import partition_for
from streams.core.admission import Refusal, admit, decide
from streams.core.state import State

if TYPE_CHECKING:
    from infra.log_reader import PartitionLog

# Commands re-decided between two progress reports: small enough for a live progress bar,
# large enough that reporting costs nothing.
PROGRESS_CHUNK_RECORDS = 16_384


@dataclass(slots=True)
class DeterminismResult:
    commands_replayed: int = 0
    events_reproduced: int = 0
    commands_dead_lettered: int = 0  # undecodable or misrouted: the processor sends them to the DLQ
    commands_pending: int = 0  # from the first command whose events are not in the log yet
    pending: list[Location] = field(default_factory=list)  # (partition, offset) of each first one
    violations: list[Violation] = field(default_factory=list)

    def violations_in(self, partition: int) -> bool:
        return any(
            violation.partition == partition
            for violation in self.violations
            if violation.kind in (Kind.NONDETERMINISTIC, Kind.CORE_ERROR)
        )

    def absorb(self, other: DeterminismResult) -> None:
        """Adds the result of other partitions (checked in another process)."""
        self.commands_replayed += other.commands_replayed
        self.events_reproduced += other.events_reproduced
        self.commands_dead_lettered += other.commands_dead_lettered
        self.commands_pending += other.commands_pending
        self.pending += other.pending
        self.violations += other.violations


def check_determinism(
    commands: PartitionLog,
    events: PartitionLog,
    partition_count: int,
    commands_topic: str,
    events_topic: str,
    dead_lettered: set[Location],
    result: DeterminismResult,
    *,
    keyring: LegKeyring,
    settled: bool,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Re-decides one partition's commands with the core from an empty state and compares each
    event, encoded, with the log's event at the same position of the same partition.

    Stops at the first difference: from there on the replayed state has diverged from the
    processor's and every later comparison would only repeat the finding. `dead_lettered` holds
    (partition, offset) of every command the DLQ names as its source; a record the processor
    cannot decide must be there once a later command of its partition has been decided (or,
    when `settled`, in any case).
    """
    partition = commands.partition
    if commands.timestamps is None:
        raise ValueError("the commands were read without their record timestamps, which the core decides with")
    owner_partitions: dict[str, int] = {}

    def owner_partition(account: str) -> int:
        found = owner_partitions.get(account)
        if found is None:
            found = owner_partitions[account] = partition_for(account, partition_count)
        return found

    replay = _PartitionReplay(commands, events, commands_topic, events_topic, result, owner_partition)
    values, offsets, timestamps = commands.values, commands.offsets, commands.timestamps
    reported = 0
    undelivered: list[tuple[int, Violation]] = []  # (command offset, violation)
    for index in range(len(values)):
        if on_progress is not None and index - reported >= PROGRESS_CHUNK_RECORDS:
            on_progress(index - reported)
            reported = index
        offset = offsets[index]
        value = values[index]
        # The same gate as the processor's, so the replay skips exactly what it dead-lettered.
        admitted = admit(value, partition, owner_partition, keyring)
        go_on = admitted if isinstance(admitted, Refusal) else replay.step(index, offset, admitted, timestamps[index])
        if isinstance(go_on, Refusal):
            result.commands_dead_lettered += 1
            if (partition, offset) not in dead_lettered:
                undelivered.append(
                    (
                        offset,
                        Violation(
                            Kind.NOT_DEAD_LETTERED,
                            f"the processor cannot decide this record ({go_on.reason}) and the DLQ has no record of it",
                            commands_topic,
                            partition,
                            offset,
                        ),
                    )
                )
            continue
        if not go_on:
            break
    if on_progress is not None:
        on_progress(len(values) - reported)
    result.events_reproduced += replay.position
    result.violations += [violation for at, violation in undelivered if settled or at < replay.decided_offset]
    replay.check_no_extra_event()


class _PartitionReplay:
    """The core re-deciding one partition's commands against that partition's events."""

    def __init__(
        self,
        commands: PartitionLog,
        events: PartitionLog,
        commands_topic: str,
        events_topic: str,
        result: DeterminismResult,
        owner_partition: Callable[[str], int],
    ) -> None:
        self.commands, self.events = commands, events
        self.commands_topic, self.events_topic = commands_topic, events_topic
        self.result = result
        self.owner_partition = owner_partition  # the partitioner, which decides what legs stay here
        self.state = State()
        self.position = 0  # of the next logged event a decided one must equal
        self.decided_offset = -1  # of the last command whose events are in the log

    def step(self, index: int, offset: int, command: WireCommand, record_time_ms: int) -> bool | Refusal:
        """Decides one command and compares its events; returns whether to go on, or the Refusal
        (the state untouched) of what the processor dead-letters."""
        result, partition = self.result, self.commands.partition
        try:
            decision = decide(self.state, command, record_time_ms, partition, self.owner_partition)
        except Exception as error:  # noqa: BLE001 - any failure of the core on a logged command is a finding
            result.violations.append(
                Violation(
                    Kind.CORE_ERROR,
                    f"the core raised {type(error).__name__}: {error}",
                    self.commands_topic,
                    partition,
                    offset,
                    None if isinstance(command, Tick) else owner_account(command),
                    command.transaction_id,
                )
            )
            return False
        if isinstance(decision, Refusal):
            return decision
        event_values = self.events.values
        if self.position == len(event_values) and decision.events:
            # The log ends before this command's events: it and what follows are not processed yet.
            result.pending.append((partition, offset))
            result.commands_pending += len(self.commands.values) - index
            return False
        result.commands_replayed += 1
        mismatch = _first_difference(decision.events, event_values, self.position)
        if mismatch is not None:
            at, event, logged = mismatch
            at_offset = self.events.offsets[at] if at < len(event_values) else self.events.end_offset
            result.violations.append(
                Violation(
                    Kind.NONDETERMINISTIC,
                    f"command at {self.commands_topic} offset {offset} decides "
                    f"{encode(event).decode()} but the log has {_describe_logged(logged)}",
                    self.events_topic,
                    partition,
                    at_offset,
                    event.account_id,
                    event.transaction_id,
                )
            )
            return False
        if decision.events:
            self.decided_offset = offset
        self.position += len(decision.events)
        return True

    def check_no_extra_event(self) -> None:
        """Every logged event of the partition was decided by some command (unless the replay
        already stopped at a difference, which names the partition's problem)."""
        position, partition, result = self.position, self.commands.partition, self.result
        if position >= len(self.events.values) or result.violations_in(partition):
            return
        value = self.events.values[position]
        event = _decoded_or_none(value)
        result.violations.append(
            Violation(
                Kind.EXTRA_EVENT,
                f"no command of {self.commands_topic} partition {partition} decides this event "
                f"({_describe_logged(value)}); the replay of all {len(self.commands.values)} commands ends before it",
                self.events_topic,
                partition,
                self.events.offsets[position],
                event.account_id if event else None,
                event.transaction_id if event else None,
            )
        )


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
    assert value is not None  # the events topic has no tombstones (decode_event(None) is a TypeError)
    try:
        return decode_event(value)
    except SchemaError:
        return None


def _describe_logged(value: bytes | None) -> str:
    return "nothing" if value is None else value.decode(errors="replace")
