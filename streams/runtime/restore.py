"""Bringing a partition's state level with `wallet.events` before any command is processed."""
from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas.codec import decode_event
from streams.core.state import State, fold

log = logging.getLogger("wallet.processor")

RESTORE_BATCH_SIZE_MAX = 10_000
RESTORE_PROGRESS_INTERVAL_S = 2.0


class RestoreTimeout(RuntimeError):
    pass


def fold_event_tail(consumer: Consumer, events_topic: str, tails: dict[int, tuple[State, int]],
                    timeout_s: float) -> dict[int, int]:
    """Folds each partition's events from its offset to the current end (read_committed).

    `tails` maps partition -> (state, first offset not yet folded); returns partition -> the
    next offset after the last event folded. Raises RestoreTimeout if the end is not reached
    within `timeout_s`, since processing on a state that is behind would decide wrongly.
    """
    if not tails:
        return {}
    next_offsets = {partition: offset for partition, (_, offset) in tails.items()}
    consumer.assign([TopicPartition(events_topic, partition, offset) for partition, offset in next_offsets.items()])
    remaining = set(tails)
    started_s = last_report_s = time.monotonic()
    folded = 0
    try:
        while remaining:
            now_s = time.monotonic()
            if now_s - started_s > timeout_s:
                raise RestoreTimeout(f"restore of {events_topic} partitions {sorted(remaining)} did not reach the end "
                                     f"within {timeout_s:.0f} s ({folded} events folded)")
            if now_s - last_report_s >= RESTORE_PROGRESS_INTERVAL_S:
                log.info("restoring partitions %s: %d events folded (%.0f/s)", sorted(remaining), folded,
                         folded / (now_s - started_s))
                last_report_s = now_s
            for record in consumer.consume(num_messages=RESTORE_BATCH_SIZE_MAX, timeout=0.5):
                error = record.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(record.partition())
                        continue
                    raise KafkaException(error)
                partition = record.partition()
                fold(tails[partition][0], decode_event(record.value()))
                next_offsets[partition] = record.offset() + 1
                folded += 1
    finally:
        consumer.unassign()
    if folded:
        elapsed_s = max(time.monotonic() - started_s, 1e-6)
        log.info("restored partitions %s: %d events folded in %.1f s", sorted(tails), folded, elapsed_s)
    return next_offsets
