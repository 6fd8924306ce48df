"""The saga end to end on a real broker, through a real `wallet processor` process."""

from __future__ import annotations

import itertools
import time

import pytest

from schemas.codec import command_digest, decode_event
from schemas.commands import Close, Deposit, Freeze, OpenAccount, PayMerchant, Transfer
from schemas.outcomes import Reason
from schemas.partitioning import partition_for
from streams.core.state import State, fold
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic
from tests.support.processes import ProcessorProcess

PARTITIONS = 4
_ids = itertools.count()


def _tx(label: str) -> str:
    return f"{label}-{next(_ids)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _accounts_on(partition_wanted: int, count: int, prefix: str) -> list[str]:
    found = [f"{prefix}{i}" for i in range(10_000) if partition_for(f"{prefix}{i}", PARTITIONS) == partition_wanted]
    return found[:count]


@pytest.fixture(scope="module")
def pipeline(make_settings):
    settings = make_settings(PARTITIONS)
    processor = ProcessorProcess(settings, "saga-1").start()
    producer = command_producer(settings)
    outcomes = OutcomeCollector(settings)
    yield settings, producer, outcomes
    outcomes.close()
    assert processor.stop() == 0, processor.log_tail()


def _ask(pipeline, command, count: int = 1):
    settings, producer, outcomes = pipeline
    publish(producer, settings, [command])
    return outcomes.wait(command.transaction_id, count=count)[-1]


def _open_funded(pipeline, account_id: str, amount: str = "100.00", currency: str = "USD", kind: str = "user") -> None:
    assert (
        _ask(
            pipeline, edge(OpenAccount, transaction_id=_tx("open"), account_id=account_id, currency=currency, kind=kind)
        ).status
        == "success"
    )
    if amount:
        assert (
            _ask(
                pipeline,
                edge(Deposit, transaction_id=_tx("dep"), account_id=account_id, amount=amount, currency=currency),
            ).status
            == "success"
        )


def _balances(settings) -> dict[str, int]:
    states: dict[int, State] = {}
    for record in read_topic(settings, settings.events_topic):
        assert record.value is not None  # the wallet writes no tombstones
        fold(states.setdefault(record.partition, State()), decode_event(record.value))
    return {
        account_id: account.balance_minor for state in states.values() for account_id, account in state.accounts.items()
    }


def _transfer(from_account: str, to_account: str, amount: str, currency: str = "USD", tx: str | None = None):
    return edge(
        Transfer,
        transaction_id=tx or _tx("t"),
        from_account=from_account,
        to_account=to_account,
        amount=amount,
        currency=currency,
    )


def test_transfer_within_one_partition_and_across_partitions_succeeds(pipeline):
    settings = pipeline[0]
    a, b = _accounts_on(0, 2, "same")
    (c,) = _accounts_on(1, 1, "other")
    for account in (a, b, c):
        _open_funded(pipeline, account)
    within, across = _transfer(a, b, "10.25"), _transfer(a, c, "0.75")
    assert _ask(pipeline, within).status == "success"
    assert _ask(pipeline, across).status == "success"
    balances = _balances(settings)
    assert (balances[a], balances[b], balances[c]) == (10000 - 1025 - 75, 10000 + 1025, 10000 + 75)
    # Only the transfer across partitions wrote a credit leg; the other settled in its own decision.
    legs = [
        record.value
        for record in read_topic(settings, settings.commands_topic)
        if b'"type":"credit_leg"' in record.value
    ]
    assert [leg for leg in legs if within.transaction_id.encode() in leg] == []
    assert len([leg for leg in legs if across.transaction_id.encode() in leg]) == 1


