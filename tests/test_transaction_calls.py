"""The transactional producer's bounds, where the cluster fault tests found librdkafka's wanting.

- librdkafka 2.16's `send_offsets_to_transaction` can outlive its own timeout: when the broker of
  the group coordinator is lost, the call may wait for a broker state change that never comes
  (librdkafka issues 5456 and 5511). Seen: a processor blocked ten minutes in a commit.
- A producer replaced while two of three brokers are lost cannot reach its transaction
  coordinator until one is back (a node's restart took 30-190 s on the loaded machine): one call
  timeout was not enough, and the processor exited instead of riding through.

The producers here stand in for librdkafka's in exactly those calls; everything around them is
the real `TransactionalProducer`.
"""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.runtime import transactions
from streams.runtime.transactions import (
    REPLACE_CALL_TIMEOUTS,
    SEND_OFFSETS_GRACE_S,
    TransactionAborted,
    TransactionalProducer,
)

CALL_TIMEOUT_S = 0.5


class _LostCoordinatorProducer:
    """A librdkafka producer whose `send_offsets_to_transaction` waits until it is released."""

    made: list[_LostCoordinatorProducer] = []

    def __init__(self, config: dict) -> None:
        self.config = config
        self.released = threading.Event()
        self.calls: list[str] = []
        _LostCoordinatorProducer.made.append(self)

    def init_transactions(self, timeout: float) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets, group_metadata, timeout: float) -> None:
        self.calls.append("send_offsets")
        self.released.wait(30)  # as librdkafka, whatever `timeout` said

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")

    def purge(self) -> None:
        self.calls.append("purge")

    def flush(self, timeout: float) -> int:
        return 0


@pytest.fixture
def lost_coordinator(monkeypatch: pytest.MonkeyPatch):
    _LostCoordinatorProducer.made = []
    monkeypatch.setattr(transactions, "Producer", _LostCoordinatorProducer)
    yield _LostCoordinatorProducer.made
    for producer in _LostCoordinatorProducer.made:
        producer.released.set()


def test_a_send_offsets_call_that_outlives_its_timeout_aborts_the_batch_within_a_bound(lost_coordinator) -> None:
    producer = TransactionalProducer(
        {"transactional.id": "t-1", "transaction.timeout.ms": 10_000}, "dlq", call_timeout_s=CALL_TIMEOUT_S
    )
    producer.begin()
    started_s = time.monotonic()
    with pytest.raises(TransactionAborted, match="did not return"):
        producer.commit([TopicPartition("commands", 0, 7)], object())
    elapsed_s = time.monotonic() - started_s
    assert CALL_TIMEOUT_S <= elapsed_s < CALL_TIMEOUT_S + SEND_OFFSETS_GRACE_S + 1

    # The processor's recovery: replace (nothing may be called on the held producer).
    producer.replace()
    held, fresh = lost_coordinator
    assert "commit" not in held.calls and "abort" not in held.calls
    assert fresh.calls == ["init"], "the new producer, same transactional id, fences the held one"
    assert fresh.config["transactional.id"] == held.config["transactional.id"]


def test_the_bound_follows_the_transaction_timeout_librdkafka_caps_the_call_to(lost_coordinator) -> None:
    config = {"transactional.id": "t-2", "transaction.timeout.ms": 300}
    producer = TransactionalProducer(config, "dlq", call_timeout_s=30)
    producer.begin()
    started_s = time.monotonic()
    with pytest.raises(TransactionAborted):
        producer.commit([TopicPartition("commands", 0, 7)], object())
    assert time.monotonic() - started_s < 0.3 + SEND_OFFSETS_GRACE_S + 1


class _CoordinatorOutageProducer(_LostCoordinatorProducer):
    """`init_transactions` times out (retriable, as librdkafka says) until the outage ends."""

    outage_ends_s = 0.0

    def init_transactions(self, timeout: float) -> None:
        self.calls.append("init")
        if time.monotonic() < _CoordinatorOutageProducer.outage_ends_s:
            time.sleep(min(timeout, 0.05))
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation", retriable=True))


