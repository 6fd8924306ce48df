"""The exactly-once processor: Kafka transactions around the pure state machine.

One instance consumes some partitions of `wallet.commands` (a consumer group splits them)
and, per batch, in ONE Kafka transaction: decides every command with the core, produces its
events (to the same partition number of `wallet.events`), its saga legs (to
`wallet.commands`, placed by the shared partitioner) and its outcomes, sends the consumed
offsets, and commits. The transaction calls live in `transactions.py`; this file is the loop
and its decisions.

The snapshot holds only what Kafka committed. A batch changes its tasks' states in memory
before its commit, so a task is marked `uncommitted` from the first record of a batch until
the commit returns; a task so marked is never saved (not by the periodic flush, not on
revocation, not on the way out of `run()` after an exception or a signal). When a batch does
not commit, its in-memory state is thrown away before anything else is tried: the producer
is replaced (same transactional id, which fences a zombie of itself) and every owned
partition is rebuilt from the snapshot and the log. It never guesses whether a commit
happened.

Time without traffic: a hold expires at the first decision at or after its expiry, so a
partition without commands would keep it open. Every `tick_interval_ms` the processor writes a
`tick` command to each owned partition that has seen no record for that long and holds an
open hold whose expiry has passed by the wall clock; the tick is logged, decided (at its own
record time, the broker's) and replayed like any command, so the wall clock only schedules
ticks and never decides anything.

With `standby` on, a `Standby` (standby.py) keeps a warm copy of every partition this instance
does not own, so taking one over (a peer died or left) folds the log only since that copy.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from infra import native
from infra.admin import admin_client
from infra.kafka_clients import processor_consumer_config, processor_producer_config, restore_consumer_config
from infra.secrets import leg_keys_text
from infra.settings import Settings
from schemas.codec import encode
from schemas.commands import TICK_TRANSACTION_ID, Tick
from schemas.events import HOLD_EVENTS, CommandRejected
from schemas.leg_auth import LegKeyring
from schemas.partitioning import partition_for
from streams.core.admission import Refusal, admit, decide
from streams.core.machine import Decision
from streams.core.state import State, memory_horizon_ms, memory_key
from streams.runtime.metrics import STATE_GAUGES_INTERVAL_S, BatchTally, ProcessorMetrics
from streams.runtime.restore import fold_event_tail, stable_ends
from streams.runtime.snapshot_writer import SnapshotUnit, SnapshotWriter
from streams.runtime.standby import Standby
from streams.runtime.store import Checkpoint, PartitionChanges, PartitionSnapshot, StateStore, advance
from streams.runtime.transactions import TransactionAborted, TransactionalProducer

log = logging.getLogger("wallet.processor")

REPORT_INTERVAL_S = 5.0
GC_YOUNG_THRESHOLD = 200_000  # allocations between young-generation collections
LEAVE_TIMEOUT_S = 5.0  # longest a stop waits for the group to take its partitions back
LEAVE_POLL_S = 0.05


@dataclass(frozen=True)
class ProcessorConfig:
    instance_id: str
    store_path: Path
    batch_size_max: int = 5_000  # commands per Kafka transaction: each commit costs milliseconds
    commit_interval_ms: int = 25  # longest a command waits for its batch to fill (a transfer waits twice)
    state_flush_interval_ms: int = 5_000  # how often the RocksDB snapshot catches up (restore folds the rest)
    snapshot_wait_timeout_ms: int = 60_000  # longest a revoke, restore or stop waits for the flush in flight
    transaction_timeout_ms: int = 10_000
    kafka_call_timeout_ms: int = 30_000  # bound of every blocking Kafka call (commit, abort, init, committed)
    commit_attempts_max: int = 3  # commits retried while librdkafka calls the error retriable
    restore_timeout_s: float = 600.0
    # A partition quiet for this long with a hold past its expiry gets a tick; 0: never.
    tick_interval_ms: int = 1_000
    # Follow the partitions not owned (standby.py): a takeover folds only the log since the copy.
    standby: bool = False


class _Task:
    """One owned partition: its state, its snapshot checkpoint and what changed since: the keys
    the batch in progress changed, and the committed values of those the batches before did."""

    __slots__ = (
        "partition",
        "state",
        "checkpoint",
        "changes",
        "staged",
        "events_offset",
        "uncommitted",
        "segments_dropped_at_horizon_ms",
        "last_record_s",
    )

    def __init__(self, partition: int, state: State, checkpoint: Checkpoint, events_offset: int) -> None:
        self.partition = partition
        self.state = state
        self.checkpoint = checkpoint
        self.changes = PartitionChanges()
        self.staged = PartitionSnapshot()
        self.events_offset = events_offset  # next offset of wallet.events after the last committed event
        # True from a batch's first record of this partition until the batch commits: the state
        # then holds decisions Kafka may never have, and must not reach the snapshot.
        self.uncommitted = False
        self.segments_dropped_at_horizon_ms: int | None = None
        self.last_record_s = time.monotonic()  # when a record of it was last consumed, or a tick sent


class _Batch:
    """What one batch collected for its transaction."""

    __slots__ = ("next_offsets", "events", "delivered")

    def __init__(self) -> None:
        self.next_offsets: dict[int, int] = {}  # partition -> next commands offset to commit
        # Events are produced after the decisions so that the last one of each partition can
        # carry the batch's only delivery callback: its offset is the snapshot's checkpoint.
        self.events: list[tuple[int, str, bytes]] = []
        self.delivered: dict[int, int] = {}  # partition -> next events offset, once delivered


class Processor:
    def __init__(self, settings: Settings, config: ProcessorConfig, metrics: ProcessorMetrics | None = None) -> None:
        self.settings = settings
        self.config = config
        self._metrics = metrics if metrics is not None else ProcessorMetrics()
        self._tally = BatchTally()  # the batch in progress's figures, counted once it commits
        self.group_id = settings.processor_group_id
        self.transactional_id = settings.processor_transactional_id(config.instance_id)
        self._call_timeout_s = config.kafka_call_timeout_ms / 1000
        self._stopping = False
        # First: a SIGTERM while the clients start (init_transactions can take seconds) is a stop.
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self._tasks: dict[int, _Task] = {}
        # The processors' leg keys: every leg is verified before the core sees it, every emitted leg signed.
        self._keyring = LegKeyring.parse(leg_keys_text(settings))
        self._store = StateStore(config.store_path)
        self._snapshots = SnapshotWriter(
            self._store, config.snapshot_wait_timeout_ms / 1000, self._metrics.snapshot_flush_duration.observe
        )
        self._consumer = self._new_consumer()
        self._consumer_fatal: KafkaError | None = None
        self._restore_consumer = Consumer(
            restore_consumer_config(settings.bootstrap, self.group_id, config.instance_id)
        )
        self._admin = admin_client(settings.bootstrap, role="processor")  # the restore's offset queries
        self._transactions = TransactionalProducer(
            processor_producer_config(settings.bootstrap, self.transactional_id, config.transaction_timeout_ms),
            settings.dlq_topic,
            call_timeout_s=self._call_timeout_s,
            commit_attempts_max=config.commit_attempts_max,
        )
        self._partition_count = self._check_topics()
        self._standby = self._start_standby() if config.standby else None
        self._owner_partition = lru_cache(maxsize=1 << 20)(
            lambda account: partition_for(account, self._partition_count)
        )
        self._last_flush_s = time.monotonic()
        self._report_s = time.monotonic()
        self._state_gauges_s = 0.0
        self._reported = 0
        self.commands_processed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, *_signal_args) -> None:
        self._stopping = True

    def run(self) -> None:
        # Let the young generation grow to a batch's worth of short-lived tuples and lists before
        # a pass: at the default of 700 the collector cost several microseconds per command.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
        self._subscribe()
        log.info(
            "instance %s started (group %s, transactional id %s, core %s)",
            self.config.instance_id,
            self.group_id,
            self.transactional_id,
            native.core_description(),
        )
        try:
            while not self._stopping:
                records = self._consumer.consume(
                    num_messages=self.config.batch_size_max, timeout=self.config.commit_interval_ms / 1000
                )
                if records:
                    try:
                        self._process_batch(records)
                    except TransactionAborted as error:
                        self._recover(str(error))
                if self._consumer_fatal is not None:
                    self._replace_consumer()
                self._housekeeping()
                try:
                    self._tick_quiet_partitions()
                except TransactionAborted as error:
                    self._recover(str(error))
        finally:
            self._shut_down()

    def _new_consumer(self) -> Consumer:
        return Consumer(processor_consumer_config(self.settings.bootstrap, self.group_id, self.config.instance_id))

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            [self.settings.commands_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _replace_consumer(self) -> None:
        """A fatal consumer (e.g. a static member fenced after its session timed out during a
        broker failover) never consumes again: leave it, drop every partition, and join anew.
        The partitions come back through `_on_assign`, restored from snapshot and log."""
        log.warning("consumer failed fatally (%s); replacing it and rejoining the group", self._consumer_fatal)
        self._save_now(self._tasks.values(), "replacing the consumer")  # saves committed state only
        self._hand_to_standby(self._tasks.values())
        self._tasks.clear()
        try:
            self._consumer.close()
        except KafkaException as error:
            log.warning("closing the failed consumer: %s", error)
        self._consumer = self._new_consumer()
        self._consumer_fatal = None
        self._subscribe()

    def _housekeeping(self) -> None:
        now_s = time.monotonic()
        writing = self._snapshots.busy()  # raises what failed the writer: a failed write crashes the processor
        if now_s - self._last_flush_s >= self.config.state_flush_interval_ms / 1000:
            self._last_flush_s = now_s
            if not writing:  # else this interval's changes wait for the next one: one flush in flight at most
                self._flush_state()
        if now_s - self._state_gauges_s >= STATE_GAUGES_INTERVAL_S:
            self._metrics.set_state([task.state for task in self._tasks.values()], self._lag())
            self._state_gauges_s = now_s
        if now_s - self._report_s >= REPORT_INTERVAL_S:
            rate = (self.commands_processed - self._reported) / (now_s - self._report_s)
            log.info(
                "partitions %s: %d commands processed (%.0f/s), lag %d",
                sorted(self._tasks),
                self.commands_processed,
                rate,
                sum(self._lag().values()),
            )
            self._report_s, self._reported = now_s, self.commands_processed

    def _shut_down(self) -> None:
        # Whatever brought us here (a stop, an exception out of a batch or a recovery), only
        # committed state is saved: `_capture` skips uncommitted tasks. After a failed snapshot
        # write nothing more is written: the next start restores from the last good one and the log.
        try:
            if not self._snapshots.failed:
                self._save_now(self._tasks.values(), "stopping")
            self._tasks.clear()  # saved: the revocation on leaving the group has nothing left to save
        finally:
            self._leave_group()
            self._consumer.close()
            if self._standby is not None:
                self._standby.close()
            self._restore_consumer.close()
            self._snapshots.close()
            self._store.close()
        log.info("instance %s stopped after %d commands", self.config.instance_id, self.commands_processed)

    def _leave_group(self) -> None:
        """Leaves the consumer group now, so that the partitions move at once. A static member's
        close alone does not leave (KIP-345): the group would keep its partitions for the session
        timeout, waiting for a restart. librdkafka sends the LeaveGroup of a static member on an
        unsubscribe. A killed instance sends none: restarted under the same id, it takes its
        partitions straight back."""
        try:
            self._consumer.unsubscribe()
            # The leave goes out once the revocation was served, by a poll (one, as a rule).
            deadline_s = time.monotonic() + LEAVE_TIMEOUT_S
            while self._consumer.assignment():
                if time.monotonic() >= deadline_s:
                    log.warning("still assigned %.0f s after leaving the group: closing anyway", LEAVE_TIMEOUT_S)
                    return
                self._consumer.poll(LEAVE_POLL_S)  # a record fetched before the leave is not processed
        except KafkaException as error:  # a fatal or fenced consumer: its close ends it all the same
            log.warning("leaving the group: %s", error)

    # -- the batch: one Kafka transaction ----------------------------------------------------

    def _process_batch(self, records: list) -> None:
        batch = _Batch()
        self._tally = BatchTally()
        self._transactions.begin()
        for record in records:
            self._handle(record, batch)
        self._produce_events(batch)
        self.commands_processed += len(records)
        if not batch.next_offsets:
            self._transactions.abort_empty()  # only consumer errors: nothing to commit
            return
        offsets = [
            TopicPartition(self.settings.commands_topic, partition, offset)
            for partition, offset in batch.next_offsets.items()
        ]
        commit_started_s = time.perf_counter()
        self._transactions.commit(offsets, self._consumer.consumer_group_metadata())
        self._metrics.committed(self._tally, len(records), len(batch.events), time.perf_counter() - commit_started_s)
        for partition, events_offset in batch.delivered.items():
            self._tasks[partition].events_offset = events_offset
        now_s = time.monotonic()
        for partition in batch.next_offsets:
            task = self._tasks[partition]
            task.uncommitted = False
            task.last_record_s = now_s
            task.staged.take(task.state, task.changes)  # committed: the next flush writes these values

    def _tick_quiet_partitions(self) -> None:
        """Writes a tick to each owned partition quiet for a tick interval whose earliest open
        hold has expired by the wall clock, in one transaction of its own (no offsets). The tick
        decides at its broker time; if that is still before the expiry (clocks differ), it
        expires nothing and the next interval ticks again."""
        interval_ms = self.config.tick_interval_ms
        if interval_ms <= 0:
            return
        now_s = time.monotonic()
        wall_ms = int(time.time() * 1000)  # schedules ticks only; never reaches the core
        quiet = [
            task
            for task in self._tasks.values()
            if (now_s - task.last_record_s) * 1000 >= interval_ms
            and task.state.hold_deadlines
            and task.state.hold_deadlines[0][0] <= wall_ms
        ]
        if not quiet:
            return
        self._transactions.begin()
        for task in quiet:
            tick = Tick(transaction_id=TICK_TRANSACTION_ID, partition=task.partition)
            # No key: no account owns a tick; the admission gate checks the partition it names.
            self._transactions.send(self.settings.commands_topic, encode(tick), None, task.partition)
        self._transactions.commit([], self._consumer.consumer_group_metadata())
        for task in quiet:
            task.last_record_s = now_s

    def _handle(self, record, batch: _Batch) -> None:
        error = record.error()
        if error is not None:
            # librdkafka reports a fatal consumer as an error event of code _FATAL, whose fatal()
            # flag is not always set on the event itself.
            if error.fatal() or error.code() == KafkaError._FATAL:
                self._consumer_fatal = error  # replaced after this batch, by the loop
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error)
            return
        partition = record.partition()
        task = self._tasks[partition]
        task.uncommitted = True
        batch.next_offsets[partition] = record.offset() + 1
        decision = self._decide(task, record)
        if decision is not None:
            self._emit(task, decision, batch)

    def _decide(self, task: _Task, record) -> Decision | None:
        """The core's decision on one record, or None when the record was dead-lettered."""
        partition = task.partition
        timestamp_type, record_time_ms = record.timestamp()
        if timestamp_type != TIMESTAMP_LOG_APPEND_TIME:
            # The time that decides must be the broker's: a producer's CreateTime would let
            # clients move the partition's clock (and with it the idempotency window).
            raise RuntimeError(
                f"{record.topic()}[{partition}]@{record.offset()} has timestamp type "
                f"{timestamp_type}, not LogAppendTime: create {self.settings.commands_topic} with "
                f"message.timestamp.type=LogAppendTime (wallet topics create)"
            )
        admitted = admit(record.value(), partition, self._owner_partition, self._keyring)
        decision = (
            admitted
            if isinstance(admitted, Refusal)
            else decide(task.state, admitted, record_time_ms, partition, self._owner_partition)
        )
        if isinstance(decision, Refusal):
            self._dead_letter(record, decision)
            return None
        self._tally.decision(type(admitted), decision)
        return decision

    def _dead_letter(self, record, refusal: Refusal) -> None:
        self._transactions.dead_letter(record, refusal.reason)
        self._tally.dead_letter()
        forward = refusal.forward_to
        if forward is not None:
            # In the same transaction: the owner's partition decides (and answers) it exactly once.
            self._transactions.send(self.settings.commands_topic, record.value(), forward.key, forward.partition)

    def _emit(self, task: _Task, decision: Decision, batch: _Batch) -> None:
        """Queues the decision's events for the batch and sends its legs and outcome now."""
        partition = task.partition
        changed_accounts, changed_memory = task.changes.accounts, task.changes.memory_keys
        for event in decision.events:
            account_id = event.account_id
            batch.events.append((partition, account_id, encode(event)))
            if type(event) is not CommandRejected:
                changed_accounts.add(account_id)
                if isinstance(event, HOLD_EVENTS):
                    task.changes.hold_keys.add((account_id, event.hold_id))
            changed_memory.add(memory_key(event))
        send = self._transactions.send
        for leg in decision.follow_ups:
            send(self.settings.commands_topic, self._keyring.signed_record(leg), getattr(leg, leg.owner_field))
        outcome = decision.outcome
        if outcome is not None:
            send(self.settings.outcomes_topic, encode(outcome), outcome.transaction_id)

    def _produce_events(self, batch: _Batch) -> None:
        """Produces the batch's events; the last of each partition reports the events offset."""
        events, delivered = batch.events, batch.delivered
        last_index = {partition: index for index, (partition, _, _) in enumerate(events)}

        def checkpoint_on_delivery(error, message) -> None:
            if error is None:  # served inside the commit, which waits for every delivery
                delivered[message.partition()] = message.offset() + 1

        send, events_topic = self._transactions.send, self.settings.events_topic
        for index, (partition, key, value) in enumerate(events):
            on_delivery = checkpoint_on_delivery if last_index[partition] == index else None
            send(events_topic, value, key, partition, on_delivery)

    def _recover(self, why: str) -> None:
        """Throws away the failed batch, replaces the producer and rebuilds every owned partition."""
        partitions = sorted(self._tasks)
        log.warning("recovering: %s; replacing the producer and rebuilding partitions %s", why, partitions)
        # First, before any call that can fail: the failed batch's state must never be saved.
        self._tasks.clear()
        self._metrics.transactions_aborted.inc()
        self._transactions.replace()  # which aborts the failed transaction (transactions.py)
        if self._consumer_fatal is not None:
            return  # the loop replaces the consumer; the partitions come back through `_on_assign`
        try:
            self._restore(partitions)
            committed = self._consumer.committed(
                [TopicPartition(self.settings.commands_topic, p) for p in partitions], timeout=self._call_timeout_s
            )
            for topic_partition in committed:
                if topic_partition.offset < 0:
                    # Nothing committed yet: the failed batch was the partition's first.
                    topic_partition.offset = OFFSET_BEGINNING
                self._consumer.seek(topic_partition)
        except KafkaException as error:
            # The group coordinator (or a leader) went with the broker that failed the batch, so
            # where to resume is not known: rebuilt state must not run from the wrong position.
            # A new consumer rejoins and gets its partitions back through `_on_assign`.
            log.warning("rebuilding partitions %s failed: %s; rejoining the group", partitions, error)
            self._tasks.clear()
            self._consumer_fatal = error.args[0]

    # -- partitions: restore on assignment, drop on revocation -------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        try:
            # Waits until no transaction that wrote these partitions' offsets is still open; the
            # restore then waits the same for the events partitions (see restore.py).
            consumer.committed(partitions, timeout=self._call_timeout_s)
            self._restore(numbers)
        except KafkaException as error:
            # A broker lost mid-restore: owning these partitions half-built is not an option, and
            # an exception out of this callback would end the process. Nothing is fetched for them
            # while paused; the loop replaces the consumer, which gets them back here.
            log.warning("restoring partitions %s failed: %s; rejoining the group", numbers, error)
            for number in numbers:
                self._tasks.pop(number, None)
            consumer.pause(partitions)
            self._consumer_fatal = error.args[0]
            return
        # The restored state is long-lived: keep the cyclic collector from re-scanning it.
        gc.freeze()
        log.info("assigned partitions %s; now owning %s", numbers, sorted(self._tasks))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        revoked = [task for number in numbers if (task := self._tasks.pop(number, None)) is not None]
        self._save_now(revoked, f"revoking partitions {numbers}")
        self._hand_to_standby(revoked)
        log.info("revoked partitions %s; now owning %s", numbers, sorted(self._tasks))

    def _restore(self, partitions: list[int]) -> None:
        if not partitions:
            return
        # A flush in flight may hold these partitions' last save: the snapshot is read once it landed.
        self._snapshots.wait(f"restoring partitions {partitions}")
        loaded = {p: self._store.load(p) for p in partitions}
        tails = {p: (state, checkpoint.events_offset) for p, (state, checkpoint) in loaded.items()}
        from_standby = self._take_from_standby(loaded, tails)
        topic, timeout_s = self.settings.events_topic, self.config.restore_timeout_s
        started_s = time.monotonic()
        folded = 0

        def progress(events_folded: int, remaining_offsets: int) -> None:
            nonlocal folded
            folded += events_folded
            self._metrics.restore_progress(events_folded, remaining_offsets)

        ends = fold_event_tail(
            self._restore_consumer,
            topic,
            tails,
            stable_ends(self._admin, topic, partitions, timeout_s),
            timeout_s,
            on_progress=progress,
        )
        self._metrics.restored(time.monotonic() - started_s, folded, len(from_standby))
        if from_standby:
            log.info(
                "partitions %s taken from the standby at events offsets %s; %d events of the tail folded",
                sorted(from_standby),
                from_standby,
                folded,
            )
        for partition, (state, checkpoint) in loaded.items():
            task = _Task(partition, state, checkpoint, ends[partition])
            if ends[partition] != checkpoint.events_offset:
                # The tail folded from the log is not in the snapshot yet; which keys it touched
                # is not tracked, so the next save writes them all.
                task.changes.accounts.update(state.accounts)
                task.changes.memory_keys.update(state.memory)
                task.changes.hold_keys.update(state.holds)
                task.staged.take(state, task.changes)
            self._tasks[partition] = task

    def _take_from_standby(
        self, loaded: dict[int, tuple[State, Checkpoint]], tails: dict[int, tuple[State, int]]
    ) -> dict[int, int]:
        """Replaces, in `loaded` and `tails`, the snapshot's state of each partition the standby
        holds past the snapshot's checkpoint by the standby's; returns partition -> the events
        offset it was taken at. The checkpoint stays the snapshot's: it is what RocksDB holds."""
        taken: dict[int, int] = {}
        if self._standby is None:
            return taken
        for partition, (_, checkpoint) in loaded.items():
            warm = self._standby.take(partition)  # taken either way: an owned partition is not followed
            if warm is None or warm[1] <= checkpoint.events_offset:
                continue
            state, events_offset = warm
            loaded[partition] = (state, checkpoint)
            tails[partition] = (state, events_offset)
            taken[partition] = events_offset
        return taken

    def _start_standby(self) -> Standby:
        """A standby following every partition from this instance's snapshot of it: none is owned yet."""
        settings, instance_id = self.settings, self.config.instance_id
        standby = Standby(
            {
                **restore_consumer_config(settings.bootstrap, self.group_id, f"{instance_id}-standby"),
                # A follower, not a restore racing to the end: fewer, fuller fetches cost the loop less.
                "fetch.wait.max.ms": 100,
                "enable.partition.eof": False,
            },
            settings.events_topic,
            on_folded=self._metrics.standby_events_folded.inc,
            on_lag=self._metrics.standby_lagging,
        )
        for partition in range(self._partition_count):
            state, checkpoint = self._store.load(partition)
            standby.follow(partition, state, checkpoint.events_offset)
        standby.start()
        return standby

    def _hand_to_standby(self, tasks: Iterable[_Task]) -> None:
        """Partitions no longer owned are followed on: a committed task's state as it is (the
        standby owns it now), an uncommitted one's from the snapshot, which holds only committed state."""
        if self._standby is None:
            return
        for task in tasks:
            if task.uncommitted:
                state, checkpoint = self._store.load(task.partition)
                self._standby.follow(task.partition, state, checkpoint.events_offset)
            else:
                self._standby.follow(task.partition, task.state, task.events_offset)

    # -- the snapshot: committed state only --------------------------------------------------

    def _flush_state(self) -> None:
        """Hands every committed partition's staged values to the snapshot writer, which is idle:
        the copy was made batch by batch, the encoding and the RocksDB write run on the writer."""
        started_s = time.monotonic()
        self._snapshots.submit(self._capture(self._tasks.values()))
        self._metrics.snapshot_capture_duration.observe(time.monotonic() - started_s)

    def _save_now(self, tasks: Iterable[_Task], why: str) -> None:
        """Saves these partitions' committed state and returns once it is written, after the flush
        in flight: before their state is dropped or the store closed."""
        tasks = list(tasks)
        if not tasks:
            return
        self._snapshots.wait(why)
        self._snapshots.submit(self._capture(tasks))
        self._snapshots.wait(why)

    def _capture(self, tasks: Iterable[_Task]) -> SnapshotUnit:
        """The committed tasks' values staged since their last flush, and their checkpoints advanced."""
        unit = SnapshotUnit()
        for task in tasks:
            if task.uncommitted:
                log.warning(
                    "partition %d holds an uncommitted batch: not saved; the next owner rebuilds it from the log",
                    task.partition,
                )
                continue
            if task.events_offset == task.checkpoint.events_offset:
                continue
            assert task.events_offset > task.checkpoint.events_offset, (
                f"partition {task.partition}: events offset {task.events_offset} behind its snapshot's "
                f"{task.checkpoint.events_offset}"
            )
            task.checkpoint.events_offset = task.events_offset
            unit.writes.append(advance(task.partition, task.staged, task.state, task.checkpoint))
            task.staged = PartitionSnapshot()
            horizon_ms = memory_horizon_ms(task.state.clock_ms)
            if horizon_ms != task.segments_dropped_at_horizon_ms:
                unit.horizons_moved.append((task.partition, task.state.clock_ms))
                task.segments_dropped_at_horizon_ms = horizon_ms
        return unit

    # -- observability -----------------------------------------------------------------------

    def _check_topics(self) -> int:
        metadata = self._consumer.list_topics(timeout=self._call_timeout_s)
        counts = {}
        for topic in (self.settings.commands_topic, self.settings.events_topic):
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise RuntimeError(f"topic {topic} does not exist: run `wallet topics create` first")
            counts[topic] = len(found.partitions)
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"commands and events topics must have the same partition count: {counts}")
        return counts[self.settings.commands_topic]

    def _lag(self) -> dict[int, int]:
        """Per owned partition, the records of wallet.commands not consumed yet (from the consumer's
        cached watermarks: no request to the broker)."""
        lag: dict[int, int] = {}
        for partition in self._tasks:
            tp = TopicPartition(self.settings.commands_topic, partition)
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                position = self._consumer.position([tp])[0].offset
            except KafkaException:
                continue
            if high >= 0 and position >= 0:
                lag[partition] = max(0, high - position)  # the cached watermark may be older than the position
        return lag
