"""The processors' work done in-process, without Kafka: a reference log with a known answer.

Runs client commands through the core exactly as the processors do: each partition decides
its commands in log order from an empty state, saga legs are appended to the partition of the
account that owns them, undecodable or misrouted records go to the dead-letter list. The
result is the records each topic would hold after a clean run. Tests write it to a real broker
to give the audit a log whose every balance is known (and to tamper with copies of it); the
audit benchmark uses it to make a large one. It is not a second processor: it has no Kafka
transactions, no restore and no crash handling, which are what the real processor is about.
"""
from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import Producer

from schemas.codec import SchemaError, decode_command, encode
from schemas.commands import Command, owner_account
from schemas.partitioning import KAFKA_PARTITIONER, partition_for
from streams.core.machine import apply
from streams.core.state import State
from wallet.config import Settings

WRITE_TRANSACTION_RECORDS_MAX = 20_000  # records per Kafka transaction when writing the log
WRITE_TIMEOUT_S = 120.0  # one flush or transaction commit
PRODUCE_QUEUE_FULL_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    error: str
    source_partition: int
    source_offset: int


@dataclass(slots=True)
class ReferenceLog:
    """Per partition, the records of each topic in log order."""
    partition_count: int
    commands: list[list[Record]]
    events: list[list[Record]]
    outcomes: list[list[Record]]
    dead_letters: list[DeadLetter] = field(default_factory=list)
    states: list[State] = field(default_factory=list)  # each partition's state after the last command

    @property
    def event_count(self) -> int:
        return sum(len(records) for records in self.events)


def raw_command(key: str, value: bytes) -> Record:
    """A client record that is not necessarily a valid command (to exercise the dead-letter path)."""
    return Record(key.encode(), value)


def run_commands(client_commands: Iterable[Command | Record], partition_count: int,
                 batch_size: int = 100) -> ReferenceLog:
    """Decides `client_commands` (in order) the way the processors would.

    Client commands arrive `batch_size` at a time and every partition catches up, saga legs
    included, before the next batch arrives: the legs interleave with client commands in the
    commands log as they do under a running processor.
    """
    log = ReferenceLog(partition_count, [[] for _ in range(partition_count)], [[] for _ in range(partition_count)],
                       [[] for _ in range(partition_count)], states=[State() for _ in range(partition_count)])
    cursors = [0] * partition_count
    iterator = iter(client_commands)
    while batch := list(itertools.islice(iterator, batch_size)):
        for item in batch:
            record = item if isinstance(item, Record) else Record(owner_account(item).encode(), encode(item))
            log.commands[partition_for(record.key.decode(), partition_count)].append(record)
        _catch_up(log, cursors)
    return log


def _catch_up(log: ReferenceLog, cursors: list[int]) -> None:
    count = log.partition_count
    # Ends: a client command causes at most a credit leg, and a credit leg at most a refund leg.
    while any(cursors[p] < len(log.commands[p]) for p in range(count)):
        for partition in range(count):
            commands, state, events = log.commands[partition], log.states[partition], log.events[partition]
            while cursors[partition] < len(commands):
                offset = cursors[partition]
                record = commands[offset]
                cursors[partition] += 1
                try:
                    command = decode_command(record.value)
                except SchemaError as error:
                    log.dead_letters.append(DeadLetter(record, str(error), partition, offset))
                    continue
                if partition_for(owner_account(command), count) != partition:
                    log.dead_letters.append(DeadLetter(record, "command on a partition that does not own its account",
                                                       partition, offset))
                    continue
                decision = apply(state, command)
                for event in decision.events:
                    events.append(Record(event.account_id.encode(), encode(event)))
                for leg in decision.follow_ups:
                    owner = owner_account(leg)
                    log.commands[partition_for(owner, count)].append(Record(owner.encode(), encode(leg)))
                if decision.outcome is not None:
                    transaction_id = decision.outcome.transaction_id
                    log.outcomes[partition_for(transaction_id, count)].append(
                        Record(transaction_id.encode(), encode(decision.outcome)))


def write_log(settings: Settings, log: ReferenceLog) -> None:
    """Writes `log` to the settings' topics, each record to its partition, in log order.

    Commands go through a plain idempotent producer (clients do not use transactions), so
    their offsets are the list positions the dead letters name; events, outcomes and dead
    letters go through a transactional producer like the processors', so the events topic
    has transaction markers between records, as a real one does.
    """
    commands = Producer(_producer_config(settings.bootstrap))
    failures: list[str] = []

    def on_delivery(error, _message) -> None:
        if error is not None:
            failures.append(error.str())

    for partition, records in enumerate(log.commands):
        for record in records:
            _produce(commands, settings.commands_topic, record.key, record.value, partition, on_delivery=on_delivery)
    remaining = commands.flush(WRITE_TIMEOUT_S)
    if remaining or failures:
        raise RuntimeError(f"writing {settings.commands_topic}: {remaining} records undelivered after "
                           f"{WRITE_TIMEOUT_S:.0f} s, {len(failures)} failed ({failures[:1]})")

    transactional = Producer({**_producer_config(settings.bootstrap),
                              "transactional.id": f"{settings.topic_prefix}reference-writer-{uuid.uuid4().hex}"})
    transactional.init_transactions(WRITE_TIMEOUT_S)
    writes = [(settings.events_topic, partition, record.key, record.value, None)
              for partition, records in enumerate(log.events) for record in records]
    writes += [(settings.outcomes_topic, partition, record.key, record.value, None)
               for partition, records in enumerate(log.outcomes) for record in records]
    writes += [(settings.dlq_topic, partition_for(letter.record.key.decode(), log.partition_count), letter.record.key,
                letter.record.value, [("error", letter.error.encode()),
                                      ("source_topic", settings.commands_topic.encode()),
                                      ("source_partition", str(letter.source_partition).encode()),
                                      ("source_offset", str(letter.source_offset).encode())])
               for letter in log.dead_letters]
    for start in range(0, len(writes), WRITE_TRANSACTION_RECORDS_MAX):
        transactional.begin_transaction()
        for topic, partition, key, value, headers in writes[start:start + WRITE_TRANSACTION_RECORDS_MAX]:
            _produce(transactional, topic, key, value, partition, headers)
        transactional.commit_transaction(WRITE_TIMEOUT_S)


def _producer_config(bootstrap: str) -> dict:
    return {"bootstrap.servers": bootstrap, "partitioner": KAFKA_PARTITIONER, "enable.idempotence": True,
            "linger.ms": 20, "batch.size": 1_000_000, "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 1_048_576}


def _produce(producer: Producer, topic: str, key: bytes | None, value: bytes, partition: int,
             headers: list | None = None, on_delivery=None) -> None:
    waited_s = 0.0
    while True:
        try:
            producer.produce(topic, value, key, partition, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            # The local queue is full: let deliveries drain it rather than drop a record.
            if waited_s >= PRODUCE_QUEUE_FULL_WAIT_S:
                raise RuntimeError(f"producer queue to {topic} stayed full for {PRODUCE_QUEUE_FULL_WAIT_S:.0f} s") from None
            producer.poll(0.1)
            waited_s += 0.1
