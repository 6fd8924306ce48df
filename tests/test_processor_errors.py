"""Bugs crash, bad input does not (issue 11 item 4, issue 12): which errors stop the processor.

The core's `UndecidableInput` is the only exception the processor dead-letters; any other
exception out of the core is a bug and stops the process before its batch commits. Kafka's
errors come in two kinds, decided in one place (`streams/runtime/transactions.py`).
"""

from __future__ import annotations

import os
import threading

import pytest
from confluent_kafka import KafkaError, KafkaException

import streams.runtime.processor as processor_module
from schemas.commands import Deposit, OpenAccount, RefundLeg
from schemas.leg_auth import LegKeyring
from streams.cli import state_dump
from streams.runtime.processor import Processor, ProcessorConfig
from streams.runtime.transactions import TransactionAborted, TransactionBug, classify
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic

OUTCOME_TIMEOUT_S = 60


def _error(code: int, **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, "test", **flags))


@pytest.mark.parametrize(
    "code, flags",
    [
        (KafkaError._TIMED_OUT, {"retriable": True}),  # a commit that timed out: its fate is unknown
        (KafkaError._FENCED, {"fatal": True}),  # a zombie of ourselves took over: start a new producer
        (KafkaError.INVALID_TXN_STATE, {"fatal": True}),
        (KafkaError._TRANSPORT, {}),  # the broker went away
        (KafkaError._STATE, {"fatal": True}),  # after a fatal error every call says _STATE: replace
    ],
)
def test_transaction_errors_a_new_producer_can_cure_are_recoverable(code, flags):
    assert type(classify(_error(code, **flags), "committing")) is TransactionAborted


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._STATE,
        KafkaError._INVALID_ARG,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ],
)
def test_transaction_errors_no_rebuild_cures_are_bugs(code):
    error = classify(_error(code), "beginning a transaction")
    assert type(error) is TransactionBug and "beginning a transaction" in str(error)


def _in_process(settings, instance_id: str) -> Processor:
    return Processor(settings, ProcessorConfig(instance_id=instance_id, store_path=settings.run_dir / instance_id))


def _core_raising(transaction_id: str, error: Exception, monkeypatch) -> None:
    """The core as the processor calls it, except that deciding `transaction_id` raises `error`.

    The processor module's own binding is replaced: the compiled core (infra/native.py) calls
    its functions directly, so a patch inside the core would not be seen."""
    real_decide = processor_module.decide

    def decide(state, command, *args):
        if command.transaction_id == transaction_id:
            raise error
        return real_decide(state, command, *args)

    monkeypatch.setattr(processor_module, "decide", decide)


def _drive(settings, steps) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        outcomes = OutcomeCollector(settings)
        try:
            steps(outcomes)
        except BaseException as error:  # noqa: BLE001 - the main thread reports it
            errors.append(error)
        finally:
            outcomes.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_bug_in_the_core_stops_the_processor_before_its_batch_commits(make_settings, monkeypatch):
    settings = make_settings(1)
    _core_raising("explode", AssertionError("a broken invariant"), monkeypatch)
    processor = _in_process(settings, "buggy")

    def steps(outcomes) -> None:
        publish(
            command_producer(settings),
            settings,
            [edge(OpenAccount, transaction_id="open-dave", account_id="dave", currency="USD")],
        )
        outcomes.wait("open-dave", timeout_s=OUTCOME_TIMEOUT_S)
        publish(
            command_producer(settings),
            settings,
            [edge(Deposit, transaction_id="explode", account_id="dave", amount="3.00", currency="USD")],
        )

    driver = _drive(settings, steps)
    with pytest.raises(AssertionError, match="a broken invariant"):
        processor.run()
    driver.join(OUTCOME_TIMEOUT_S)
    assert not driver.errors, driver.errors
    assert read_topic(settings, settings.dlq_topic) == [], "a bug must not be dead-lettered"
    answered = {record.key for record in read_topic(settings, settings.outcomes_topic)}
    assert answered == {b"open-dave"}, "the batch that met the bug must not commit"
    snapshot = state_dump(settings.run_dir / "buggy")["partitions"].get("0")
    assert snapshot is None or snapshot["accounts"]["dave"]["balance"] == "0.00"


