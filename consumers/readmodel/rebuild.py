"""`wallet readmodel rebuild`: drop the read model and replay both topics from their first offset.

The replay is the live consumer's own batch path on an empty database, so a rebuilt read
model is the live one by construction; it stops once every partition has reached the end
it had when the rebuild began. Stop the live consumer of that database first: if it is
still running, one of the two stops with a ConcurrentWriterError rather than both writing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from consumers.readmodel.consumer import (
    BATCH_SIZE_MAX_DEFAULT,
    KAFKA_TIMEOUT_S,
    ReadModelConsumer,
    ReadModelError,
    end_offsets,
)
from consumers.readmodel.store import ReadModelStore, TopicPartitionKey
from infra.admin import admin_client
from infra.settings import Settings

# A replay that reads nothing for this long is stuck (a broker gone, an open transaction
# that never ends), not slow.
STALL_TIMEOUT_S = 60.0
REBUILD_BATCH_WAIT_MS = 200


@dataclass(frozen=True, slots=True)
class RebuildReport:
    records: int
    offsets: int  # records plus the transaction markers and aborted records passed over
    elapsed_s: float


def rebuild(
    store: ReadModelStore,
    settings: Settings,
    batch_size_max: int = BATCH_SIZE_MAX_DEFAULT,
    show_progress: bool = True,
    stall_timeout_s: float = STALL_TIMEOUT_S,
) -> RebuildReport:
    started_s = time.monotonic()
    targets = end_offsets(admin_client(settings.bootstrap, role="readmodel"), settings, KAFKA_TIMEOUT_S)
    # Every partition claimed before anything is dropped: a consumer still writing this database
    # (PostgreSQL) refuses the rebuild with the tables intact. The consumer below claims them
    # again on the same connection, which the session's locks allow.
    store.claim(sorted(targets))
    try:
        store.drop_schema()
        store.create_schema()
        consumer = ReadModelConsumer(store, settings, batch_size_max, REBUILD_BATCH_WAIT_MS)
        consumer.start()
        try:
            records, reached = _replay(consumer, targets, show_progress, stall_timeout_s)
        finally:
            consumer.close()
    finally:
        store.release(sorted(targets))
    return RebuildReport(records, reached, time.monotonic() - started_s)


def _replay(
    consumer: ReadModelConsumer, targets: dict[TopicPartitionKey, int], show_progress: bool, stall_timeout_s: float
) -> tuple[int, int]:
    """Steps the consumer until it reaches every target offset: (records applied, offsets reached)."""
    records = reached = 0
    total = sum(targets.values())
    with tqdm(total=total, unit="offset", unit_scale=True, disable=not show_progress, desc="rebuild") as progress:
        progressed_s = time.monotonic()
        while True:
            offsets = consumer.next_offsets
            now_reached = sum(min(offsets.get(key) or 0, end) for key, end in targets.items())
            now_s = time.monotonic()
            if now_reached > reached:
                progress.update(now_reached - reached)
                reached, progressed_s = now_reached, now_s
            elif now_s - progressed_s > stall_timeout_s:
                raise ReadModelError(
                    f"rebuild made no progress for {stall_timeout_s:.0f} s; partitions behind their end: "
                    + ", ".join(
                        f"{topic}[{partition}] at {offsets.get((topic, partition)) or 0} of {end}"
                        for (topic, partition), end in sorted(targets.items())
                        if (offsets.get((topic, partition)) or 0) < end
                    )
                )
            if reached == total:
                return records, reached
            records += consumer.step()
