"""The gate a record of `wallet.commands` passes before and while the core decides it.

One pure function pair, called by every place that decides the log: the processor, the
audit's replay (which must skip exactly the records the processor dead-lettered, or replay
is not byte-identical) and the benchmarks' reference pipeline. The checks, in order:

1. the value decodes as a command of the contract (else it is dead-lettered, unanswered);
2. it sits on the partition that owns its account: a producer that does not use the murmur2
   partitioner must not split an account's history. A client command found elsewhere is
   dead-lettered and forwarded, its bytes unchanged, to the partition that owns its account,
   which decides it like any other record; a leg or a tick found elsewhere is only
   dead-lettered (processors write them on the right partition), and a tick must sit on the
   partition it names, so a tick moves only its own partition's time;
3. a saga leg carries a MAC of the processors' keyring: legs are written by processors only;
4. the core can decide it (`UndecidableInput` otherwise, state untouched).

A leg whose account belongs to the partition that decided it is decided at once, in the same
step and at the same record time (`decide`), instead of being written to `wallet.commands` and
read back: a transfer between two accounts of one partition settles in one decision. The saga
keeps its one meaning: the leg is the same leg, decided by the same core against the same
state as the partition's next record would be; it only skips the round trip through Kafka,
which for a leg the processor itself made proves nothing (its MAC is the processor's own).
Every place that decides the log calls `decide`, so the processor, the audit's replay and the
reference pipeline all apply the rule the same way.

Trust boundary: the value is untrusted bytes from the topic; what comes out is either a
command the core may decide or a `Refusal` that says why not (the DLQ record's reason). A
refusal is never answered on `wallet.outcomes`: the identity a refused record names (an account
and a transaction id) is only what its bytes claim, and an answer under it would be a second,
contradicting answer to the real request of that id (a copy of a transfer written to another
partition, or garbage naming someone's transaction id, once made the API report `failure` for
a transfer whose money moved). The owner's partition alone decides, and answers, a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from schemas.codec import SchemaError, decode_command
from schemas.commands import LEG_COMMANDS, SHARDS_MAX, Leg, Tick, WireCommand, command_type, owner_account
from schemas.events import Event
from schemas.leg_auth import LegKeyring
from streams.core.errors import UndecidableInput
from streams.core.machine import Decision, apply
from streams.core.state import State


class Forward(NamedTuple):
    """Where a misrouted client command's bytes go on to: its owner's partition, under its owner's
    key (not the record's own key, which may be of any size or none)."""

    partition: int
    key: str


class Refusal(NamedTuple):
    """A record that is dead-lettered instead of decided."""

    reason: str  # human-readable, written to the DLQ
    forward_to: Forward | None = None


def admit(
    value: bytes | None, partition: int, owner_partition: Callable[[str], int], keyring: LegKeyring
) -> WireCommand | Refusal:
    """The command in `value`, found on `partition`, if the core may decide it (checks 1-3)."""
    if value is None:
        return Refusal("no value (a tombstone): not a command")
    try:
        command = decode_command(value)
    except SchemaError as schema_error:
        return Refusal(str(schema_error))
    if isinstance(command, Tick):
        if command.partition != partition:
            return Refusal(
                f"tick of partition {command.partition} arrived on partition {partition}: a tick may move "
                f"only the time of the partition it names"
            )
        return command
    owner = owner_account(command)
    owner_here = owner_partition(owner)
    if owner_here != partition:
        misrouted = (
            f"command for account {owner!r} arrived on partition {partition}, but the account belongs to "
            f"partition {owner_here}: its producer does not use the murmur2 partitioner"
        )
        if isinstance(command, LEG_COMMANDS):
            return Refusal(misrouted)
        return Refusal(f"{misrouted}; forwarded there", forward_to=Forward(owner_here, owner))
    if isinstance(command, LEG_COMMANDS):
        refused = keyring.verify(command, value)
        if refused is not None:
            return Refusal(refused)
    return command


def decide(
    state: State, command: WireCommand, record_time_ms: int, partition: int, owner_partition: Callable[[str], int]
) -> Decision | Refusal:
    """The core's decision (check 4) on the `partition` that owns `state`, with the legs that
    stay on this partition decided in the same step. `UndecidableInput` leaves the state
    untouched; any other exception is a bug and propagates, so that no state is written after it."""
    try:
        decision = apply(state, command, record_time_ms)
    except UndecidableInput as undecidable:
        return Refusal(f"the state machine cannot decide it: {undecidable}")
    if not decision.follow_ups:
        return decision
    return _with_local_legs(decision, record_time_ms, partition, owner_partition)


# A chain of local legs is short: a credit, its refund; or the open_shard legs of one merchant.
LOCAL_LEGS_MAX = SHARDS_MAX + 2


def _with_local_legs(
    decision: Decision, record_time_ms: int, partition: int, owner_partition: Callable[[str], int]
) -> Decision:
    """`decision` with each follow-up owned by `partition` decided in place, in the order the
    core made them: their events follow the decision's, the legs left are those for other
    partitions, and the one answer of the chain is the decision's answer."""
    state, outcome = decision.state, decision.outcome
    legs = list(decision.follow_ups)  # grows by the follow-ups of the legs decided here
    remote: list[Leg] = []
    events: list[Event] | None = None  # a copy of the decision's, made at the first local leg
    decided = 0
    index = 0
    while index < len(legs):
        leg = legs[index]
        index += 1
        if owner_partition(owner_account(leg)) != partition:
            remote.append(leg)
            continue
        decided += 1
        assert decided <= LOCAL_LEGS_MAX, f"{command_type(leg)} {leg.transaction_id!r}: a chain of legs without end"
        try:
            step = apply(state, leg, record_time_ms)
        except UndecidableInput as undecidable:
            # The core refused a leg it made a moment ago on this very state: a bug, not bad input.
            raise AssertionError(f"a leg the core just made cannot be decided: {undecidable}") from undecidable
        if events is None:
            events = list(decision.events)
        events += step.events
        legs += step.follow_ups
        if step.outcome is not None:
            assert outcome is None, f"{leg.transaction_id!r}: two answers to one request in one decision"
            outcome = step.outcome
    if events is None:
        return decision
    return Decision(state, events, remote, outcome)
