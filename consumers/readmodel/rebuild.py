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
from consumers.readmodel.store import ReadModelStore
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
    store.drop_schema()
    store.create_schema()
    consumer = ReadModelConsumer(store, settings, batch_size_max, REBUILD_BATCH_WAIT_MS)
    consumer.start()
    records = reached = 0
    total = sum(targets.values())
    try:
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
                    break
                records += consumer.step()
    finally:
        consumer.close()
    return RebuildReport(records, reached, time.monotonic() - started_s)
