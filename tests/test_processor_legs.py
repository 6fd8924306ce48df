"""The processor's decide step on a real broker: legs are authenticated, the broker's clock decides,
and a dead-lettered client record still gets an answer (issue 12, items 1, 2, 4 and 10)."""

from __future__ import annotations

import hashlib
import os

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from infra.admin import TopicMismatchError, admin_client, ensure_topics
from schemas.codec import decode_event, encode
from schemas.commands import CreditLeg, Deposit, OpenAccount, RefundLeg, Transfer
from schemas.leg_auth import LegKeyring
from schemas.partitioning import partition_for
from streams.core.state import State, fold
from streams.runtime.transactions import DEAD_LETTER_VALUE_BYTES_MAX
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic, wait_for
from tests.support.processes import ProcessorProcess

PARTITIONS = 2
PROCESSORS_KEYRING = LegKeyring.parse(os.environ["WALLET_LEG_KEYS"])  # conftest sets the session's key
WRONG_KEYRING = LegKeyring.parse(PROCESSORS_KEYRING.signing_kid + ":" + "99" * 32)


def _balances(settings) -> dict[str, int]:
    states: dict[int, State] = {}
    for record in read_topic(settings, settings.events_topic):
        assert record.value is not None  # the wallet writes no tombstones
        fold(states.setdefault(record.partition, State()), decode_event(record.value))
    return {
        account_id: account.balance_minor for state in states.values() for account_id, account in state.accounts.items()
    }


def _raw(settings, key: str, value: bytes | None, partition: int | None = None) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap, "message.max.bytes": 2_000_000})
    if partition is None:
        partition = partition_for(key, PARTITIONS)
    producer.produce(settings.commands_topic, value, key.encode(), partition=partition)
    assert producer.flush(10) == 0


@pytest.fixture(scope="module")
def running(make_settings):
    settings = make_settings(PARTITIONS)
    processor = ProcessorProcess(settings, "legs-1").start()
    outcomes = OutcomeCollector(settings)
    setup = [edge(OpenAccount, transaction_id=f"open-{a}", account_id=a, currency="USD") for a in ("alice", "bob")]
    setup.append(edge(Deposit, transaction_id="fund-alice", account_id="alice", amount="10.00", currency="USD"))
    publish(command_producer(settings), settings, setup)
    outcomes.wait_all({c.transaction_id for c in setup})
    yield settings, outcomes
    outcomes.close()
    assert processor.stop() == 0, processor.log_tail()


def _credit_from_alice_to_bob(transaction_id: str, amount: str = "1000.00", kid: str = "", mac: str = "") -> CreditLeg:
    """A credit leg no debit of alice's ever made, as a forger writes it."""
    return CreditLeg(
        transaction_id=transaction_id,
        actor="alice",
        issued_ms=0,
        from_account="alice",
        to_account="bob",
        amount=amount,
        currency="USD",
        digest="0" * 24,
        kid=kid,
        mac=mac,
    )


def test_forged_credit_leg_without_debit_mints_nothing(running):
    settings, outcomes = running
    forged = _credit_from_alice_to_bob("forged-1")
    refund = RefundLeg(
        transaction_id="forged-2",
        actor="alice",
        issued_ms=0,
        from_account="alice",
        to_account="bob",
        amount="1000.00",
        currency="USD",
        digest="0" * 24,
        reason="account_frozen",
        debit_ms=0,
    )
    negative = PROCESSORS_KEYRING.sign(_credit_from_alice_to_bob("forged-3", amount="-5.00"))
    for leg in (forged, WRONG_KEYRING.sign(forged), refund, negative):
        _raw(settings, leg.to_account if type(leg) is CreditLeg else leg.from_account, encode(leg))
    after = edge(Deposit, transaction_id="after-forgeries", account_id="bob", amount="1.00", currency="USD")
    publish(command_producer(settings), settings, [after])
    assert outcomes.wait("after-forgeries")[0].status == "success"
    dead = {record.value: record.headers["error"].decode() for record in read_topic(settings, settings.dlq_topic)}
    assert "unsigned" in dead[encode(forged)]
    assert "does not verify" in dead[encode(WRONG_KEYRING.sign(forged))]
    assert "unsigned" in dead[encode(refund)]
    assert "cannot decide" in dead[encode(negative)]
    assert _balances(settings) == {"alice": 1000, "bob": 100}
    outcomes.poll()
    assert not [tx for tx in outcomes.by_transaction if tx.startswith("forged-")]


