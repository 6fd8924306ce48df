"""The exactly-once processor: Kafka transactions around the pure state machine.

One instance consumes some partitions of `wallet.commands` (a consumer group splits them)
and, per batch, in ONE Kafka transaction: decides every command with the core, produces its
events (to the same partition number of `wallet.events`), its saga legs (to
`wallet.commands`, placed by the shared partitioner) and its outcomes, sends the consumed
offsets, and commits. The RocksDB snapshot is written only after the commit. On any
transaction error the instance aborts where it can, replaces its producer (same
transactional id, which fences a zombie of itself) and rebuilds every owned partition from
the snapshot and the log: it never guesses whether a commit happened.
"""
from __future__ import annotations

import gc
import logging
import signal
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from confluent_kafka import (
    OFFSET_BEGINNING, TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError, KafkaException, Producer, TopicPartition,
)

from schemas.codec import SchemaError, decode_command, encode
from schemas.commands import LEG_COMMANDS
from schemas.events import CommandRejected
from schemas.leg_auth import LegKeyring
from schemas.outcomes import Reason
from schemas.partitioning import partition_for
from infra.secrets import leg_keys_text
from streams.core.errors import UndecidableInput
from streams.core.machine import apply, dead_letter_outcome
from streams.core.state import State, memory_horizon_ms
from infra.kafka_clients import (
    processor_consumer_config, processor_producer_config, restore_consumer_config,
)
from streams.runtime.restore import fold_event_tail
from streams.runtime.store import Checkpoint, PartitionChanges, StateStore
from infra.settings import Settings

log = logging.getLogger("wallet.processor")

PRODUCE_QUEUE_FULL_WAIT_S = 30.0
KAFKA_CALL_TIMEOUT_S = 30.0
COMMIT_RETRIES_MAX = 3
REPORT_INTERVAL_S = 5.0
GC_YOUNG_THRESHOLD = 200_000  # allocations between young-generation collections


@dataclass(frozen=True)
class ProcessorConfig:
    instance_id: str
    store_path: Path
    batch_size_max: int = 5_000  # commands per Kafka transaction: each commit costs milliseconds
    commit_interval_ms: int = 25  # longest a command waits for its batch to fill (a transfer waits twice)
    state_flush_interval_ms: int = 5_000  # how often the RocksDB snapshot catches up (restore folds the rest)
    transaction_timeout_ms: int = 10_000
    restore_timeout_s: float = 600.0


class _Task:
    """One owned partition: its state, its snapshot checkpoint and what changed since."""

    __slots__ = ("partition", "state", "checkpoint", "changes", "events_offset", "segments_dropped_at_horizon_ms")

    def __init__(self, partition: int, state: State, checkpoint: Checkpoint, events_offset: int) -> None:
        self.partition = partition
        self.state = state
        self.checkpoint = checkpoint
        self.changes = PartitionChanges()
        self.events_offset = events_offset  # next offset of wallet.events after the last committed event
        self.segments_dropped_at_horizon_ms: int | None = None


