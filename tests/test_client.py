"""The producer library against the real broker: where commands land, delivery reports,
back-pressure, and the outcome waiter's matching by (transaction id, digest)."""

from __future__ import annotations

import time
import uuid
from typing import TypeVar

import msgspec
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from infra.ports import free_loopback_ports
from infra.settings import Settings
from producers.client import (
    BackPressureTimeout,
    CommandPublisher,
    OutcomesUnavailableError,
    OutcomeWaiter,
    PublishError,
    canonical_amount,
    new_transaction_id,
)
from schemas.codec import decode_command, encode
from schemas.commands import Deposit, Transfer
from schemas.outcomes import Outcome, Reason
from schemas.partitioning import KAFKA_PARTITIONER, partition_for
from streams.core.money import AmountError
from tests.support.commands import edge

READY_TIMEOUT_S = 15
DELIVERY_TIMEOUT_S = 15
OUTCOME_WAIT_S = 10
ABSENCE_WAIT_S = 1.5  # how long "no answer" is observed before concluding there is none
T = TypeVar("T")


def _transfer(from_account: str, to_account: str = "receiver", amount: str = "1.00", tx: str | None = None) -> Transfer:
    transfer = edge(
        Transfer,
        transaction_id=tx or new_transaction_id(),
        from_account=from_account,
        to_account=to_account,
        amount=amount,
        currency="USD",
    )
    assert isinstance(transfer, Transfer)  # edge builds the class it is given
    return transfer


def _present(answer: T | None) -> T:
    """An answer the test waited for, which must have come."""
    assert answer is not None
    return answer


def _records(settings: Settings, topic: str, partition: int, start_offset: int, count: int) -> list:
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap, "group.id": f"reader-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, partition, start_offset)])
        records: list[Message] = []
        deadline_s = time.monotonic() + DELIVERY_TIMEOUT_S
        while len(records) < count and time.monotonic() < deadline_s:
            records += [message for message in consumer.consume(count - len(records), 0.5) if message.error() is None]
        return records
    finally:
        consumer.close()


def _outcome_producer(settings: Settings) -> Producer:
    return Producer({"bootstrap.servers": settings.bootstrap, "partitioner": KAFKA_PARTITIONER})


def _publish_outcomes(settings: Settings, *outcomes: Outcome) -> None:
    producer = _outcome_producer(settings)
    for outcome in outcomes:
        producer.produce(settings.outcomes_topic, encode(outcome), outcome.transaction_id)
    assert producer.flush(DELIVERY_TIMEOUT_S) == 0


def _failure(transaction_id: str, digest: str, reason: str, actor: str = "acct") -> Outcome:
    return Outcome(
        transaction_id=transaction_id, account_id="acct", actor=actor, status="failure", reason=reason, digest=digest
    )


def _dead_bootstrap() -> str:
    (port,) = free_loopback_ports(1)
    return f"127.0.0.1:{port}"


@pytest.fixture
def waiter(wallet_settings: Settings):
    with OutcomeWaiter.from_settings(wallet_settings).start(ready_timeout_s=READY_TIMEOUT_S) as started:
        yield started


def test_send_places_the_command_on_its_owner_accounts_partition_keyed_by_the_account(
    wallet_settings: Settings,
) -> None:
    with CommandPublisher.from_settings(wallet_settings) as publisher:
        deliveries = {
            account: publisher.send(_transfer(account), DELIVERY_TIMEOUT_S)
            for account in (f"sender-{index}" for index in range(12))
        }
    for account, delivery in deliveries.items():
        assert delivery.topic == wallet_settings.commands_topic
        assert delivery.partition == partition_for(account, 4)
        (record,) = _records(wallet_settings, delivery.topic, delivery.partition, delivery.offset, 1)
        assert record.key() == account.encode()
        value = record.value()
        assert value is not None
        command = decode_command(value)
        assert isinstance(command, Transfer) and command.from_account == account


def test_a_batch_larger_than_the_local_queue_waits_for_room_and_arrives_complete_and_in_order(
    wallet_settings: Settings,
) -> None:
    account = f"batch-{uuid.uuid4().hex[:8]}"
    commands = [_transfer(account, tx=f"{account}-{index}") for index in range(300)]
    with CommandPublisher.from_settings(wallet_settings, queue_messages_max=16) as publisher:
        first = publisher.send(_transfer(account, tx=f"{account}-first"), DELIVERY_TIMEOUT_S)
        publisher.publish_batch(commands)
        publisher.flush(DELIVERY_TIMEOUT_S)
    records = _records(wallet_settings, first.topic, first.partition, first.offset + 1, len(commands))
    assert [decode_command(record.value()).transaction_id for record in records] == [c.transaction_id for c in commands]