def test_undecidable_input_is_dead_lettered_and_processing_continues(make_settings):
    settings = make_settings(1)
    processor = _in_process(settings, "careful")
    # Signed with the processors' own key, so it passes admission and reaches the core, which
    # cannot decide it: erin remembers no pending debit that it would refund.
    forged = LegKeyring.parse(os.environ["WALLET_LEG_KEYS"]).sign(
        RefundLeg(
            transaction_id="forged",
            actor="erin",
            issued_ms=0,
            from_account="erin",
            to_account="frank",
            amount="9.00",
            currency="USD",
            digest="0" * 24,
            reason="account_frozen",
            debit_ms=0,
        )
    )

    def steps(outcomes) -> None:
        try:
            publish(
                command_producer(settings),
                settings,
                [
                    edge(OpenAccount, transaction_id="open-erin", account_id="erin", currency="USD"),
                    forged,
                    edge(Deposit, transaction_id="after", account_id="erin", amount="1.00", currency="USD"),
                ],
            )
            assert outcomes.wait("after", timeout_s=OUTCOME_TIMEOUT_S)[0].status == "success"
        finally:
            processor.stop()

    driver = _drive(settings, steps)
    processor.run()
    driver.join(OUTCOME_TIMEOUT_S)
    assert not driver.errors, driver.errors
    [dead] = read_topic(settings, settings.dlq_topic)
    assert b'"forged"' in dead.value and b"matches no debit" in dead.headers["error"]
    assert state_dump(settings.run_dir / "careful")["partitions"]["0"]["accounts"]["erin"]["balance"] == "1.00"


class _CommittedFailsOnce:
    """The processor's real consumer, except that one `committed()` raises NOT_COORDINATOR: the
    group coordinator's broker was lost while the processor rebuilt its partitions."""

    def __init__(self, consumer) -> None:
        self._consumer = consumer
        self.failed = False

    def committed(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise _error(KafkaError.NOT_COORDINATOR, retriable=True)
        return self._consumer.committed(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)


def test_a_recovery_that_loses_the_group_coordinator_rejoins_instead_of_stopping(make_settings):
    """A batch aborts, and asking for the committed offsets during the rebuild fails: the processor
    replaces its consumer and decides the batch again, once."""
    settings = make_settings(1)
    processor = _in_process(settings, "rejoining")
    real_commit = processor._transactions.commit
    commits_to_fail = []

    def commit(offsets, group_metadata) -> None:
        if commits_to_fail:
            commits_to_fail.pop()
            raise TransactionAborted("injected: the commit's fate is unknown")
        real_commit(offsets, group_metadata)

    processor._transactions.commit = commit
    injected = _CommittedFailsOnce(processor._consumer)

    def steps(outcomes) -> None:
        try:
            producer = command_producer(settings)
            publish(
                producer, settings, [edge(OpenAccount, transaction_id="open-finn", account_id="finn", currency="USD")]
            )
            outcomes.wait("open-finn", timeout_s=OUTCOME_TIMEOUT_S)
            injected._consumer = processor._consumer
            processor._consumer = injected
            commits_to_fail.append(True)
            publish(
                producer,
                settings,
                [edge(Deposit, transaction_id="fund-finn", account_id="finn", amount="5.00", currency="USD")],
            )
            assert outcomes.wait("fund-finn", timeout_s=OUTCOME_TIMEOUT_S)[0].status == "success"
        finally:
            processor.stop()

    driver = _drive(settings, steps)
    processor.run()
    driver.join(OUTCOME_TIMEOUT_S)
    assert not driver.errors, driver.errors
    assert injected.failed and not commits_to_fail, "the fault was not injected"
    answered = [record.key for record in read_topic(settings, settings.outcomes_topic)]
    assert answered == [b"open-finn", b"fund-finn"], answered
    assert state_dump(settings.run_dir / "rejoining")["partitions"]["0"]["accounts"]["finn"]["balance"] == "5.00"


def test_a_restore_cut_off_by_a_lost_broker_rejoins_instead_of_stopping(make_settings, monkeypatch):
    settings = make_settings(1)
    processor = _in_process(settings, "restoring")
    real_restore = processor._restore
    failures = [_error(KafkaError._TRANSPORT)]

    def restore(partitions) -> None:
        if failures:
            raise failures.pop()
        real_restore(partitions)

    monkeypatch.setattr(processor, "_restore", restore)

    def steps(outcomes) -> None:
        try:
            publish(
                command_producer(settings),
                settings,
                [edge(OpenAccount, transaction_id="open-gail", account_id="gail", currency="USD")],
            )
            assert outcomes.wait("open-gail", timeout_s=OUTCOME_TIMEOUT_S)[0].status == "success"
        finally:
            processor.stop()

    driver = _drive(settings, steps)
    processor.run()
    driver.join(OUTCOME_TIMEOUT_S)
    assert not driver.errors, driver.errors
    assert not failures, "the fault was not injected"
