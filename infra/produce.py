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


class QueueFullTimeout(RuntimeError):
    """The local produce queue stayed full for the whole bound: the broker is gone or far behind."""


def produce_with_room(producer: Producer, topic: str, value: bytes | None, key: bytes | str | None = None,
                      partition: int | None = None, on_delivery: Callable[..., Any] | None = None,
                      headers: list[tuple[str, bytes]] | None = None,
                      queue_full_wait_ms: int = QUEUE_FULL_WAIT_MS_DEFAULT) -> None:
    """`producer.produce(...)`, waiting at most `queue_full_wait_ms` for room in the local queue."""
    arguments: dict[str, Any] = {}
    if partition is not None:
        arguments["partition"] = partition
    if on_delivery is not None:
        arguments["on_delivery"] = on_delivery
    if headers is not None:
        arguments["headers"] = headers
    try:
        producer.produce(topic, value, key, **arguments)
        return
    except BufferError:
        pass
    deadline_s = time.monotonic() + queue_full_wait_ms / 1000
    while True:
        producer.poll(_POLL_WHILE_FULL_S)
        try:
            producer.produce(topic, value, key, **arguments)
            return
        except BufferError:
            if time.monotonic() >= deadline_s:
                raise QueueFullTimeout(
                    f"the local produce queue ({len(producer)} records) stayed full for {queue_full_wait_ms} ms "
                    f"while producing to {topic}: the broker is unreachable or not keeping up") from None
