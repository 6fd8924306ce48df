"""The one place that hands a record to librdkafka's local queue and waits when it is full.

librdkafka raises `BufferError` when its queue (`queue.buffering.max.messages`/`.kbytes`) is
full; the cure is always the same: serve delivery reports (`poll`) until there is room. Every
producer of the project calls `produce_with_room`, so the bound and the message exist once
(the spirit of quixstreams' `kafka/producer.py` and Kafka Streams' `StreamsProducer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

QUEUE_FULL_WAIT_MS_DEFAULT = 30_000
_POLL_WHILE_FULL_S = 0.05
_ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA

Headers = list[tuple[str, str | bytes | None]]


class QueueFullTimeout(RuntimeError):
    """The local produce queue stayed full for the whole bound: the broker is gone or far behind."""


def produce_with_room(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | str | None = None,
    partition: int | None = None,
    on_delivery: Callable[..., Any] | None = None,
    headers: Headers | None = None,
    timestamp_ms: int = 0,
    queue_full_wait_ms: int = QUEUE_FULL_WAIT_MS_DEFAULT,
) -> None:
    """`producer.produce(...)`, waiting at most `queue_full_wait_ms` for room in the local queue.

    `timestamp_ms` 0 lets the client stamp the record (a topic with LogAppendTime ignores it anyway).
    """
    # Positional arguments (partition -1 = "let the partitioner choose"): this is the hot path of
    # every producer in the project, and building keyword arguments costs microseconds a record.
    placed = _ANY_PARTITION if partition is None else partition
    try:
        if headers is None and not timestamp_ms:
            producer.produce(topic, value, key, placed, on_delivery)
        else:
            producer.produce(topic, value, key, placed, on_delivery, headers=headers, timestamp=timestamp_ms)
        return
    except BufferError:
        pass
    deadline_s = time.monotonic() + queue_full_wait_ms / 1000
    while True:
        producer.poll(_POLL_WHILE_FULL_S)
        try:
            producer.produce(topic, value, key, placed, on_delivery, headers=headers, timestamp=timestamp_ms)
            return
        except BufferError:
            if time.monotonic() >= deadline_s:
                raise QueueFullTimeout(
                    f"the local produce queue ({len(producer)} records) stayed full for {queue_full_wait_ms} ms "
                    f"while producing to {topic}: the broker is unreachable or not keeping up"
                ) from None
