"""The processor's transactional producer: every Kafka transaction call in one place.

In the spirit of Kafka Streams' `StreamsProducer`: the processor asks for init, begin, send,
dead-letter, commit (offsets included) and abort, and this class turns whatever librdkafka
raises into one of two kinds:

- `TransactionAborted`: the transaction did not commit, or whether it did is unknown (a
  commit that timed out, a fenced or fatal producer, a broker that went away, a local queue
  that stayed full). The cure is always the same and belongs to the processor: drop the
  batch's in-memory state, `replace()` this producer (same transactional id, so the broker
  fences any zombie of it and settles its open transaction) and rebuild from the log.
  Never guess whether a commit happened.
- `TransactionBug`: an error no rebuild cures (the client used in a wrong state, an invalid
  argument, a missing authorisation): the process stops loudly.

Every call is bounded by `call_timeout_s`; a commit is retried at most `commit_attempts_max`
times while librdkafka calls its error retriable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from infra.produce import Headers, QueueFullTimeout, produce_with_room

log = logging.getLogger("wallet.processor")

CALL_TIMEOUT_S_DEFAULT = 30.0
COMMIT_ATTEMPTS_MAX_DEFAULT = 3
INIT_RETRY_INTERVAL_S = 0.1

# librdkafka errors that mean this program (or its configuration) is wrong, not the broker
# or the network: a new producer would fail the same way, so they crash the process.
_BUG_CODES = frozenset(
    {
        KafkaError._STATE,
        KafkaError._INVALID_ARG,
        KafkaError._NOT_IMPLEMENTED,
        KafkaError._UNSUPPORTED_FEATURE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)


class TransactionAborted(Exception):
    """The batch's transaction did not commit (or its fate is unknown): rebuild from the log."""


class TransactionBug(RuntimeError):
    """A Kafka error that no rebuild cures: stop the process."""


def classify(error: KafkaException, during: str) -> Exception:
    """The kind of a librdkafka error raised `during` a call, with a message naming both."""
    kafka_error = error.args[0] if error.args and isinstance(error.args[0], KafkaError) else None
    if kafka_error is None:
        return TransactionBug(f"{during}: {error!r}")
    kind = TransactionBug if kafka_error.code() in _BUG_CODES and not kafka_error.fatal() else TransactionAborted
    return kind(
        f"{during}: {kafka_error.str()} ({kafka_error.name()}"
        f"{', fatal' if kafka_error.fatal() else ''}{', retriable' if kafka_error.retriable() else ''})"
    )