def test_records_that_once_crashed_admission_are_dead_lettered_and_the_processor_goes_on(running):
    # Written straight to the topic, as an attacker with produce rights would: a leg whose MAC
    # is not ASCII, and a command whose type tag is a JSON object or list. Each once raised out
    # of admission, so the processor crashed and restarted on the same record forever.
    settings, outcomes = running
    before = _balances(settings)
    leg = _credit_from_alice_to_bob("hostile-mac", kid=PROCESSORS_KEYRING.signing_kid, mac="\u00e9" * 32)
    hostile = [
        ("bob", encode(leg)),
        ("alice", b'{"type":{},"transaction_id":"hostile-tag-1","account_id":"alice","amount":"5.00"}'),
        ("alice", b'{"type":["deposit"],"transaction_id":"hostile-tag-2","account_id":"alice","amount":"5.00"}'),
        # Invalid UTF-8 in a string, a tombstone and deep nesting once raised out of the decoder.
        ("alice", b'{"type":"transfer","transaction_id":"hostile-\xff\xfe"}'),
        ("alice", None),
        ("alice", b'{"type":"transfer","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
    ]
    # Over the producer's 1,000,000 bytes but under the topic's limit: its dead letter, a whole
    # copy, was refused as too large and failed the batch on the same record at every retry.
    big = b"x" * 1_010_000
    for key, value in [*hostile, ("alice", big)]:
        _raw(settings, key, value)
    after = edge(Deposit, transaction_id="after-hostile", account_id="bob", amount="1.00", currency="USD")
    publish(command_producer(settings), settings, [after])
    assert outcomes.wait("after-hostile")[0].status == "success"
    dead = {record.value: record.headers["error"].decode() for record in read_topic(settings, settings.dlq_topic)}
    assert "does not verify" in dead[encode(leg)]
    assert all(value in dead for _, value in hostile)
    [big_letter] = [record for record in read_topic(settings, settings.dlq_topic) if record.headers.get("value_bytes")]
    assert big_letter.value == big[:DEAD_LETTER_VALUE_BYTES_MAX]
    assert big_letter.headers["value_bytes"] == str(len(big)).encode()
    assert big_letter.headers["value_sha256"] == hashlib.sha256(big).hexdigest().encode()
    assert _balances(settings) == {**before, "bob": before["bob"] + 100}  # only the deposit after them moved
    outcomes.poll()
    assert not [tx for tx in outcomes.by_transaction if tx.startswith("hostile-")]


def test_a_dead_lettered_record_is_never_answered_and_a_misrouted_one_is_decided_by_its_owner(running):
    # Both were once answered `failure` under the transaction id their bytes named, a second
    # answer beside the real request's: the API told a client `failure` while its money moved.
    settings, outcomes = running
    before = _balances(settings)
    invalid = (
        b'{"type": "deposit", "transaction_id": "bad-amount-type", "account_id": "alice", '
        b'"amount": 5, "currency": "USD", "actor": "bank", "role": "bank"}'
    )
    _raw(settings, "alice", invalid)
    misrouted = edge(
        Transfer, transaction_id="misrouted-1", from_account="alice", to_account="bob", amount="1.00", currency="USD"
    )
    _raw(settings, "alice", encode(misrouted), partition=1 - partition_for("alice", PARTITIONS))
    [answer] = outcomes.wait("misrouted-1")
    assert (answer.status, answer.account_id) == ("success", "alice")
    after = edge(Deposit, transaction_id="after-misrouted", account_id="bob", amount="0.01", currency="USD")
    publish(command_producer(settings), settings, [after])
    outcomes.wait("after-misrouted")
    outcomes.poll()
    assert len(outcomes.by_transaction["misrouted-1"]) == 1  # one answer: the owner's
    assert "bad-amount-type" not in outcomes.by_transaction
    dead = {record.value: record.headers["error"].decode() for record in read_topic(settings, settings.dlq_topic)}
    assert "not a valid command" in dead[invalid]
    assert "forwarded there" in dead[encode(misrouted)]
    assert _balances(settings) == {**before, "alice": before["alice"] - 100, "bob": before["bob"] + 101}


def test_the_broker_stamps_every_command_and_the_decision_carries_its_time(running):
    settings, outcomes = running
    command = edge(Deposit, transaction_id="stamped-1", account_id="alice", amount="0.01", currency="USD")
    publish(command_producer(settings), settings, [command])
    outcomes.wait("stamped-1")
    [record] = [r for r in read_topic(settings, settings.events_topic) if r.value and b'"stamped-1"' in r.value]
    [logged] = [r for r in _command_records(settings) if b'"stamped-1"' in r[1]]
    assert record.value is not None
    assert decode_event(record.value).ts_ms >= logged[0] > 0  # never before the broker's own stamp


def _command_records(settings) -> list[tuple[int, bytes]]:
    from infra.log_reader import read_topic as read_log

    log = read_log(settings.bootstrap, settings.commands_topic, with_timestamps=True)
    records = []
    for part in log.partitions.values():
        assert part.timestamps is not None  # asked for above
        for stamp, value in zip(part.timestamps, part.values, strict=True):
            if value is not None:  # a hostile tombstone (above); the wallet writes none
                records.append((stamp, value))
    return records


def test_a_commands_topic_stamped_by_producers_is_a_mismatch_and_the_processor_refuses_it(make_settings):
    settings = make_settings(PARTITIONS)
    admin = admin_client(settings.bootstrap)
    entry = ConfigEntry("message.timestamp.type", "CreateTime", incremental_operation=AlterConfigOpType.SET)
    for future in admin.incremental_alter_configs(
        [ConfigResource(ResourceType.TOPIC, settings.commands_topic, incremental_configs=[entry])]
    ).values():
        future.result(timeout=30)

    def reported() -> bool:
        try:
            ensure_topics(settings)
        except TopicMismatchError as error:
            return "message.timestamp.type=CreateTime" in str(error)
        return False

    wait_for(reported, 15, "ensure_topics to report the CreateTime commands topic")

    processor = ProcessorProcess(settings, "create-time").start()
    try:
        publish(
            command_producer(settings),
            settings,
            [edge(OpenAccount, transaction_id="open-x", account_id="x", currency="USD")],
        )
        wait_for(lambda: processor.process.poll() is not None, 60, "the processor to stop")
        assert processor.process.returncode != 0
        assert "LogAppendTime" in processor.log_tail(50)
    finally:
        processor.stop()
    assert read_topic(settings, settings.events_topic) == []
