"""A broker that goes away in the middle of a commit (issue 12, item 3), on a real broker.

The test starts its own broker (the session's is shared by other tests) and freezes it with
SIGSTOP at the instant the processor commits a batch: the commit times out, the recovery
cannot reach the broker either, and the exception leaves `run()`. The RocksDB snapshot must
then hold only what Kafka committed, and after the broker is back a retried request must be
applied exactly once and the log must still fold.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from confluent_kafka import KafkaException, Producer

from consumers.audit import run_audit
from infra.admin import ensure_topics
from infra.ports import free_loopback_ports
from infra.settings import Settings
from schemas.codec import decode_event, encode
from schemas.commands import Deposit, OpenAccount
from streams.cli import state_dump
from streams.core.state import State, fold
from streams.runtime.processor import Processor, ProcessorConfig
from streams.runtime.transactions import TransactionAborted
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic
from wallet import localkafka

BROKER_START_TIMEOUT_S = 90
OUTCOME_TIMEOUT_S = 60
OUTAGE_CALL_TIMEOUT_MS = 3_000  # short bounds, so the outage is noticed in seconds
RESUMED_CALL_TIMEOUT_MS = 30_000


@pytest.fixture
def private_broker(tmp_path):
    kafka_port, controller_port = free_loopback_ports(2)
    settings = Settings(
        kafka_bootstrap="",
        run_dir=tmp_path,
        topic_prefix="outage.",
        partitions=1,
        local_kafka_port=kafka_port,
        local_controller_port=controller_port,
    )
    localkafka.fetch_jars(settings)
    started = localkafka.start(settings, timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True, sasl=False)
    try:
        ensure_topics(settings, timeout_s=30)
        _wait_for_the_transaction_coordinator(settings)
        yield settings, started.pid
    finally:
        os.kill(started.pid, signal.SIGCONT)  # a stopped JVM cannot act on SIGTERM
        localkafka.stop(settings)


def _wait_for_the_transaction_coordinator(settings: Settings) -> None:
    """A fresh broker creates its transaction log on first use and answers NOT_COORDINATOR meanwhile."""
    producer = Producer({"bootstrap.servers": settings.bootstrap, "transactional.id": "outage-warm-up"})
    deadline_s = time.monotonic() + BROKER_START_TIMEOUT_S
    while True:
        try:
            producer.init_transactions(5)
            return
        except KafkaException as error:
            assert error.args[0].retriable() and time.monotonic() < deadline_s, error
            time.sleep(0.2)


def _processor(settings: Settings, kafka_call_timeout_ms: int) -> Processor:
    return Processor(
        settings,
        ProcessorConfig(
            # No periodic flush during the test: the snapshot is written only on the way out, where
            # the committed-but-unsaved batch and the failed one are both in memory.
            instance_id="outage",
            store_path=settings.run_dir / "processor-outage",
            state_flush_interval_ms=600_000,
            kafka_call_timeout_ms=kafka_call_timeout_ms,
            commit_attempts_max=2,
        ),
    )


def _in_thread(work) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _account(settings: Settings, account_id: str) -> dict:
    return state_dump(settings.run_dir / "processor-outage")["partitions"]["0"]["accounts"][account_id]


@pytest.mark.kafka
def test_a_commit_cut_off_by_a_broker_outage_never_reaches_the_snapshot(private_broker):
    settings, broker_pid = private_broker
    opened = edge(OpenAccount, transaction_id="open-alice", account_id="alice", currency="USD")
    small = edge(Deposit, transaction_id="small", account_id="alice", amount="1.00", currency="USD")
    big = edge(Deposit, transaction_id="big", account_id="alice", amount="500.00", currency="USD")

    # 1. Commit two commands, then freeze the broker at the instant the next batch commits.
    processor = _processor(settings, OUTAGE_CALL_TIMEOUT_MS)
    transactions = processor._transactions
    commit = transactions.commit
    outage = threading.Event()

    def commit_into_an_outage(offsets, group_metadata):
        if outage.is_set():
            os.kill(broker_pid, signal.SIGSTOP)
        return commit(offsets, group_metadata)

    transactions.commit = commit_into_an_outage

    def drive_until_the_outage() -> None:
        outcomes = OutcomeCollector(settings)
        try:
            publish(command_producer(settings), settings, [opened, small])
            outcomes.wait_all(["open-alice", "small"], timeout_s=OUTCOME_TIMEOUT_S)
            outage.set()
            # Not `publish`: the processor may freeze the broker before the acknowledgement of
            # this record reaches us; it is in the log once the processor has read it.
            producer = command_producer(settings)
            producer.produce(settings.commands_topic, encode(big), big.account_id)
            producer.flush(OUTAGE_CALL_TIMEOUT_MS / 1000)
        finally:
            outcomes.close()

    driver = _in_thread(drive_until_the_outage)
    with pytest.raises(TransactionAborted):
        processor.run()
    driver.join(OUTCOME_TIMEOUT_S)
    assert not driver.errors, driver.errors

    # 2. The snapshot holds nothing Kafka did not commit: not the 501.00 the failed batch folded
    #    in memory. (It may be behind the log: the restore folds the rest.)
    snapshot = state_dump(settings.run_dir / "processor-outage")["partitions"].get("0")
    if snapshot is not None:
        assert snapshot["accounts"]["alice"]["balance"] in ("0.00", "1.00"), snapshot

    # 3. The broker is back; the client retries the deposit it got no answer to.
    os.kill(broker_pid, signal.SIGCONT)
    del processor, transactions
    restarted = _processor(settings, RESUMED_CALL_TIMEOUT_MS)  # the resumed broker first settles the open transaction

    def drive_the_retry() -> None:
        outcomes = OutcomeCollector(settings)
        try:
            publish(command_producer(settings), settings, [big])  # the same request again
            answers = outcomes.wait("big", count=2, timeout_s=OUTCOME_TIMEOUT_S)
            assert {(answer.status, answer.digest) for answer in answers} == {("success", answers[0].digest)}
        finally:
            outcomes.close()
            restarted.stop()

    driver = _in_thread(drive_the_retry)
    restarted.run()
    driver.join(OUTCOME_TIMEOUT_S)
    assert not driver.errors, driver.errors

    # 4. Applied once; the log folds to the snapshot; the audit agrees.
    state = State()
    for record in read_topic(settings, settings.events_topic):
        fold(state, decode_event(record.value))
    assert state.accounts["alice"].balance_minor == 50_100
    assert _account(settings, "alice")["balance"] == "501.00"
    report = run_audit(settings, state_dumps=[state_dump(settings.run_dir / "processor-outage")], settled=True)
    assert report.passed, report.render_text()
