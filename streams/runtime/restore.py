"""Bringing a partition's state level with `wallet.events` before any command is processed.

Two steps, in this order:

1. `stable_ends`: wait until no transaction is open on each events partition, i.e. its last
   stable offset (what read_committed readers may see) equals its high watermark (what has
   been written). The previous owner's last commit writes its markers to `__consumer_offsets`
   and to `wallet.events` separately; `Consumer.committed()` waits only for the first. A
   read_committed read ends at the last stable offset *of the moment*, so without this wait a
   restore could end just before the previous owner's last events, while the consumer starts
   after the commands that made them: their effect would be lost from the state.
2. `fold_event_tail`: fold each partition's events from its snapshot's offset until the
   read_committed consumer reports the end, which is then at least that stable end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.codec import decode_event
from streams.core.state import State, fold

log = logging.getLogger("wallet.processor")

RESTORE_BATCH_SIZE_MAX = 10_000
RESTORE_PROGRESS_INTERVAL_S = 2.0
STABLE_END_POLL_INTERVAL_S = 0.02
LIST_OFFSETS_TIMEOUT_S = 10.0


class RestoreTimeout(RuntimeError):
    pass


# Answers of a partition whose leadership is moving (a broker lost or back): ask again. librdkafka
# does not flag all of them retriable (FENCED_LEADER_EPOCH was seen killing a restore; _NOENT is
# its "No leaders found" while a leader is elected).
_LEADERSHIP_CHANGING = frozenset(
    {
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._NOENT,
    }
)


def _latest_offsets(
    admin: AdminClient, topic: str, partitions: list[int], isolation: IsolationLevel, failures: dict[int, str]
) -> dict[int, int]:
    """partition -> latest offset; a partition whose leader cannot answer now (a broker down, a
    leader election) is left out, to be asked again (its end is unknown, never -1001), and its
    error (or its offset-less answer) put in `failures`."""
    request = {TopicPartition(topic, partition): OffsetSpec.latest() for partition in partitions}
    futures = admin.list_offsets(request, isolation_level=isolation, request_timeout=LIST_OFFSETS_TIMEOUT_S)
    offsets: dict[int, int] = {}
    for topic_partition, future in futures.items():
        try:
            offset = future.result().offset
        except KafkaException as error:
            if not (error.args[0].retriable() or error.args[0].code() in _LEADERSHIP_CHANGING):
                raise
            failures[topic_partition.partition] = error.args[0].str()
            continue
        if offset >= 0:
            offsets[topic_partition.partition] = offset
        else:
            failures[topic_partition.partition] = f"no offset ({offset})"
    return offsets


def _refresh_leaders(admin: AdminClient, topic: str) -> None:
    """Makes the next `list_offsets` ask the partitions' current leaders.

    librdkafka (2.16) sends `list_offsets` to the leader, with the leader epoch, of its metadata
    cache, and drops that cache only on NOT_LEADER_OR_FOLLOWER and LEADER_NOT_AVAILABLE: after a
    FENCED_LEADER_EPOCH (a broker came back and took its leaderships back) it would send the same
    stale epoch again until the cache expires, minutes later. A metadata request for the topic
    updates the cache. If it fails too, the next round asks again, within the caller's bound.
    """
    try:
        admin.list_topics(topic, timeout=LIST_OFFSETS_TIMEOUT_S)
    except KafkaException as error:
        log.info("refreshing the leaders of %s before asking again: %s", topic, error)


def stable_ends(admin: AdminClient, topic: str, partitions: list[int], timeout_s: float) -> dict[int, int]:
    """Each partition's last stable offset, read once it equals the high watermark.

    Raises RestoreTimeout if a transaction stays open past `timeout_s` (it cannot: the broker
    aborts a transaction after `transaction.timeout.ms`, and a restarted instance's producer
    settles its own at once).
    """
    waiting = sorted(partitions)
    ends: dict[int, int] = {}
    deadline_s = time.monotonic() + timeout_s
    open_seen: dict[int, tuple[int, int]] = {}
    unavailable: set[int] = set()
    started_s = reported_s = time.monotonic()
    while waiting:
        failures: dict[int, str] = {}
        stable = _latest_offsets(admin, topic, waiting, IsolationLevel.READ_COMMITTED, failures)
        written = _latest_offsets(admin, topic, waiting, IsolationLevel.READ_UNCOMMITTED, failures)
        if failures:
            if time.monotonic() - reported_s >= RESTORE_PROGRESS_INTERVAL_S:
                log.info("no answer yet from the leaders of %s partitions: %s; asking again", topic, failures)
                reported_s = time.monotonic()
            _refresh_leaders(admin, topic)
        for partition in waiting:
            if partition not in stable or partition not in written:
                unavailable.add(partition)
                continue
            # Read in this order, stable <= written unless a transaction completed in between;
            # either way the partition is settled only when they agree.
            if stable[partition] == written[partition]:
                ends[partition] = stable[partition]
            else:
                open_seen[partition] = (stable[partition], written[partition])
        waiting = [partition for partition in waiting if partition not in ends]
        if waiting:
            if time.monotonic() > deadline_s:
                raise RestoreTimeout(
                    f"{topic} partitions {waiting} still had an open transaction or no leader "
                    f"after {timeout_s:.0f} s (stable, written: "
                    f"{[open_seen.get(p, 'no answer') for p in waiting]})"
                )
            time.sleep(STABLE_END_POLL_INTERVAL_S)
    if open_seen:
        log.info("waited for open transactions on %s partitions %s to end before restoring", topic, sorted(open_seen))
    if unavailable:
        log.info(
            "waited %.1f s for a leader of %s partitions %s to answer before restoring",
            time.monotonic() - started_s,
            topic,
            sorted(unavailable),
        )
    return ends


def fold_event_tail(
    consumer: Consumer,
    events_topic: str,
    tails: dict[int, tuple[State, int]],
    ends: dict[int, int],
    timeout_s: float,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[int, int]:
    """Folds each partition's events from its offset to (at least) its stable end (read_committed).

    `tails` maps partition -> (state, first offset not yet folded) and `ends` partition -> the
    stable end from `stable_ends`; returns partition -> the next offset after the last event
    folded. Raises RestoreTimeout if the end is not reached within `timeout_s`, since
    processing on a state that is behind would decide wrongly. `on_progress(events folded, offsets
    still to read)` is called after every fetched batch and once at the end (with 0 to read).
    """
    if not tails:
        return {}
    next_offsets = {partition: offset for partition, (_, offset) in tails.items()}
    assert all(ends[partition] >= offset for partition, offset in next_offsets.items()), (
        f"a snapshot of {events_topic} is ahead of the log: snapshot {next_offsets}, log ends {ends}"
    )
    consumer.assign([TopicPartition(events_topic, partition, offset) for partition, offset in next_offsets.items()])
    remaining = set(tails)
    started_s = last_report_s = time.monotonic()
    folded = progress_reported = 0
    try:
        while remaining:
            now_s = time.monotonic()
            if now_s - started_s > timeout_s:
                raise RestoreTimeout(
                    f"restore of {events_topic} partitions {sorted(remaining)} did not reach the end "
                    f"within {timeout_s:.0f} s ({folded} events folded)"
                )
            if now_s - last_report_s >= RESTORE_PROGRESS_INTERVAL_S:
                log.info(
                    "restoring partitions %s: %d events folded (%.0f/s)",
                    sorted(remaining),
                    folded,
                    folded / (now_s - started_s),
                )
                last_report_s = now_s
            for record in consumer.consume(num_messages=RESTORE_BATCH_SIZE_MAX, timeout=0.5):
                error = record.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        # The end of a fetch issued after `ends` was read: the stable offset
                        # only grows, so everything up to `ends` has been folded.
                        remaining.discard(record.partition())
                        continue
                    raise KafkaException(error)
                partition, offset, value = record.partition(), record.offset(), record.value()
                assert partition is not None and offset is not None and value is not None, "a record without data"
                fold(tails[partition][0], decode_event(value))
                next_offsets[partition] = offset + 1
                folded += 1
            if on_progress is not None:
                on_progress(folded - progress_reported, sum(max(0, ends[p] - next_offsets[p]) for p in remaining))
                progress_reported = folded
    finally:
        consumer.unassign()
        if on_progress is not None:
            on_progress(folded - progress_reported, 0)
    if folded:
        elapsed_s = max(time.monotonic() - started_s, 1e-6)
        log.info("restored partitions %s: %d events folded in %.1f s", sorted(tails), folded, elapsed_s)
    return next_offsets
