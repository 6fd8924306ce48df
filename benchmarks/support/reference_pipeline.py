"""The processors' decisions made in-process, without Kafka transactions: a reference log with a known answer.

`decide` runs client commands through the core as the processors do: one state per partition,
each partition deciding its commands log in order, saga legs appended to the commands log of
the partition that owns them a few commands later (so transfers are in flight for a while, as
live), undecodable or misrouted records dead-lettered (a misrouted client command also
forwarded to its owner's partition). The result is the records each topic
would hold after a clean run. `publish` writes it to real topics. Tests and benchmarks compare
against it (the audit), read it (the read model) or tamper with copies of it. It is not a
second processor: it has no restore and no crash handling, which are what the processor is about.

Every record gets a record time when it is appended, as the broker's LogAppendTime would
stamp it (a deterministic clock: RECORD_TIME_STEP_MS per record), and the core decides it at
that time; legs are signed with a leg key. `publish` writes the commands with those record
times (it switches the commands topic to CreateTime for that, so the topic is a recording, not
one a processor may run on) and re-signs the legs with the settings' leg keys, so the audit
re-decides the log exactly as the processors would have.

The deciding part (`decide`, `workload`, `ReferenceLog`) does no I/O; only `publish` talks to Kafka.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from confluent_kafka import Producer
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from infra.admin import admin_client
from infra.kafka_clients import kafka_security
from infra.produce import produce_with_room
from infra.secrets import leg_keys_text
from infra.settings import Settings
from schemas.codec import decode_command, decode_event, decode_outcome, encode
from schemas.commands import (
    LEG_COMMANDS,
    Close,
    Command,
    CreditLeg,
    Deposit,
    Freeze,
    OpenAccount,
    PayMerchant,
    Transfer,
    Unfreeze,
    Withdraw,
    local_credentials,
    owner_account,
)
from schemas.events import Deposited, Event
from schemas.leg_auth import LegKeyring
from schemas.outcomes import Outcome
from schemas.partitioning import KAFKA_PARTITIONER, partition_for
from streams.core import admission
from streams.core.money import format_amount
from streams.core.state import State
from streams.runtime.restore import stable_ends

# Saga legs waiting before the oldest is delivered: transfers stay in flight across this many
# later legs, as they do between the partitions of a live processor.
LEGS_WAITING_MAX = 8
EVENTS, OUTCOMES = "events", "outcomes"
TRANSACTION_RECORDS_MAX = 2_000  # records per Kafka transaction when publishing
PUBLISH_TIMEOUT_S = 120.0  # one flush, transaction commit or metadata request
PRODUCE_QUEUE_FULL_WAIT_MS = 30_000
ABORTED_TRANSACTION_PREFIX = "aborted-"
START_MS = 1_700_000_000_000  # record time of the first record
RECORD_TIME_STEP_MS = 7  # between two records appended to the commands topic
# The leg key `decide` signs with; `publish` re-signs with the settings' keys.
REFERENCE_LEG_KEYS = "ref:" + "7e" * 32
CONFIG_WAIT_S = 15.0


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    value: bytes
    timestamp_ms: int = 0  # record time; 0 on a record not appended yet
    leg: bool = False  # a saga leg `decide` emitted (re-signed by `publish`)


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
    states: list[State]  # each partition's state after its last command
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Transfers whose credit leg was held back: debited, with no outcome ever.
    in_flight: set[str] = field(default_factory=set)
    # (EVENTS or OUTCOMES, partition) of each record added, in the order decided.
    order: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def empty(cls, partition_count: int) -> ReferenceLog:
        return cls(
            partition_count,
            [[] for _ in range(partition_count)],
            [[] for _ in range(partition_count)],
            [[] for _ in range(partition_count)],
            [State() for _ in range(partition_count)],
        )

    @property
    def event_count(self) -> int:
        return sum(map(len, self.events))

    @property
    def outcome_count(self) -> int:
        return sum(map(len, self.outcomes))

    def add(self, message: Event | Outcome) -> None:
        """Appends an event (to its account's partition) or an outcome (to its transaction's)."""
        topic, key = (OUTCOMES, message.transaction_id) if type(message) is Outcome else (EVENTS, message.account_id)
        partition = partition_for(key, self.partition_count)
        (self.outcomes if topic == OUTCOMES else self.events)[partition].append(Record(key.encode(), encode(message)))
        self.order.append((topic, partition))

    def decided(self) -> Iterator[tuple[str, int, Record]]:
        """(topic, partition, record) of every event and outcome in the order decided. Each
        partition's records come in list order; records a test added to a list come last."""
        cursors: dict[tuple[str, int], int] = {}
        for topic, partition in self.order:
            records = (self.outcomes if topic == OUTCOMES else self.events)[partition]
            position = cursors.get((topic, partition), 0)
            if position < len(records):
                cursors[topic, partition] = position + 1
                yield topic, partition, records[position]
        for topic, lists in ((EVENTS, self.events), (OUTCOMES, self.outcomes)):
            for partition, records in enumerate(lists):
                for record in records[cursors.get((topic, partition), 0) :]:
                    yield topic, partition, record

    def messages(self) -> list[Event | Outcome]:
        """The events and outcomes, decoded, in the order decided."""
        return [
            decode_outcome(record.value) if topic == OUTCOMES else decode_event(record.value)
            for topic, _, record in self.decided()
        ]


