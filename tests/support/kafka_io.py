"""Test-side Kafka I/O: publish commands as a client would, read whole topics back."""

from __future__ import annotations

import time
from typing import NamedTuple

from confluent_kafka import Consumer, Producer, TopicPartition

from infra import log_reader
from infra.kafka_clients import FAILOVER_TUNING, kafka_security
from infra.produce import produce_with_room
from infra.settings import Settings
from schemas.codec import encode
from schemas.commands import Command, owner_account
from schemas.partitioning import KAFKA_PARTITIONER

READ_TIMEOUT_S = 60.0


def command_producer(settings: Settings) -> Producer:
    return Producer(
        {
            **kafka_security("admin"),
            **FAILOVER_TUNING,
            "bootstrap.servers": settings.bootstrap,
            "partitioner": KAFKA_PARTITIONER,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )


def publish(producer: Producer, settings: Settings, commands: list[Command]) -> None:
    for command in commands:
        produce_with_room(producer, settings.commands_topic, encode(command), owner_account(command))
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} commands were not delivered within 30 s"


class LoggedRecord(NamedTuple):
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_topic(settings: Settings, topic: str, timeout_s: float = READ_TIMEOUT_S) -> list[LoggedRecord]:
    """Every committed record of `topic`, from offset 0 to the current end, in partition order
    (read by the audit's reader, which sees exactly what a read_committed processor sees)."""
    log = log_reader.read_topic(settings.bootstrap, topic, with_headers=True, timeout_s=timeout_s)
    records: list[LoggedRecord] = []
    for number, partition in sorted(log.partitions.items()):
        assert partition.headers is not None  # read with_headers
        records += [
            LoggedRecord(number, offset, key, value, dict(headers or ()))
            for offset, key, value, headers in zip(
                partition.offsets, partition.keys, partition.values, partition.headers, strict=True
            )
        ]
    return records


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Polls `predicate` until it returns something truthy; fails naming `what` on timeout."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)


class OutcomeCollector:
    """Reads wallet.outcomes (read_committed) from the start and keeps every outcome by transaction id."""

    def __init__(self, settings: Settings) -> None:
        from schemas.codec import decode_outcome

        self._decode = decode_outcome
        self._consumer = Consumer(
            {
                **kafka_security("admin"),
                "bootstrap.servers": settings.bootstrap,
                "group.id": "test-outcomes",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
        )
        topic = settings.outcomes_topic
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self.by_transaction: dict[str, list] = {}

    def poll(self, timeout_s: float = 0.2) -> None:
        for record in self._consumer.consume(10_000, timeout_s):
            if record.error() is None:
                value = record.value()
                assert value is not None  # wallet.outcomes has no tombstones
                outcome = self._decode(value)
                self.by_transaction.setdefault(outcome.transaction_id, []).append(outcome)

    def wait(self, transaction_id: str, count: int = 1, timeout_s: float = 30.0) -> list:
        """The outcomes of `transaction_id` once at least `count` have arrived."""

        def arrived():
            self.poll()
            found = self.by_transaction.get(transaction_id, [])
            return found if len(found) >= count else None

        return wait_for(arrived, timeout_s, f"{count} outcome(s) of {transaction_id}", interval_s=0)

    def wait_all(self, transaction_ids, timeout_s: float = 60.0) -> None:
        missing = set(transaction_ids)

        def arrived():
            self.poll()
            missing.difference_update(self.by_transaction)
            return not missing

        wait_for(
            arrived, timeout_s, f"outcomes of {len(missing)} transactions (e.g. {sorted(missing)[:3]})", interval_s=0
        )

    def close(self) -> None:
        self._consumer.close()
