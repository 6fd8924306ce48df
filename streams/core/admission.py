"""The gate a record of `wallet.commands` passes before and while the core decides it.

One pure function pair, called by every place that decides the log: the processor, the
audit's replay (which must skip exactly the records the processor dead-lettered, or replay
is not byte-identical) and the benchmarks' reference pipeline. The checks, in order:

1. the value decodes as a command of the contract (else `invalid_command`);
2. it sits on the partition that owns its account (else `wrong_partition`): a producer that
   does not use the murmur2 partitioner must not split an account's history; a processor's
   tick must sit on the partition it names, so a tick moves only its own partition's time;
3. a saga leg carries a MAC of the processors' keyring: legs are written by processors only;
4. the core can decide it (`UndecidableInput` otherwise, state untouched).

Trust boundary: the value is untrusted bytes from the topic; what comes out is either a
command the core may decide or a `Refusal` that says why not (the DLQ record's reason) and,
when the record names a waiting client, the `failure` answer it gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from schemas.codec import SchemaError, decode_command
from schemas.commands import LEG_COMMANDS, Tick, WireCommand, owner_account
from schemas.leg_auth import LegKeyring
from schemas.outcomes import Outcome, Reason
from streams.core.errors import UndecidableInput
from streams.core.machine import Decision, apply, dead_letter_outcome
from streams.core.state import State


class Refusal(NamedTuple):
    """A record that is dead-lettered instead of decided."""

    reason: str  # human-readable, written to the DLQ
    outcome: Outcome | None  # the answer to the client waiting on it, when there is one


def admit(
    value: bytes, partition: int, owner_partition: Callable[[str], int], keyring: LegKeyring
) -> WireCommand | Refusal:
    """The command in `value`, found on `partition`, if the core may decide it (checks 1-3)."""
    try:
        command = decode_command(value)
    except SchemaError as schema_error:
        return Refusal(str(schema_error), dead_letter_outcome(value, Reason.INVALID_COMMAND))
    if isinstance(command, Tick):
        if command.partition != partition:
            # Nobody waits on a tick: dead-lettered without an answer.
            return Refusal(
                f"tick of partition {command.partition} arrived on partition {partition}: a tick may move "
                f"only the time of the partition it names",
                None,
            )
        return command
    owner = owner_account(command)
    owner_here = owner_partition(owner)
    if owner_here != partition:
        return Refusal(
            f"command for account {owner!r} arrived on partition {partition}, but the account belongs to "
            f"partition {owner_here}: its producer does not use the murmur2 partitioner",
            dead_letter_outcome(value, Reason.WRONG_PARTITION, command),
        )
    if isinstance(command, LEG_COMMANDS):
        refused = keyring.verify(command, value)
        if refused is not None:
            return Refusal(refused, None)  # nobody waits on a leg; answering a forged one would forge answers
    return command


def decide(state: State, command: WireCommand, record_time_ms: int) -> Decision | Refusal:
    """The core's decision (check 4). `UndecidableInput` leaves the state untouched; any other
    exception is a bug and propagates, so that no state is written after it."""
    try:
        return apply(state, command, record_time_ms)
    except UndecidableInput as undecidable:
        return Refusal(f"the state machine cannot decide it: {undecidable}", None)