def raw_command(key: str, value: bytes) -> Record:
    """A client record that is not necessarily a valid command (to exercise the dead-letter path)."""
    return Record(key.encode(), value)


def decide(
    client_commands: Iterable[Command | Record],
    partition_count: int,
    *,
    hold_legs_of: frozenset[str] = frozenset(),
    legs_waiting_max: int = LEGS_WAITING_MAX,
    start_ms: int = START_MS,
    leg_keys: str = REFERENCE_LEG_KEYS,
) -> ReferenceLog:
    """Decides `client_commands` (in order) and the saga legs they cause the way the processors
    would; `hold_legs_of` names transfers whose credit leg is never delivered (one between two
    accounts of a partition has no leg to hold: it settles in its own decision)."""
    log = ReferenceLog.empty(partition_count)
    legs: deque[Command] = deque()
    keyring = LegKeyring.parse(leg_keys)
    clock = [start_ms]

    def owner_partition(account: str) -> int:
        return partition_for(account, partition_count)

    def deliver(record: Record) -> None:
        record = Record(record.key, record.value, clock[0], record.leg)
        clock[0] += RECORD_TIME_STEP_MS
        partition = partition_for(record.key.decode(), partition_count)
        commands = log.commands[partition]
        commands.append(record)
        admitted = admission.admit(record.value, partition, owner_partition, keyring)
        decision = (
            admitted
            if isinstance(admitted, admission.Refusal)
            else admission.decide(log.states[partition], admitted, record.timestamp_ms, partition, owner_partition)
        )
        if isinstance(decision, admission.Refusal):
            log.dead_letters.append(DeadLetter(record, decision.reason, partition, len(commands) - 1))
            forward = decision.forward_to
            if forward is not None:  # as the processor forwards a misrouted client command
                deliver(Record(forward.key.encode(), record.value, leg=record.leg))
            return
        for event in decision.events:
            log.add(event)
        for leg in decision.follow_ups:
            if type(leg) is CreditLeg and leg.transaction_id in hold_legs_of:
                log.in_flight.add(leg.transaction_id)
            else:
                assert isinstance(leg, LEG_COMMANDS)  # the core's follow-ups are saga legs
                legs.append(keyring.sign(leg))
        if decision.outcome is not None:
            log.add(decision.outcome)

    def command_record(command: Command) -> Record:
        return Record(owner_account(command).encode(), encode(command), leg=type(command) in LEG_COMMANDS)

    for item in client_commands:
        deliver(item if isinstance(item, Record) else command_record(item))  # Record has no subclasses
        while len(legs) > legs_waiting_max:
            deliver(command_record(legs.popleft()))
    while legs:
        deliver(command_record(legs.popleft()))
    return log


def _edge(command_class: type[Any], **fields) -> Command:
    """A client command with the actor and role a trusted local edge gives it (`local_credentials`)."""
    actor, role = local_credentials(command_class, fields[command_class.owner_field])
    return command_class(actor=actor, role=role, **fields)


