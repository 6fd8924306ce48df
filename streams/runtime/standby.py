"""A standby replica: a warm copy of the partitions a processor does not own, so that taking
one over folds only the tail of `wallet.events` since the copy, not the partition's history.

A processor started with standby on (`wallet processor --standby`) runs one `Standby`: its own
read_committed consumer of `wallet.events`, assigned (never in a group) every partition the
processor does not own, and a thread that folds each fetched batch into that partition's state
with `fold(state, decode_event(value))`, exactly as the restore does. A partition starts from
the processor's own snapshot of it (`StateStore.load`, else empty at offset 0) or, when it was
just revoked from this processor, from the revoked task's committed state and events offset.

On assignment the processor `take`s a partition: the standby stops following it and gives up
its reference, and the state becomes the task's; the restore then folds only the tail from the
standby's offset to the stable end (`restore.fold_event_tail` after `restore.stable_ends`).

Why the taken state is the state a restore would have built: the standby's state is the fold,
in log order, of the same committed events of the partition (read_committed: an aborted
transaction's events are never seen, an open one's not yet) from a state that was itself such a
fold (a snapshot of committed state, a committed task, or empty at offset 0), and `fold` is a
pure function of the state and the event. Folding [0, a) then [a, b) is folding [0, b), so
after the tail fold the task's state equals what a restore from offset 0 to the same stable end
makes, and the processor decides the same commands the same way either way.

A failure of the standby never stops the processor: a partition whose record cannot be decoded
or folded, or whose fetch reports an error, is dropped (logged) and its takeover falls back to
the snapshot and the log; an exception out of the consumer ends the whole standby likewise. A
failed assertion is a bug, and crashes the processor at its next `take`.

Folding and handing over share one lock. A batch is fetched outside it and folded under it,
and a batch fetched while the followed set changed is dropped and fetched again from the new
positions, so no event is skipped or folded twice; a `take` waits at most one batch's fold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas.codec import decode_event
from streams.core.state import State, fold

log = logging.getLogger("wallet.standby")

STANDBY_BATCH_SIZE_MAX = 1_000  # events folded per hold of the lock: bounds how long a take waits
STANDBY_POLL_S = 0.1
STANDBY_LAG_INTERVAL_S = 1.0
STANDBY_CLOSE_TIMEOUT_S = 10.0


class _Followed:
    __slots__ = ("state", "next_offset")

    def __init__(self, state: State, next_offset: int) -> None:
        self.state = state
        self.next_offset = next_offset  # of wallet.events: the first not folded into `state`


class Standby:
    """Follows partitions of `events_topic` on a thread of its own; `follow` and `take` are called
    from the processor's thread."""

    def __init__(
        self,
        consumer_config: dict,
        events_topic: str,
        *,
        on_folded: Callable[[int], None] | None = None,
        on_lag: Callable[[int, int], None] | None = None,
    ) -> None:
        self._consumer = Consumer(consumer_config)
        self._topic = events_topic
        self._on_folded = on_folded  # events folded by one batch
        self._on_lag = on_lag  # (partitions followed, offsets behind their cached high watermarks)
        self._lock = threading.Lock()
        self._followed: dict[int, _Followed] = {}
        self._reassign = True  # the consumer's assignment is not the followed set's
        self._bug: AssertionError | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="standby", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(STANDBY_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the standby thread did not end within %.0f s", STANDBY_CLOSE_TIMEOUT_S)
            return  # its consumer is still in use: left to the process's exit
        self._consumer.close()

    def follow(self, partition: int, state: State, next_offset: int) -> None:
        """Follows `partition` from `state`, the fold of its events before `next_offset`; the
        standby owns `state` from now on."""
        assert next_offset >= 0, f"partition {partition}: negative events offset {next_offset}"
        with self._lock:
            assert partition not in self._followed, f"partition {partition} is already followed"
            self._followed[partition] = _Followed(state, next_offset)
            self._reassign = True

    def take(self, partition: int) -> tuple[State, int] | None:
        """Stops following `partition` and returns its state and the first events offset not in
        it, or None if it was not followed (never, or dropped after a failure)."""
        with self._lock:
            if self._bug is not None:
                raise self._bug
            followed = self._followed.pop(partition, None)
            if followed is None:
                return None
            self._reassign = True
            return followed.state, followed.next_offset

    def followed(self) -> dict[int, int]:
        """partition -> next events offset, of every partition followed now."""
        with self._lock:
            return {partition: followed.next_offset for partition, followed in self._followed.items()}

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        lag_s = 0.0
        try:
            while not self._stopping.is_set():
                with self._lock:
                    if self._reassign:
                        # assign() replaces every position: what was fetched before is not served.
                        self._consumer.assign(
                            [TopicPartition(self._topic, p, f.next_offset) for p, f in self._followed.items()]
                        )
                        self._reassign = False
                records = self._consumer.consume(num_messages=STANDBY_BATCH_SIZE_MAX, timeout=STANDBY_POLL_S)
                if records:
                    self._fold(records)
                now_s = time.monotonic()
                if self._on_lag is not None and now_s - lag_s >= STANDBY_LAG_INTERVAL_S:
                    self._report_lag()
                    lag_s = now_s
        except AssertionError as error:
            log.exception("the standby failed on a broken invariant; the processor stops at its next takeover")
            with self._lock:
                self._bug = error
                self._followed.clear()
        except Exception:
            log.exception("the standby failed; every takeover restores from the snapshot and the log")
            with self._lock:
                self._followed.clear()
        if self._on_lag is not None:
            self._on_lag(0, 0)

    def _fold(self, records: list) -> None:
        folded = 0
        with self._lock:
            if self._reassign:
                return  # fetched from positions no longer followed: fetched again from the new ones
            for record in records:
                partition = record.partition()
                followed = self._followed.get(partition)
                if followed is None:
                    continue  # dropped by an earlier record of this batch
                error = record.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        self._drop(partition, f"fetch error: {error}")
                    continue
                offset = record.offset()
                assert offset is not None and offset >= followed.next_offset, (
                    f"{self._topic}[{partition}]: offset {offset} fetched after {followed.next_offset}"
                )
                try:
                    fold(followed.state, decode_event(record.value()))
                except AssertionError:
                    raise  # a bug, not a bad record: `_run` keeps it for the next take
                except Exception as failure:
                    # The state may be half-changed: only the snapshot and the log can rebuild it.
                    self._drop(partition, f"offset {offset} not folded: {failure!r}")
                    continue
                followed.next_offset = offset + 1
                folded += 1
        if folded and self._on_folded is not None:
            self._on_folded(folded)

    def _drop(self, partition: int, why: str) -> None:
        log.warning(
            "standby of partition %d stopped (%s); its takeover restores from the snapshot and the log", partition, why
        )
        del self._followed[partition]
        self._reassign = True

    def _report_lag(self) -> None:
        assert self._on_lag is not None
        with self._lock:
            positions = {partition: followed.next_offset for partition, followed in self._followed.items()}
        behind = 0
        for partition, next_offset in positions.items():
            try:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(self._topic, partition), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                behind += max(0, high - next_offset)
        self._on_lag(len(positions), behind)
