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
times while librdkafka calls its error retriable. The one call librdkafka does not always bound,
`send_offsets_to_transaction`, is bounded here (see `SEND_OFFSETS_GRACE_S`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from infra.produce import Headers, QueueFullTimeout, produce_with_room

log = logging.getLogger("wallet.processor")

CALL_TIMEOUT_S_DEFAULT = 30.0
COMMIT_ATTEMPTS_MAX_DEFAULT = 3
INIT_RETRY_INTERVAL_S = 0.1
# librdkafka (2.16) can hold `send_offsets_to_transaction` past its own timeout: when the group
# coordinator's broker is lost it may wait for a broker state change that never comes (its
# issues 5456 and 5511). The call runs on a thread and is given up this long after its timeout;
# the producer it holds is then replaced (same transactional id: the new one fences it).
SEND_OFFSETS_GRACE_S = 2.0
# A dead letter keeps at most this much of its record's value, with the whole value's size and
# SHA-256 in its headers: the broker takes records up to about 1 MiB on `wallet.commands`, over
# what the producer sends (1,000,000 bytes), and a copy refused as too large once failed the
# batch on the same record at every retry. No command comes near it (an API body is <= 16 KiB).
DEAD_LETTER_VALUE_BYTES_MAX = 65_536
HELD_PRODUCERS_MAX = 4  # producers still held by a given-up call; more means librdkafka is wedged
# A replacement (the processor's recovery) may have to wait for its transaction coordinator for as
# long as the cluster needs to elect one: with two of three brokers lost, until one is back. Its
# `init_transactions` is retried for this many call timeouts (5 minutes at 30 s, Kafka Streams'
# `task.timeout.ms`) while librdkafka calls the error retriable; a first start gets one.
REPLACE_CALL_TIMEOUTS = 10

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
        # librdkafka caps the call to the transaction timeout; given up past that and a grace.
        transaction_timeout_s = int(config.get("transaction.timeout.ms", 60_000)) / 1000
        self._send_offsets_bound_s = min(call_timeout_s, transaction_timeout_s) + SEND_OFFSETS_GRACE_S
        # Producers a given-up call still holds, with its thread: never destroyed under the call.
        self._held: list[tuple[Producer, threading.Thread]] = []
        self._in_transaction = False  # between begin() and a commit or abort that returned
        self._producer = self._initialised(self._call_timeout_s)

    @property
    def transactional_id(self) -> str:
        return self._config["transactional.id"]

    def _initialised(self, timeout_s: float) -> Producer:
        producer = Producer(self._config)
        deadline_s = time.monotonic() + timeout_s
        while True:
            try:
                # Fences any earlier producer with this transactional id and settles its open transaction.
                producer.init_transactions(max(deadline_s - time.monotonic(), 0.001))
                return producer
            except KafkaException as error:
                # A retriable error (the coordinator is loading or moving) may be retried by
                # contract; within `timeout_s`.
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
        value, key = record.value(), record.key()
        if value is not None and len(value) > DEAD_LETTER_VALUE_BYTES_MAX:
            headers += [
                ("value_bytes", str(len(value)).encode()),
                ("value_sha256", hashlib.sha256(value).hexdigest().encode()),
            ]
            value = value[:DEAD_LETTER_VALUE_BYTES_MAX]
        if key is not None and len(key) > DEAD_LETTER_VALUE_BYTES_MAX:
            key = key[:DEAD_LETTER_VALUE_BYTES_MAX]  # the value's bound: a key can be as large
        try:
            produce_with_room(
                self._producer,
                self._dlq_topic,
                value,
                key,
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
        commit call resumes where it stopped); anything else, or too many attempts, raises
        `TransactionAborted` with the transaction still open: the caller's `replace()` ends it.
        """
        try:
            if offsets:
                self._send_offsets(offsets, group_metadata)
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
            raise classify(error, "committing the transaction") from error

    def _send_offsets(self, offsets: list[TopicPartition], group_metadata) -> None:
        """`send_offsets_to_transaction`, raising its KafkaException, or TransactionAborted when it
        did not return within `_send_offsets_bound_s`."""
        producer = self._producer
        failure: list[BaseException] = []

        def call() -> None:
            try:
                producer.send_offsets_to_transaction(offsets, group_metadata, self._call_timeout_s)
            except BaseException as error:  # raised again on the caller's thread, whatever it is
                failure.append(error)

        thread = threading.Thread(target=call, name="send-offsets-to-transaction", daemon=True)
        thread.start()
        thread.join(self._send_offsets_bound_s)
        if thread.is_alive():
            # No other call may be made on it now (librdkafka refuses concurrent ones); only a new
            # producer with the same id ends its transaction, by fencing it.
            self._held.append((producer, thread))
            self._in_transaction = False
            raise TransactionAborted(
                f"sending the consumed offsets to the transaction did not return within "
                f"{self._send_offsets_bound_s:.0f} s (librdkafka waits for a lost group coordinator)"
            )
        if failure:
            error = failure[0]
            if (
                self._in_transaction
                and isinstance(error, KafkaException)
                and error.args[0].code() == KafkaError._STATE
                and not error.args[0].fatal()
            ):
                # Inside a transaction this class began, _STATE is not a misuse but librdkafka's
                # word for a group coordinator it lost ("on broker (none)", seen when the active
                # controller was killed under load): a new producer and a rebuild cure it.
                raise TransactionAborted(f"sending the consumed offsets to the transaction: {error.args[0].str()}")
            raise error

    def abort_empty(self) -> None:
        """Ends a transaction that produced nothing (a batch of consumer errors only)."""
        try:
            self._producer.abort_transaction(self._call_timeout_s)
        except KafkaException as error:
            raise classify(error, "aborting an empty transaction") from error
        self._in_transaction = False

    def replace(self) -> None:
        """Drops the producer (and whatever it still queues) and starts a new one with the same id,
        waiting for its transaction coordinator up to `REPLACE_CALL_TIMEOUTS` call timeouts.

        This is how a failed transaction ends: the new producer's InitProducerId bumps the
        epoch, and the coordinator aborts the open transaction before it answers. An
        `abort_transaction` first would add nothing but its wait, which is the whole call timeout
        when the coordinator is the broker that was lost."""
        try:
            self._producer.purge()  # the old transaction's records must not outlive it
            self._producer.flush(0)
        except KafkaException as error:
            log.warning("the replaced producer reports: %s", error)  # it is dropped either way
        self._in_transaction = False
        self._held = [(producer, thread) for producer, thread in self._held if thread.is_alive()]
        if len(self._held) > HELD_PRODUCERS_MAX:
            raise TransactionBug(f"{len(self._held)} producers still held by calls given up on: librdkafka is wedged")
        self._producer = self._initialised(self._call_timeout_s * REPLACE_CALL_TIMEOUTS)

    def poll(self, timeout_s: float = 0.0) -> int:
        return self._producer.poll(timeout_s)