def workload(seed: int, account_count: int, operation_count: int) -> list[Command]:
    """Client commands of a busy wallet: opens, deposits, transfers and merchant payments that
    succeed or are refunded (frozen receiver, missing receiver, other currency, not a merchant),
    withdrawals, freezes, closes, client retries and transaction ids reused with another payload."""
    rng = random.Random(seed)
    commands: list[Command] = []
    currencies = {}
    kinds = {}

    def transaction_id() -> str:
        return f"tx-{seed}-{len(commands)}"

    def amount(currency: str, high_minor: int = 50_000) -> str:
        return format_amount(rng.randint(1, high_minor), currency)

    account_ids = [f"acct-{seed}-{index}" for index in range(account_count)]
    for account_id in account_ids:
        currencies[account_id] = rng.choices(["USD", "JPY", "BHD"], weights=[8, 1, 1])[0]
        kinds[account_id] = "merchant" if rng.random() < 0.15 else "user"
        commands.append(
            _edge(
                OpenAccount,
                transaction_id=transaction_id(),
                account_id=account_id,
                currency=currencies[account_id],
                kind=kinds[account_id],
            )
        )
        commands.append(
            _edge(
                Deposit,
                transaction_id=transaction_id(),
                account_id=account_id,
                amount=amount(currencies[account_id], 1_000_000),
                currency=currencies[account_id],
            )
        )

    unfreezes_due: dict[int, list[str]] = {}
    for operation in range(operation_count):
        for frozen_account in unfreezes_due.pop(operation, ()):
            commands.append(_edge(Unfreeze, transaction_id=transaction_id(), account_id=frozen_account))
        account_id = rng.choice(account_ids)
        currency = currencies[account_id]
        other = rng.choice(account_ids)
        roll = rng.random()
        if roll < 0.40:
            # Mostly the sender's currency; sometimes another one, refused by the receiver.
            to_account = other if rng.random() < 0.97 else f"missing-{rng.randint(0, 99)}"
            command: Command = _edge(
                Transfer,
                transaction_id=transaction_id(),
                from_account=account_id,
                to_account=to_account,
                amount=amount(currency),
                currency=currency,
            )
        elif roll < 0.50:
            command = _edge(
                PayMerchant,
                transaction_id=transaction_id(),
                from_account=account_id,
                to_account=other,
                amount=amount(currency),
                currency=currency,
            )
        elif roll < 0.68:
            command = _edge(
                Deposit,
                transaction_id=transaction_id(),
                account_id=account_id,
                amount=amount(currency),
                currency=currency,
            )
        elif roll < 0.80:
            command = _edge(
                Withdraw,
                transaction_id=transaction_id(),
                account_id=account_id,
                amount=amount(currency),
                currency=currency,
            )
        elif roll < 0.83:
            command = _edge(Freeze, transaction_id=transaction_id(), account_id=account_id)
            unfreezes_due.setdefault(operation + rng.randint(5, 60), []).append(account_id)
        elif roll < 0.84:
            command = _edge(Close, transaction_id=transaction_id(), account_id=account_id)
        elif roll < 0.92:
            # A client retry: the same request again (same id, same payload) a little later.
            command = rng.choice(commands[-50:])
        else:
            # A reused transaction id with another payload: a duplicate_conflict.
            reused = rng.choice(commands[-50:])
            owner = owner_account(reused)
            command = _edge(
                Deposit,
                transaction_id=reused.transaction_id,
                account_id=owner,
                amount=amount(currencies[owner]),
                currency=currencies[owner],
            )
        commands.append(command)
    return commands


def publish(
    settings: Settings,
    log: ReferenceLog,
    *,
    transaction_records_max: int = TRANSACTION_RECORDS_MAX,
    aborted_transaction_after: int | None = None,
) -> None:
    """Writes `log` to the settings' topics, each record to the partition of its list, in log order.

    Commands go through a plain idempotent producer (clients do not use transactions), so
    their offsets are the list positions the dead letters name. Events and outcomes, in the
    order decided, then the dead letters, go through a transactional producer like the
    processors', in transactions of at most `transaction_records_max` records, so the topics
    have transaction markers between records as real ones do. With `aborted_transaction_after`,
    one transaction of forged records (a deposit event continuing a real account's sequence,
    an outcome) is written and aborted after that many of those records: read_committed
    readers must never see it.
    """
    commands = Producer(_producer_config(settings.bootstrap))
    # The topics' real partition count: a record goes to the partition of its list.
    metadata = commands.list_topics(settings.events_topic, timeout=PUBLISH_TIMEOUT_S)
    topic_partition_count = len(metadata.topics[settings.events_topic].partitions)
    if topic_partition_count != log.partition_count:
        raise ValueError(
            f"{settings.events_topic} has {topic_partition_count} partitions, "
            f"the log was decided for {log.partition_count}"
        )
    failures: list[str] = []

    def on_delivery(error, _message) -> None:
        if error is not None:
            failures.append(error.str())

    _record_times_from_producers(settings)
    keyring = LegKeyring.parse(leg_keys_text(settings))
    for partition, records in enumerate(log.commands):
        for record in records:
            if record.leg:
                leg = decode_command(record.value)
                assert isinstance(leg, LEG_COMMANDS)  # record.leg marks exactly the saga legs
                value = keyring.signed_record(leg)
            else:
                value = record.value
            _produce(
                commands,
                settings.commands_topic,
                record.key,
                value,
                partition,
                on_delivery=on_delivery,
                timestamp_ms=record.timestamp_ms,
            )
    remaining = commands.flush(PUBLISH_TIMEOUT_S)
    if remaining or failures:
        raise RuntimeError(
            f"writing {settings.commands_topic}: {remaining} records undelivered after "
            f"{PUBLISH_TIMEOUT_S:.0f} s, {len(failures)} failed ({failures[:1]})"
        )

    topics = {EVENTS: settings.events_topic, OUTCOMES: settings.outcomes_topic}
    # (topic, partition, key, value, headers)
    writes: list[tuple[str, int, bytes, bytes, list[tuple[str, bytes]] | None]] = [
        (topics[topic], partition, record.key, record.value, None) for topic, partition, record in log.decided()
    ]
    writes += [
        (
            settings.dlq_topic,
            partition_for(letter.record.key.decode(), log.partition_count),
            letter.record.key,
            letter.record.value,
            [
                ("error", letter.error.encode()),
                ("source_topic", settings.commands_topic.encode()),
                ("source_partition", str(letter.source_partition).encode()),
                ("source_offset", str(letter.source_offset).encode()),
            ],
        )
        for letter in log.dead_letters
    ]
    if aborted_transaction_after is not None and not 0 <= aborted_transaction_after <= len(writes):
        raise ValueError(f"aborted_transaction_after={aborted_transaction_after} is outside 0..{len(writes)}")
    transactional = Producer(
        {
            **_producer_config(settings.bootstrap),
            "transactional.id": f"{settings.topic_prefix}reference-{uuid.uuid4().hex}",
        }
    )
    transactional.init_transactions(PUBLISH_TIMEOUT_S)
    cuts = sorted(
        {
            *range(0, len(writes), transaction_records_max),
            *(() if aborted_transaction_after is None else (aborted_transaction_after,)),
        }
    )
    for start, end in zip(cuts, [*cuts[1:], len(writes)], strict=True):  # the same length by construction
        if start == aborted_transaction_after:
            _publish_aborted(transactional, settings, log)
        if start < end:
            transactional.begin_transaction()
            for topic, partition, key, value, headers in writes[start:end]:
                _produce(transactional, topic, key, value, partition, headers)
            transactional.commit_transaction(PUBLISH_TIMEOUT_S)
    # A commit returns once the coordinator has decided it; the partitions' markers follow, and
    # until then a read_committed reader (the audit) stops short of the last records.
    admin = admin_client(settings.bootstrap)
    for topic in (*topics.values(), settings.dlq_topic):
        stable_ends(admin, topic, list(range(log.partition_count)), PUBLISH_TIMEOUT_S)