@pytest.fixture
def coordinator_outage(monkeypatch: pytest.MonkeyPatch):
    _CoordinatorOutageProducer.outage_ends_s = 0.0
    monkeypatch.setattr(transactions, "Producer", _CoordinatorOutageProducer)


def test_a_replacement_waits_out_a_coordinator_outage_longer_than_one_call(coordinator_outage) -> None:
    producer = TransactionalProducer({"transactional.id": "t-3"}, "dlq", call_timeout_s=0.2)
    _CoordinatorOutageProducer.outage_ends_s = time.monotonic() + 0.2 * REPLACE_CALL_TIMEOUTS / 2
    producer.replace()  # returns once the coordinator answers
    assert time.monotonic() >= _CoordinatorOutageProducer.outage_ends_s


def test_a_replacement_gives_up_after_its_bound(coordinator_outage) -> None:
    producer = TransactionalProducer({"transactional.id": "t-4"}, "dlq", call_timeout_s=0.2)
    _CoordinatorOutageProducer.outage_ends_s = time.monotonic() + 60
    started_s = time.monotonic()
    with pytest.raises(TransactionAborted, match="initialising"):
        producer.replace()
    assert 0.2 * REPLACE_CALL_TIMEOUTS <= time.monotonic() - started_s < 0.2 * REPLACE_CALL_TIMEOUTS + 1


class _NoGroupCoordinatorProducer(_LostCoordinatorProducer):
    """`send_offsets_to_transaction` as librdkafka 2.16 answered it when the active KRaft controller
    was SIGKILLed under load (the cluster fault test): _STATE, neither fatal nor retriable."""

    def send_offsets_to_transaction(self, offsets, group_metadata, timeout: float) -> None:
        self.calls.append("send_offsets")
        raise KafkaException(
            KafkaError(
                KafkaError._STATE,
                "Failed to commit offsets to transaction on broker (none): Local: Erroneous state (after 0 ms)",
            )
        )


def test_send_offsets_refused_for_want_of_a_group_coordinator_aborts_the_batch(monkeypatch) -> None:
    monkeypatch.setattr(transactions, "Producer", _NoGroupCoordinatorProducer)
    producer = TransactionalProducer({"transactional.id": "t-5"}, "dlq", call_timeout_s=CALL_TIMEOUT_S)
    producer.begin()
    with pytest.raises(TransactionAborted, match="broker \\(none\\)"):
        producer.commit([TopicPartition("commands", 0, 7)], object())
    producer.replace()  # the processor's recovery
    # Outside a transaction the same error is this program's misuse: still a bug.
    with pytest.raises(transactions.TransactionBug):
        producer.commit([TopicPartition("commands", 0, 7)], object())


class _AbortNeededProducer(_LostCoordinatorProducer):
    """A commit refused with an error that needs an abort, from a producer whose coordinator is gone:
    `abort_transaction` would wait its whole timeout (the coordinator-kill fault test)."""

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "EndTxn timed out", txn_requires_abort=True))

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        self.released.wait(timeout)


def test_a_commit_that_needs_an_abort_is_ended_by_the_replacement_without_waiting_for_an_abort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _LostCoordinatorProducer.made = []
    monkeypatch.setattr(transactions, "Producer", _AbortNeededProducer)
    producer = TransactionalProducer({"transactional.id": "t-6"}, "dlq", call_timeout_s=CALL_TIMEOUT_S * 4)
    producer.begin()
    started_s = time.monotonic()
    with pytest.raises(TransactionAborted, match="EndTxn timed out"):
        producer.commit([], object())
    producer.replace()  # the processor's recovery
    assert time.monotonic() - started_s < CALL_TIMEOUT_S, "recovery waited for an abort"
    failed, fresh = _LostCoordinatorProducer.made
    assert "abort" not in failed.calls
    assert fresh.calls == ["init"], "the new producer, same transactional id, ends the open transaction"
    fresh.begin_transaction()  # usable at once