@pytest.mark.parametrize("receiver_problem", ["missing", "frozen", "closed", "other_currency"])
def test_transfer_to_unusable_account_is_refunded_with_a_reason(pipeline, receiver_problem):
    settings = pipeline[0]
    sender, receiver = f"snd-{receiver_problem}", f"rcv-{receiver_problem}"
    _open_funded(pipeline, sender)
    if receiver_problem == "frozen":
        _open_funded(pipeline, receiver, amount="")
        assert _ask(pipeline, edge(Freeze, transaction_id=_tx("frz"), account_id=receiver)).status == "success"
    elif receiver_problem == "closed":
        _open_funded(pipeline, receiver, amount="")
        assert _ask(pipeline, edge(Close, transaction_id=_tx("cls"), account_id=receiver)).status == "success"
    elif receiver_problem == "other_currency":
        _open_funded(pipeline, receiver, amount="", currency="EUR")
    outcome = _ask(pipeline, _transfer(sender, receiver, "40.00"))
    expected_reason = {
        "missing": Reason.ACCOUNT_NOT_FOUND,
        "frozen": Reason.ACCOUNT_FROZEN,
        "closed": Reason.ACCOUNT_CLOSED,
        "other_currency": Reason.CURRENCY_MISMATCH,
    }[receiver_problem]
    assert (outcome.status, outcome.reason) == ("failure", expected_reason)
    balances = _balances(settings)
    assert balances[sender] == 10000, "the debit must have been refunded"
    assert balances.get(receiver, 0) == 0


def test_insufficient_funds_moves_nothing(pipeline):
    settings = pipeline[0]
    _open_funded(pipeline, "poor", amount="5.00")
    _open_funded(pipeline, "rich-peer", amount="")
    outcome = _ask(pipeline, _transfer("poor", "rich-peer", "5.01"))
    assert (outcome.status, outcome.reason) == ("failure", Reason.INSUFFICIENT_FUNDS)
    balances = _balances(settings)
    assert (balances["poor"], balances["rich-peer"]) == (500, 0)


def test_paying_a_user_as_a_merchant_is_refunded(pipeline):
    _open_funded(pipeline, "shopper")
    _open_funded(pipeline, "not-a-shop", amount="")
    _open_funded(pipeline, "shop", amount="", kind="merchant")
    pay = dict(actor="local:shopper", role="user", from_account="shopper", amount="3.00", currency="USD")
    refused = _ask(pipeline, PayMerchant(transaction_id=_tx("pay"), to_account="not-a-shop", **pay))
    paid = _ask(pipeline, PayMerchant(transaction_id=_tx("pay"), to_account="shop", **pay))
    assert (refused.status, refused.reason, paid.status) == ("failure", Reason.NOT_A_MERCHANT, "success")
    balances = _balances(pipeline[0])
    assert (balances["shopper"], balances["shop"], balances["not-a-shop"]) == (9700, 300, 0)


def test_retried_transfer_gets_the_first_answer_and_moves_money_once(pipeline):
    settings = pipeline[0]
    _open_funded(pipeline, "retry-a")
    _open_funded(pipeline, "retry-b", amount="")
    first = _transfer("retry-a", "retry-b", "7.00", tx="retry-tx")
    assert _ask(pipeline, first).status == "success"
    again = first  # a client retry: the very same request, later
    repeated = _ask(pipeline, again, count=2)
    assert (repeated.status, repeated.digest) == ("success", command_digest(first))
    balances = _balances(settings)
    assert (balances["retry-a"], balances["retry-b"]) == (9300, 700)


def test_reusing_a_transaction_id_with_another_payload_is_a_conflict(pipeline):
    settings = pipeline[0]
    _open_funded(pipeline, "conf-a")
    _open_funded(pipeline, "conf-b", amount="")
    assert _ask(pipeline, _transfer("conf-a", "conf-b", "1.00", tx="conf-tx")).status == "success"
    conflict = _ask(pipeline, _transfer("conf-a", "conf-b", "2.00", tx="conf-tx"), count=2)
    assert (conflict.status, conflict.reason) == ("failure", Reason.DUPLICATE_CONFLICT)
    balances = _balances(settings)
    assert (balances["conf-a"], balances["conf-b"]) == (9900, 100)


def test_commands_and_events_of_an_account_share_one_partition_number(pipeline):
    """librdkafka's murmur2_random, our Python murmur2 and the processor's routing agree."""
    settings = pipeline[0]
    commands = read_topic(settings, settings.commands_topic)
    events = read_topic(settings, settings.events_topic)
    assert commands and events
    for record in commands:
        assert partition_for(record.key.decode(), PARTITIONS) == record.partition, record.key
    for record in events:
        account_id = decode_event(record.value).account_id
        assert record.key.decode() == account_id
        assert partition_for(account_id, PARTITIONS) == record.partition, account_id