def _publish_aborted(producer: Producer, settings: Settings, log: ReferenceLog) -> None:
    # A deposit taking a real deposit's place in its account's sequence, under another id.
    victim = next(
        event
        for topic, _, record in log.decided()
        if topic == EVENTS and type(event := decode_event(record.value)) is Deposited
    )
    forged_event = msgspec.structs.replace(victim, transaction_id=f"{ABORTED_TRANSACTION_PREFIX}event", digest="forged")
    forged_outcome = Outcome(
        transaction_id=f"{ABORTED_TRANSACTION_PREFIX}outcome",
        account_id=victim.account_id,
        actor="forger",
        status="success",
        digest="forged",
    )
    producer.begin_transaction()
    _produce(
        producer,
        settings.events_topic,
        victim.account_id.encode(),
        encode(forged_event),
        partition_for(victim.account_id, log.partition_count),
    )
    _produce(
        producer,
        settings.outcomes_topic,
        forged_outcome.transaction_id.encode(),
        encode(forged_outcome),
        partition_for(forged_outcome.transaction_id, log.partition_count),
    )
    # Flushed first so the aborted records really are in the log, not dropped unsent.
    producer.flush(PUBLISH_TIMEOUT_S)
    producer.abort_transaction(PUBLISH_TIMEOUT_S)


def _record_times_from_producers(settings: Settings) -> None:
    """Switches the commands topic to CreateTime (and waits until the broker says so), so the
    reference's record times are the ones written: a recording of what was decided."""
    admin = admin_client(settings.bootstrap)
    entry = ConfigEntry("message.timestamp.type", "CreateTime", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, settings.commands_topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=PUBLISH_TIMEOUT_S)
    deadline_s = time.monotonic() + CONFIG_WAIT_S
    described = ConfigResource(ResourceType.TOPIC, settings.commands_topic)
    while (
        admin.describe_configs([described])[described].result(timeout=PUBLISH_TIMEOUT_S)["message.timestamp.type"].value
        != "CreateTime"
    ):
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"{settings.commands_topic} did not switch to CreateTime within {CONFIG_WAIT_S:.0f} s")
        time.sleep(0.1)


def _producer_config(bootstrap: str) -> dict:
    return {
        **kafka_security("admin"),
        "bootstrap.servers": bootstrap,
        "partitioner": KAFKA_PARTITIONER,
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }


def _produce(
    producer: Producer,
    topic: str,
    key: bytes,
    value: bytes,
    partition: int,
    headers: list | None = None,
    on_delivery=None,
    timestamp_ms: int = 0,
) -> None:
    produce_with_room(
        producer,
        topic,
        value,
        key,
        partition=partition,
        headers=headers,
        on_delivery=on_delivery,
        timestamp_ms=timestamp_ms,
        queue_full_wait_ms=PRODUCE_QUEUE_FULL_WAIT_MS,
    )
