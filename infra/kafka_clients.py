"""librdkafka settings of the processor's clients, in one place with the reason for each."""
from __future__ import annotations

from schemas.partitioning import KAFKA_PARTITIONER


def processor_consumer_config(bootstrap: str, group_id: str, instance_id: str) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "client.id": f"{group_id}-{instance_id}",
        # Only records of committed transactions: a leg from an aborted batch must never move money.
        "isolation.level": "read_committed",
        # Offsets are committed inside the producer's transaction, never by the consumer.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Static membership: a restarted instance (same id) takes its partitions straight back
        # instead of waiting for the group to notice the old member is gone.
        "group.instance.id": f"{group_id}-{instance_id}",
        "partition.assignment.strategy": "range",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 60000,
        "fetch.wait.max.ms": 10,
        "queued.max.messages.kbytes": 262144,
    }


def processor_producer_config(bootstrap: str, transactional_id: str, transaction_timeout_ms: int) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        "transactional.id": transactional_id,
        "client.id": transactional_id,
        "partitioner": KAFKA_PARTITIONER,
        # A dead instance's open transaction blocks readers of its partitions until the
        # coordinator aborts it: keep that stall short.
        "transaction.timeout.ms": transaction_timeout_ms,
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }


def restore_consumer_config(bootstrap: str, group_id: str, instance_id: str) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        # Never subscribes or commits; librdkafka wants a group id all the same.
        "group.id": f"{group_id}-restore-{instance_id}",
        "client.id": f"{group_id}-restore-{instance_id}",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
    }
