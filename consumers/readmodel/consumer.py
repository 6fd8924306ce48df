"""`wallet readmodel`: `wallet.events` and `wallet.outcomes` into the read model's database, exactly once.

The consumer belongs to no consumer group: it assigns itself every partition of both topics
(or, as shard I of N, those p with p % N == I) at the offsets stored in the database, and each
polled batch is written together with the offsets it ends at in one database transaction.
Whatever instant the process dies at, the tables hold a prefix of every partition and the
restart continues from exactly there. Only committed Kafka transactions are read (read_committed).

Shards: several processes, each owning its own partitions, write one PostgreSQL database at
once (the store keeps the rows two shards share, a transfer's request, free of lost updates).
Each process claims its partitions in the database when it starts, so a second process of the
same partitions is refused at once. SQLite has one writer at a time: a single shard only.

Crash-only: a database failure, a corrupt log or a second writer stops the consumer with an
error; restarting it (by hand or by its supervisor) resumes from the stored offsets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from confluent_kafka import OFFSET_BEGINNING, Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from consumers.readmodel.store import Batch, ReadModelStore, TopicPartitionKey, describe_db_url
from infra.kafka_clients import FAILOVER_TUNING, kafka_security
from infra.settings import Settings
from schemas.codec import SchemaError, decode_event, decode_outcome
from schemas.partitioning import partition_for

if TYPE_CHECKING:
    from consumers.readmodel.metrics import ReadModelMetrics

log = logging.getLogger("wallet.readmodel")

BATCH_SIZE_MAX_DEFAULT = 5_000
BATCH_WAIT_MS_DEFAULT = 100
KAFKA_TIMEOUT_S = 30
STATUS_INTERVAL_S = 10.0


class ReadModelError(RuntimeError):
    """The read model cannot continue without a person deciding: a corrupt log, a foreign database."""


@dataclass(frozen=True, slots=True)
class Shard:
    """The partitions one read-model process owns: every p of both topics with p % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: want 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` as the operator types it (the command line: outside input, checked here)."""
        index, slash, count = text.partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"shard {text!r}: want I/N, for example 0/2")
        return cls(int(index), int(count))

    def owns(self, partition: int) -> bool:
        return partition % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def consumer_config(settings: Settings) -> dict:
    return {
        **kafka_security("readmodel"),
        **FAILOVER_TUNING,
        "bootstrap.servers": settings.bootstrap,
        # Never joins or commits: offsets live in the database. librdkafka wants a group id all the same.
        "group.id": f"{settings.topic_prefix}wallet-readmodel",
        "client.id": f"{settings.topic_prefix}wallet-readmodel",
        # A batch of an aborted processor transaction must never reach a balance.
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # End-of-partition events carry the offset past the last transaction marker, which is
        # where a caught-up read model's stored offset must be for its lag to read 0.
        "enable.partition.eof": True,
        # A stored offset outside the log means the topic was recreated: replaying from
        # anywhere would be a guess, so it is an error (rebuild the read model instead).
        "auto.offset.reset": "error",
        "fetch.wait.max.ms": 10,
        "queued.max.messages.kbytes": 65_536,
    }


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    next_offset: int | None  # stored in the read model; None: nothing read yet
    end_offset: int  # last stable offset: the end a read_committed reader can reach now
    lag: int


def partition_counts(admin_or_consumer: AdminClient | Consumer, topics: list[str], timeout_s: float) -> dict[str, int]:
    metadata = admin_or_consumer.list_topics(timeout=timeout_s)
    missing = [topic for topic in topics if topic not in metadata.topics or metadata.topics[topic].error is not None]
    if missing:
        raise ReadModelError(f"topics {missing} do not exist at the broker; create them with `wallet topics create`")
    return {topic: len(metadata.topics[topic].partitions) for topic in topics}


def end_offsets(
    admin: AdminClient, settings: Settings, timeout_s: float = KAFKA_TIMEOUT_S
) -> dict[TopicPartitionKey, int]:
    """The last stable offset of every partition of both topics, in one request."""
    topics = [settings.events_topic, settings.outcomes_topic]
    counts = partition_counts(admin, topics, timeout_s)
    request = {
        TopicPartition(topic, partition): OffsetSpec.latest() for topic in topics for partition in range(counts[topic])
    }
    futures = admin.list_offsets(request, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout_s)
    return {(tp.topic, tp.partition): future.result(timeout=timeout_s).offset for tp, future in futures.items()}


def read_lag(
    admin: AdminClient, settings: Settings, stored: dict[TopicPartitionKey, int], timeout_s: float = KAFKA_TIMEOUT_S
) -> list[PartitionLag]:
    lags = []
    for (topic, partition), end_offset in sorted(end_offsets(admin, settings, timeout_s).items()):
        next_offset = stored.get((topic, partition))
        lags.append(PartitionLag(topic, partition, next_offset, end_offset, max(0, end_offset - (next_offset or 0))))
    return lags


class ReadModelConsumer:
    """Reads batches from Kafka and applies each, with its offsets, in one database transaction."""

    def __init__(
        self,
        store: ReadModelStore,
        settings: Settings,
        batch_size_max: int = BATCH_SIZE_MAX_DEFAULT,
        batch_wait_ms: int = BATCH_WAIT_MS_DEFAULT,
        metrics: ReadModelMetrics | None = None,
        shard: Shard = Shard(),
    ) -> None:
        if batch_size_max < 1 or batch_wait_ms < 1:
            raise ValueError(f"batch size ({batch_size_max}) and batch wait ({batch_wait_ms} ms) must be >= 1")
        self._store = store
        self._settings = settings
        self._batch_size_max = batch_size_max
        self._batch_wait_s = batch_wait_ms / 1000
        self._consumer: Consumer | None = None
        self._next_offsets: dict[TopicPartitionKey, int | None] = {}
        self._metrics = metrics
        self._shard = shard
        self._event_partition_count = 0

    @property
    def next_offsets(self) -> dict[TopicPartitionKey, int | None]:
        """Per partition, the next offset to apply (= the stored one)."""
        return dict(self._next_offsets)

    def owns_account(self, account_id: str) -> bool:
        """Whether the account's events are on a partition of this shard (after `start()`)."""
        return self._shard.owns(partition_for(account_id, self._event_partition_count))

    def start(self) -> None:
        topics = [self._settings.events_topic, self._settings.outcomes_topic]
        if self._shard.count > 1 and not self._store.takes_shards:
            raise ReadModelError(
                f"shard {self._shard}: {self._store.db_url} is SQLite, which has one writer at a time; "
                "several shards need PostgreSQL (or run one read model, --shard 0/1)"
            )
        stored = self._store.offsets()
        foreign = sorted({topic for topic, _ in stored} - set(topics))
        if foreign:
            raise ReadModelError(
                f"the database {self._store.db_url} holds the read model of other topics {foreign}; "
                f"give each topic prefix its own database"
            )
        self._consumer = Consumer(consumer_config(self._settings), logger=log)
        counts = partition_counts(self._consumer, topics, KAFKA_TIMEOUT_S)
        self._event_partition_count = counts[self._settings.events_topic]
        self._next_offsets = {
            (topic, partition): stored.get((topic, partition))
            for topic in topics
            for partition in range(counts[topic])
            if self._shard.owns(partition)
        }
        if not self._next_offsets:
            raise ReadModelError(f"shard {self._shard} owns no partition: the topics have {counts} partitions")
        # Before reading anything: a second process of these partitions stops here, not at its first batch.
        try:
            self._store.claim(sorted(self._next_offsets))
        except BaseException:
            self._consumer.close()
            self._consumer = None
            raise
        self._consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING if offset is None else offset)
                for (topic, partition), offset in self._next_offsets.items()
            ]
        )
        log.info(
            "shard %s: reading %s and %s (%d partitions) into %s from %d stored offsets",
            self._shard,
            *topics,
            len(self._next_offsets),
            describe_db_url(self._store.db_url),
            sum(offset is not None for offset in self._next_offsets.values()),
        )

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
            self._store.release(sorted(self._next_offsets))

    def step(self) -> int:
        """Polls one batch (at most `batch_size_max` records, waiting at most `batch_wait_ms`)
        and applies it; returns the number of records applied."""
        if self._consumer is None:
            raise RuntimeError("start() the consumer first")
        batch = Batch()
        events_topic = self._settings.events_topic
        for message in self._consumer.consume(self._batch_size_max, self._batch_wait_s):
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                self._raise_or_log(error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            # A record, like a partition-EOF event, names its topic, partition and offset.
            assert topic is not None and partition is not None and offset is not None
            key = (topic, partition)
            if error is not None:  # the end of a partition
                batch.offsets_after[key] = max(batch.offsets_after.get(key, 0), offset)
                continue
            value = message.value()
            # The processor writes no tombstones; decoding None would raise TypeError all the same.
            assert value is not None
            try:
                if topic == events_topic:
                    batch.events.append(decode_event(value))
                else:
                    batch.outcomes.append(decode_outcome(value))
            except SchemaError as schema_error:
                raise ReadModelError(
                    f"{topic}[{partition}] offset {offset}: {schema_error}; "
                    "the processor never writes such a record, so the log is corrupt"
                ) from None
            batch.offsets_after[key] = offset + 1
        for key in [key for key, offset in batch.offsets_after.items() if offset == self._next_offsets[key]]:
            del batch.offsets_after[key]  # an end-of-partition where we already are: nothing to store
        if not batch.offsets_after:
            return 0
        batch.offsets_before = {key: self._next_offsets[key] for key in batch.offsets_after}
        started_s = time.perf_counter()
        self._store.apply(batch)
        if self._metrics is not None:
            self._metrics.applied(batch, time.perf_counter() - started_s)
        self._next_offsets.update(batch.offsets_after)
        return batch.record_count

    @staticmethod
    def _raise_or_log(error: KafkaError) -> None:
        if error.code() == KafkaError._AUTO_OFFSET_RESET:
            raise ReadModelError(
                f"a stored offset is outside the log ({error.str()}): the topic was recreated or "
                "truncated; run `wallet readmodel rebuild`"
            )
        if error.fatal():
            raise KafkaException(error)
        # Transient (a broker restart, a network blip): librdkafka retries by itself.
        log.warning("kafka: %s", error.str())


def run(
    store: ReadModelStore,
    settings: Settings,
    stop_requested: Callable[[], bool],
    batch_size_max: int = BATCH_SIZE_MAX_DEFAULT,
    batch_wait_ms: int = BATCH_WAIT_MS_DEFAULT,
    metrics: ReadModelMetrics | None = None,
    shard: Shard = Shard(),
) -> int:
    """Consumes until `stop_requested()` is true between two batches; returns the records applied."""
    store.create_schema()
    consumer = ReadModelConsumer(store, settings, batch_size_max, batch_wait_ms, metrics, shard)
    consumer.start()
    if metrics is not None:
        from infra.admin import admin_client

        # A shard's share: the entries of its own accounts (debits add, credits and refunds take away).
        metrics.start_in_flight(store.transfers_in_flight(None if shard.count == 1 else consumer.owns_account))
        metrics.watch_lag(admin_client(settings.bootstrap, role="readmodel"), settings, lambda: consumer.next_offsets)
    applied_total = applied_since_status = 0
    status_at_s = time.monotonic()
    try:
        while not stop_requested():
            applied = consumer.step()
            applied_total += applied
            applied_since_status += applied
            now_s = time.monotonic()
            if now_s - status_at_s >= STATUS_INTERVAL_S:
                if applied_since_status:
                    log.info(
                        "applied %d records (%.0f/s)",
                        applied_since_status,
                        applied_since_status / (now_s - status_at_s),
                    )
                applied_since_status, status_at_s = 0, now_s
    finally:
        consumer.close()
    log.info("stopped after applying %d records", applied_total)
    return applied_total