class TransactionalProducer:
    """One transactional id, one producer at a time; `replace()` swaps it for a fresh one."""

    def __init__(
        self,
        config: dict,
        dlq_topic: str,
        call_timeout_s: float = CALL_TIMEOUT_S_DEFAULT,
        commit_attempts_max: int = COMMIT_ATTEMPTS_MAX_DEFAULT,
    ) -> None:
        assert config.get("transactional.id"), "a transactional producer needs a transactional.id"
        assert commit_attempts_max >= 1
        self._config = config
        self._dlq_topic = dlq_topic
        self._call_timeout_s = call_timeout_s
        self._commit_attempts_max = commit_attempts_max
        self._queue_full_wait_ms = int(call_timeout_s * 1000)
        self._in_transaction = False  # between begin() and a commit or abort that returned
        self._producer = self._initialised()

    @property
    def transactional_id(self) -> str:
        return self._config["transactional.id"]

    def _initialised(self) -> Producer:
        producer = Producer(self._config)
        deadline_s = time.monotonic() + self._call_timeout_s
        while True:
            try:
                # Fences any earlier producer with this transactional id and settles its open transaction.
                producer.init_transactions(max(deadline_s - time.monotonic(), 0.001))
                return producer
            except KafkaException as error:
                # A retriable error (the coordinator is loading or moving) may be retried by
                # contract; within the same bound as one call.
                if not error.args[0].retriable() or time.monotonic() >= deadline_s:
                    raise classify(error, "initialising the transactional producer") from error
                time.sleep(INIT_RETRY_INTERVAL_S)

    def begin(self) -> None:
        try:
            self._producer.begin_transaction()
        except KafkaException as error:
            raise classify(error, "beginning a transaction") from error
        self._in_transaction = True

    def send(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None,
        partition: int | None = None,
        on_delivery: Callable[..., Any] | None = None,
    ) -> None:
        try:
            produce_with_room(
                self._producer,
                topic,
                value,
                key,
                partition=partition,
                on_delivery=on_delivery,
                queue_full_wait_ms=self._queue_full_wait_ms,
            )
        except QueueFullTimeout as error:
            raise TransactionAborted(str(error)) from error
        except KafkaException as error:
            raise classify(error, f"producing to {topic}") from error

    def dead_letter(self, record, reason: str) -> None:
        """The record's original bytes to the dead-letter topic, with where it came from and why."""
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic(), record.partition(), record.offset(), reason)
        headers: Headers = [
            ("error", reason.encode()),
            ("source_topic", record.topic().encode()),
            ("source_partition", str(record.partition()).encode()),
            ("source_offset", str(record.offset()).encode()),
        ]
        try:
            produce_with_room(
                self._producer,
                self._dlq_topic,
                record.value(),
                record.key(),
                headers=headers,
                queue_full_wait_ms=self._queue_full_wait_ms,
            )
        except QueueFullTimeout as error:
            raise TransactionAborted(str(error)) from error
        except KafkaException as error:
            raise classify(error, f"dead-lettering to {self._dlq_topic}") from error

    def commit(self, offsets: list[TopicPartition], group_metadata) -> None:
        """Sends the consumed offsets (if any: a transaction of ticks consumed nothing) into the
        transaction and commits it, or raises.

        Returns only when the broker confirmed the commit. A retriable error is retried (the
        commit call resumes where it stopped); anything else, or too many attempts, aborts
        where librdkafka allows it and raises `TransactionAborted`.
        """
        try:
            if offsets:
                self._producer.send_offsets_to_transaction(offsets, group_metadata, self._call_timeout_s)
            for attempt in range(1, self._commit_attempts_max + 1):
                try:
                    self._producer.commit_transaction(self._call_timeout_s)
                    self._in_transaction = False
                    return
                except KafkaException as error:
                    if not error.args[0].retriable() or attempt == self._commit_attempts_max:
                        raise
                    log.warning("commit attempt %d/%d failed, retrying: %s", attempt, self._commit_attempts_max, error)
        except KafkaException as error:
            failure = classify(error, "committing the transaction")
            if error.args[0].txn_requires_abort():
                self.abort()
            raise failure from error

    def abort(self) -> bool:
        """Aborts the open transaction if the broker can be reached; True when it did (or none was open)."""
        if not self._in_transaction:
            return True
        try:
            self._producer.abort_transaction(self._call_timeout_s)
            self._in_transaction = False
            return True
        except KafkaException as error:
            log.error("abort failed: %s", error)
            return False

    def abort_empty(self) -> None:
        """Ends a transaction that produced nothing (a batch of consumer errors only)."""
        try:
            self._producer.abort_transaction(self._call_timeout_s)
        except KafkaException as error:
            raise classify(error, "aborting an empty transaction") from error
        self._in_transaction = False

    def replace(self) -> None:
        """Drops the producer (and whatever it still queues) and starts a new one with the same id."""
        try:
            self._producer.purge()  # the old transaction's records must not outlive it
            self._producer.flush(0)
        except KafkaException as error:
            log.warning("the replaced producer reports: %s", error)  # it is dropped either way
        self._in_transaction = False
        self._producer = self._initialised()

    def poll(self, timeout_s: float = 0.0) -> int:
        return self._producer.poll(timeout_s)