def test_submitted_commands_beyond_the_queue_size_all_get_a_delivery(wallet_settings: Settings) -> None:
    with CommandPublisher.from_settings(wallet_settings, queue_messages_max=4) as publisher:
        futures = [publisher.submit(_transfer(f"many-{index % 7}")) for index in range(100)]
        deliveries = [future.result(DELIVERY_TIMEOUT_S) for future in futures]
    assert len({(d.partition, d.offset) for d in deliveries}) == 100


def test_a_full_queue_that_does_not_drain_fails_the_command_instead_of_dropping_it() -> None:
    with CommandPublisher(
        _dead_bootstrap(), "wallet.commands", queue_messages_max=3, enqueue_timeout_s=0.5
    ) as publisher:
        futures = [publisher.submit(_transfer("stuck")) for _ in range(3)]
        started_s = time.monotonic()
        with pytest.raises(BackPressureTimeout):
            publisher.submit(_transfer("stuck"))
        assert time.monotonic() - started_s < 3
        publisher._producer.purge()  # noqa: SLF001 - end the test without waiting out the message timeout
        publisher._producer.flush(1)  # noqa: SLF001
        assert all(isinstance(future.exception(1), PublishError) for future in futures)


def test_publishing_while_no_broker_answers_fails_within_the_message_timeout() -> None:
    with CommandPublisher(_dead_bootstrap(), "wallet.commands", message_timeout_ms=1000) as publisher:
        started_s = time.monotonic()
        with pytest.raises(PublishError) as raised:
            publisher.send(_transfer("nobody-home"))
        assert time.monotonic() - started_s < 1 + 2  # librdkafka checks message timeouts about once a second
        assert raised.value.code == "_MSG_TIMED_OUT"
        assert not publisher.broker_reachable(timeout_s=0.5)


def test_the_waiter_answers_each_request_with_the_outcome_of_its_own_digest(
    wallet_settings: Settings, waiter: OutcomeWaiter
) -> None:
    tx = new_transaction_id()
    first = waiter.expect(tx, "digest-first")
    conflicting = waiter.expect(tx, "digest-conflicting")
    _publish_outcomes(
        wallet_settings,
        _failure(tx, "digest-conflicting", Reason.DUPLICATE_CONFLICT),
        Outcome(transaction_id=tx, account_id="acct", actor="acct", status="success", digest="digest-first"),
    )
    assert _present(first.wait(OUTCOME_WAIT_S)).status == "success"
    assert _present(conflicting.wait(OUTCOME_WAIT_S)).reason == Reason.DUPLICATE_CONFLICT


def test_the_waiter_gives_none_when_no_outcome_arrives_in_time(waiter: OutcomeWaiter) -> None:
    started_s = time.monotonic()
    with waiter.expect(new_transaction_id(), "digest") as expectation:
        assert expectation.wait(0.5) is None
    assert 0.5 <= time.monotonic() - started_s < 2


def test_the_waiter_starts_at_the_end_of_the_topic_and_never_answers_with_history(wallet_settings: Settings) -> None:
    tx = new_transaction_id()
    _publish_outcomes(
        wallet_settings,
        Outcome(transaction_id=tx, account_id="acct", actor="acct", status="failure", reason="old", digest="d"),
    )
    with OutcomeWaiter.from_settings(wallet_settings).start(ready_timeout_s=READY_TIMEOUT_S) as waiter:
        with waiter.expect(tx, "d") as expectation:
            assert expectation.wait(ABSENCE_WAIT_S) is None
            _publish_outcomes(
                wallet_settings,
                Outcome(transaction_id=tx, account_id="acct", actor="acct", status="success", digest="d"),
            )
            assert _present(expectation.wait(OUTCOME_WAIT_S)).status == "success"


def test_the_waiter_never_answers_with_an_outcome_from_an_aborted_transaction(
    wallet_settings: Settings, waiter: OutcomeWaiter
) -> None:
    tx = new_transaction_id()
    producer = Producer(
        {
            "bootstrap.servers": wallet_settings.bootstrap,
            "partitioner": KAFKA_PARTITIONER,
            "transactional.id": f"{wallet_settings.topic_prefix}outcomes-{uuid.uuid4().hex[:8]}",
        }
    )
    producer.init_transactions(DELIVERY_TIMEOUT_S)
    with waiter.expect(tx, "d") as expectation:
        producer.begin_transaction()
        producer.produce(
            wallet_settings.outcomes_topic,
            encode(
                Outcome(
                    transaction_id=tx, account_id="acct", actor="acct", status="failure", reason="aborted", digest="d"
                )
            ),
            tx,
        )
        producer.abort_transaction(DELIVERY_TIMEOUT_S)
        producer.begin_transaction()
        producer.produce(
            wallet_settings.outcomes_topic,
            encode(Outcome(transaction_id=tx, account_id="acct", actor="acct", status="success", digest="d")),
            tx,
        )
        producer.commit_transaction(DELIVERY_TIMEOUT_S)
        assert _present(expectation.wait(OUTCOME_WAIT_S)).status == "success"