class Processor:
    def __init__(self, settings: Settings, config: ProcessorConfig) -> None:
        self.settings = settings
        self.config = config
        self.group_id = settings.processor_group_id
        self.transactional_id = settings.processor_transactional_id(config.instance_id)
        self._stopping = False
        self._tasks: dict[int, _Task] = {}
        # The processors' leg keys: every leg is verified before the core sees it, every emitted leg signed.
        self._keyring = LegKeyring.parse(leg_keys_text(settings))
        self._store = StateStore(config.store_path)
        self._consumer = Consumer(processor_consumer_config(settings.bootstrap, self.group_id, config.instance_id))
        self._restore_consumer = Consumer(restore_consumer_config(settings.bootstrap, self.group_id, config.instance_id))
        self._producer = self._new_producer()
        self._partition_count = self._check_topics()
        self._owner_partition = lru_cache(maxsize=1 << 20)(lambda account: partition_for(account, self._partition_count))
        self._last_flush_s = time.monotonic()
        self.commands_processed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, *_signal_args) -> None:
        self._stopping = True

    def run(self) -> None:
        # Let the young generation grow to a batch's worth of short-lived tuples and lists before
        # a pass: at the default of 700 the collector cost several microseconds per command.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self._consumer.subscribe([self.settings.commands_topic], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("instance %s started (group %s, transactional id %s)", self.config.instance_id, self.group_id,
                 self.transactional_id)
        report_s = time.monotonic()
        reported = 0
        try:
            while not self._stopping:
                records = self._consumer.consume(num_messages=self.config.batch_size_max,
                                                 timeout=self.config.commit_interval_ms / 1000)
                if records:
                    try:
                        self._process_batch(records)
                    except KafkaException as error:
                        self._recover(f"Kafka failed during a batch: {error}")
                now_s = time.monotonic()
                if now_s - self._last_flush_s >= self.config.state_flush_interval_ms / 1000:
                    self._flush_state()
                if now_s - report_s >= REPORT_INTERVAL_S:
                    rate = (self.commands_processed - reported) / (now_s - report_s)
                    log.info("partitions %s: %d commands processed (%.0f/s), lag %d", sorted(self._tasks),
                             self.commands_processed, rate, self._lag())
                    report_s, reported = now_s, self.commands_processed
        finally:
            self._flush_state()
            self._consumer.close()  # leaves the group so the partitions move at once
            self._restore_consumer.close()
            self._store.close()
            log.info("instance %s stopped after %d commands", self.config.instance_id, self.commands_processed)

    # -- the batch: one Kafka transaction ----------------------------------------------------

    def _process_batch(self, records: list) -> None:
        producer = self._producer
        produce = producer.produce
        events_topic, commands_topic = self.settings.events_topic, self.settings.commands_topic
        outcomes_topic = self.settings.outcomes_topic
        tasks = self._tasks
        owner_partition = self._owner_partition
        next_offsets: dict[int, int] = {}
        # Events are produced after the loop so that the last one of each partition can carry
        # the batch's only delivery callback: its offset is the snapshot's checkpoint.
        events: list[tuple[int, str, bytes]] = []
        producer.begin_transaction()
        for record in records:
            if record.error() is not None:
                if record.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", record.error())
                continue
            partition = record.partition()
            task = tasks[partition]
            next_offsets[partition] = record.offset() + 1
            timestamp_type, record_time_ms = record.timestamp()
            if timestamp_type != TIMESTAMP_LOG_APPEND_TIME:
                # The time that decides must be the broker's: a producer's CreateTime would let
                # clients move the partition's clock (and with it the idempotency window).
                raise RuntimeError(f"{record.topic()}[{partition}]@{record.offset()} has timestamp type "
                                   f"{timestamp_type}, not LogAppendTime: create {self.settings.commands_topic} with "
                                   f"message.timestamp.type=LogAppendTime (wallet topics create)")
            try:
                command = decode_command(record.value())
            except SchemaError as schema_error:
                self._dead_letter(record, str(schema_error), dead_letter_outcome(record.value(), Reason.INVALID_COMMAND))
                continue
            owner = getattr(command, command.owner_field)
            if owner_partition(owner) != partition:
                self._dead_letter(record, f"command for account {owner!r} arrived on partition {partition}, but the "
                                          f"account belongs to partition {owner_partition(owner)}: its producer "
                                          f"does not use the murmur2 partitioner",
                                  dead_letter_outcome(record.value(), Reason.WRONG_PARTITION, command))
                continue
            if type(command) in LEG_COMMANDS:
                refused = self._keyring.verify(command)
                if refused is not None:
                    self._dead_letter(record, refused)
                    continue
            try:
                decision = apply(task.state, command, record_time_ms)
            except UndecidableInput as undecidable:
                # The core raises before folding anything, so the state is untouched; any other
                # exception is a bug and stops the processor before this batch commits.
                self._dead_letter(record, f"the state machine cannot decide it: {undecidable}")
                continue
            changed_accounts, changed_memory = task.changes.accounts, task.changes.memory_keys
            for event in decision.events:
                account_id = event.account_id
                events.append((partition, account_id, encode(event)))
                if type(event) is not CommandRejected:
                    changed_accounts.add(account_id)
                changed_memory.add((account_id, event.transaction_id))
            for leg in decision.follow_ups:
                value, key = encode(self._keyring.sign(leg)), getattr(leg, leg.owner_field)
                try:
                    produce(commands_topic, value, key)
                except BufferError:
                    self._produce_when_room(commands_topic, value, key, None)
            outcome = decision.outcome
            if outcome is not None:
                value = encode(outcome)
                try:
                    produce(outcomes_topic, value, outcome.transaction_id)
                except BufferError:
                    self._produce_when_room(outcomes_topic, value, outcome.transaction_id, None)
        delivered: dict[int, int] = {}
        last_index = {partition: index for index, (partition, _, _) in enumerate(events)}
        def checkpoint_on_delivery(error, message) -> None:
            if error is None:
                delivered[message.partition()] = message.offset() + 1

        for index, (partition, key, value) in enumerate(events):
            on_delivery = checkpoint_on_delivery if last_index[partition] == index else None
            try:
                produce(events_topic, value, key, partition, on_delivery=on_delivery)
            except BufferError:
                self._produce_when_room(events_topic, value, key, partition, on_delivery)
        self.commands_processed += len(records)
        if not next_offsets:
            producer.abort_transaction(KAFKA_CALL_TIMEOUT_S)
            return
        offsets = [TopicPartition(commands_topic, partition, offset) for partition, offset in next_offsets.items()]
        if not self._commit(offsets):
            self._recover("the batch's transaction did not commit")
            return
        for partition, events_offset in delivered.items():
            tasks[partition].events_offset = events_offset

    def _produce_when_room(self, topic: str, value: bytes, key, partition: int | None, on_delivery=None) -> None:
        """The local queue is full: serve deliveries until there is room, never drop."""
        deadline_s = time.monotonic() + PRODUCE_QUEUE_FULL_WAIT_S
        while True:
            self._producer.poll(0.05)
            try:
                if partition is None:
                    self._producer.produce(topic, value, key, on_delivery=on_delivery)
                else:
                    self._producer.produce(topic, value, key, partition, on_delivery=on_delivery)
                return
            except BufferError:
                if time.monotonic() > deadline_s:
                    raise RuntimeError(f"producer queue stayed full for {PRODUCE_QUEUE_FULL_WAIT_S:.0f} s: "
                                       f"is the broker reachable?") from None

    def _dead_letter(self, record, error: str, outcome=None) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic(), record.partition(), record.offset(), error)
        headers = [("error", error.encode()), ("source_topic", record.topic().encode()),
                   ("source_partition", str(record.partition()).encode()),
                   ("source_offset", str(record.offset()).encode())]
        try:
            self._producer.produce(self.settings.dlq_topic, record.value(), record.key(), headers=headers)
        except BufferError:
            self._producer.flush(PRODUCE_QUEUE_FULL_WAIT_S)
            self._producer.produce(self.settings.dlq_topic, record.value(), record.key(), headers=headers)
        if outcome is not None:
            # The client that sent it would otherwise wait `pending` forever.
            value = encode(outcome)
            try:
                self._producer.produce(self.settings.outcomes_topic, value, outcome.transaction_id)
            except BufferError:
                self._produce_when_room(self.settings.outcomes_topic, value, outcome.transaction_id, None)

    def _commit(self, offsets: list[TopicPartition]) -> bool:
        producer = self._producer
        try:
            producer.send_offsets_to_transaction(offsets, self._consumer.consumer_group_metadata(), KAFKA_CALL_TIMEOUT_S)
            for attempt in range(COMMIT_RETRIES_MAX):
                try:
                    producer.commit_transaction(KAFKA_CALL_TIMEOUT_S)
                    return True
                except KafkaException as error:
                    if not error.args[0].retriable() or attempt == COMMIT_RETRIES_MAX - 1:
                        raise
                    log.warning("commit failed, retrying: %s", error)
        except KafkaException as error:
            log.error("transaction failed: %s", error)
            if error.args[0].txn_requires_abort():
                try:
                    producer.abort_transaction(KAFKA_CALL_TIMEOUT_S)
                except KafkaException as abort_error:
                    log.error("abort failed too: %s", abort_error)
        return False

    def _recover(self, why: str) -> None:
        """Replaces the producer and rebuilds every owned partition from snapshot + log."""
        log.warning("recovering: %s; replacing the producer and rebuilding partitions %s", why, sorted(self._tasks))
        self._producer.flush(0)
        self._producer = self._new_producer()
        partitions = sorted(self._tasks)
        self._tasks.clear()
        self._restore(partitions)
        committed = self._consumer.committed(
            [TopicPartition(self.settings.commands_topic, p) for p in partitions], timeout=KAFKA_CALL_TIMEOUT_S)
        for topic_partition in committed:
            if topic_partition.offset < 0:
                # Nothing committed yet: the failed batch was the partition's first.
                topic_partition.offset = OFFSET_BEGINNING
            self._consumer.seek(topic_partition)

    def _new_producer(self) -> Producer:
        producer = Producer(processor_producer_config(self.settings.bootstrap, self.transactional_id,
                                                      self.config.transaction_timeout_ms))
        # Fences any earlier producer with this transactional id and settles its open transaction.
        producer.init_transactions(KAFKA_CALL_TIMEOUT_S)
        return producer

    # -- partitions: restore on assignment, drop on revocation -------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        # Waits until no transaction that wrote these partitions' offsets is still open, so the
        # events read next are all that will ever belong before our first command.
        consumer.committed(partitions, timeout=KAFKA_CALL_TIMEOUT_S)
        self._restore(numbers)
        # The restored state is long-lived: keep the cyclic collector from re-scanning it.
        gc.freeze()
        log.info("assigned partitions %s; now owning %s", numbers, sorted(self._tasks))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        for number in numbers:
            task = self._tasks.pop(number, None)
            if task is not None:
                self._save(task)
        log.info("revoked partitions %s; now owning %s", numbers, sorted(self._tasks))

    def _restore(self, partitions: list[int]) -> None:
        loaded = {p: self._store.load(p) for p in partitions}
        tails = {p: (state, checkpoint.events_offset) for p, (state, checkpoint) in loaded.items()}
        ends = fold_event_tail(self._restore_consumer, self.settings.events_topic, tails, self.config.restore_timeout_s)
        for partition, (state, checkpoint) in loaded.items():
            task = _Task(partition, state, checkpoint, ends[partition])
            if ends[partition] != checkpoint.events_offset:
                # The tail folded from the log is not in the snapshot yet; which keys it touched
                # is not tracked, so the next save writes them all.
                task.changes.accounts.update(state.accounts)
                task.changes.memory_keys.update(state.memory)
            self._tasks[partition] = task

    # -- the snapshot ------------------------------------------------------------------------

    def _flush_state(self) -> None:
        for task in self._tasks.values():
            self._save(task)
        self._last_flush_s = time.monotonic()

    def _save(self, task: _Task) -> None:
        if task.events_offset == task.checkpoint.events_offset:
            return
        task.checkpoint.events_offset = task.events_offset
        self._store.save(task.partition, task.state, task.changes, task.checkpoint)
        task.changes = PartitionChanges()
        horizon_ms = memory_horizon_ms(task.state.clock_ms)
        if horizon_ms != task.segments_dropped_at_horizon_ms:
            self._store.drop_expired_segments(task.partition, task.state.clock_ms)
            task.segments_dropped_at_horizon_ms = horizon_ms

    # -- observability -----------------------------------------------------------------------

    def _check_topics(self) -> int:
        metadata = self._consumer.list_topics(timeout=KAFKA_CALL_TIMEOUT_S)
        counts = {}
        for topic in (self.settings.commands_topic, self.settings.events_topic):
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise RuntimeError(f"topic {topic} does not exist: run `wallet topics create` first")
            counts[topic] = len(found.partitions)
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"commands and events topics must have the same partition count: {counts}")
        return counts[self.settings.commands_topic]

    def _lag(self) -> int:
        lag = 0
        for partition in self._tasks:
            tp = TopicPartition(self.settings.commands_topic, partition)
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                position = self._consumer.position([tp])[0].offset
            except KafkaException:
                continue
            if high >= 0 and position >= 0:
                lag += high - position
        return lag