def test_the_status_cache_keeps_the_transactions_answer_despite_a_later_conflicting_request(
    wallet_settings: Settings, waiter: OutcomeWaiter
) -> None:
    tx = new_transaction_id()
    waiter.note_published(tx, "first")
    assert _present(waiter.status(tx)).status == "pending"
    with waiter.expect(tx, "first") as answer, waiter.expect(tx, "second") as conflict:
        _publish_outcomes(
            wallet_settings,
            _failure(tx, "first", Reason.INSUFFICIENT_FUNDS),
            _failure(tx, "second", Reason.DUPLICATE_CONFLICT),
        )
        assert answer.wait(OUTCOME_WAIT_S) is not None
        assert conflict.wait(OUTCOME_WAIT_S) is not None
    status = _present(waiter.status(tx))
    assert (status.status, status.reason, status.digest) == ("failure", Reason.INSUFFICIENT_FUNDS, "first")


def test_the_status_cache_keeps_a_pending_request_despite_a_strangers_refusal_under_its_id(
    wallet_settings: Settings, waiter: OutcomeWaiter
) -> None:
    tx = new_transaction_id()
    waiter.note_published(tx, "own", "acct", "acct")
    with waiter.expect(tx, "strangers") as refusal:
        _publish_outcomes(
            wallet_settings,
            _failure(tx, "strangers", Reason.NOT_AUTHORIZED, actor="mallory"),
        )
        assert refusal.wait(OUTCOME_WAIT_S) is not None
    status = _present(waiter.status(tx))
    assert (status.status, status.digest, status.actor) == ("pending", "own", "acct")


def test_the_status_cache_forgets_the_oldest_transaction_beyond_its_bound() -> None:
    waiter = OutcomeWaiter(_dead_bootstrap(), "wallet.outcomes", cache_size_max=2)
    try:
        for tx in ("tx-1", "tx-2", "tx-3"):
            waiter.note_published(tx, "d")
        assert waiter.status("tx-1") is None
        assert _present(waiter.status("tx-3")).status == "pending"
    finally:
        waiter.close()


def test_a_waiter_without_a_broker_reports_why_instead_of_hanging() -> None:
    waiter = OutcomeWaiter(_dead_bootstrap(), "wallet.outcomes")
    started_s = time.monotonic()
    with pytest.raises(OutcomesUnavailableError, match="not connected to Kafka"):
        waiter.start(ready_timeout_s=1)
    waiter.close()
    assert time.monotonic() - started_s < 5


def test_the_number_of_waiting_requests_is_bounded() -> None:
    waiter = OutcomeWaiter(_dead_bootstrap(), "wallet.outcomes", waits_max=2)
    try:
        first, second = waiter.expect("a", "d"), waiter.expect("b", "d")
        with pytest.raises(OutcomesUnavailableError, match="already waiting"):
            waiter.expect("c", "d")
        first.close()
        waiter.expect("c", "d").close()
        second.close()
    finally:
        waiter.close()


@pytest.mark.parametrize(
    ("amount", "currency", "canonical"), [("5", "USD", "5.00"), ("0.5", "BHD", "0.500"), ("12", "JPY", "12")]
)
def test_canonical_amount_spells_a_sum_as_the_core_does(amount: str, currency: str, canonical: str) -> None:
    assert canonical_amount(amount, currency) == canonical


@pytest.mark.parametrize("amount", ["1.234", "-1", "0", "1e3", "", "1,00"])
def test_canonical_amount_refuses_what_the_core_refuses(amount: str) -> None:
    with pytest.raises(AmountError):
        canonical_amount(amount, "USD")


def test_a_publisher_for_failures_only_refuses_single_submits() -> None:
    with CommandPublisher(_dead_bootstrap(), "wallet.commands", report_successes=False) as publisher:
        with pytest.raises(ValueError, match="publish_batch"):
            publisher.submit(edge(Deposit, transaction_id="t", account_id="a", amount="1.00", currency="USD"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("from_account", "bad id"), ("to_account", "-leading-dash"), ("to_account", "x" * 65), ("transaction_id", "t/1")],
)
def test_a_command_with_an_id_outside_the_contract_is_refused_naming_the_field(field: str, value: str) -> None:
    command = msgspec.structs.replace(_transfer("sender"), **{field: value})
    with CommandPublisher(_dead_bootstrap(), "wallet.commands") as publisher:
        with pytest.raises(ValueError, match=field):
            publisher.submit(command)
