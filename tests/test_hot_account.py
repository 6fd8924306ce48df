"""A sharded merchant end to end on a real broker: opened, paid by many payers, paid out, audited."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from consumers.audit import run_audit
from consumers.readmodel.query_api import create_app
from consumers.readmodel.store import Batch, ReadModelStore
from producers.auth import SCOPES, Gate, RateLimits
from schemas.codec import decode_event
from schemas.commands import Deposit, OpenAccount, PayMerchant, Transfer, shard_account_id, shard_index
from schemas.events import AccountOpened
from schemas.outcomes import Reason
from schemas.partitioning import partition_for
from streams.core.machine import apply
from streams.core.money import canonical_balance_minor
from streams.core.state import State, fold
from tests.support.auth import auth_config, bearer
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic
from tests.support.processes import ProcessorProcess

pytest_plugins = ["tests.readmodel_fixtures"]

PARTITIONS = 8
MERCHANT, SHARDS = "hot-m", 6
PAYERS = [f"hot-p{index}" for index in range(20)]
PAYMENTS = 120
OVERSTATED_SHARDS = 12  # a client that says 12: the picks beyond shard 5 find no shard and are refunded
OVERSTATED_PAYMENTS = 16


@pytest.fixture(scope="module")
def pipeline(make_settings):
    settings = make_settings(PARTITIONS)
    processor = ProcessorProcess(settings, "hot-1").start()
    producer = command_producer(settings)
    outcomes = OutcomeCollector(settings)
    yield settings, producer, outcomes
    outcomes.close()
    assert processor.stop() == 0, processor.log_tail()


def _ask(pipeline, *commands) -> list:
    settings, producer, outcomes = pipeline
    publish(producer, settings, list(commands))
    outcomes.wait_all([command.transaction_id for command in commands], timeout_s=90.0)
    return [outcomes.by_transaction[command.transaction_id][0] for command in commands]


def _ledger(settings) -> tuple[dict[str, int], dict[str, int]]:
    """Balances by account from the events alone, and the partition each account's events are on."""
    states: dict[int, State] = {}
    partition_of: dict[str, int] = {}
    for record in read_topic(settings, settings.events_topic):
        assert record.value is not None  # the wallet writes no tombstones
        event = decode_event(record.value)
        fold(states.setdefault(record.partition, State()), event)
        if isinstance(event, AccountOpened):
            partition_of[event.account_id] = record.partition
    balances = {
        account_id: account.balance_minor for state in states.values() for account_id, account in state.accounts.items()
    }
    return balances, partition_of


def test_a_sharded_merchant_paid_by_many_payers_holds_every_payment_across_its_shards(pipeline) -> None:
    settings = pipeline[0]
    opening = edge(
        OpenAccount, transaction_id="hot-open", account_id=MERCHANT, currency="USD", kind="merchant", shards=SHARDS
    )
    setup = [opening]
    for payer in PAYERS:
        setup.append(edge(OpenAccount, transaction_id=f"open-{payer}", account_id=payer, currency="USD"))
    assert {outcome.status for outcome in _ask(pipeline, *setup)} == {"success"}
    funds = [
        edge(Deposit, transaction_id=f"fund-{payer}", account_id=payer, amount="100.00", currency="USD")
        for payer in PAYERS
    ]
    # A client may not open a shard's derived id by hand.
    by_hand = edge(OpenAccount, transaction_id="hot-by-hand", account_id=f"{MERCHANT}::s9", currency="USD")
    answers = _ask(pipeline, *funds, by_hand)
    assert {outcome.status for outcome in answers[:-1]} == {"success"}
    assert (answers[-1].status, answers[-1].reason) == ("failure", Reason.RESERVED_ACCOUNT_ID)

    draw = random.Random(15)
    payers = [draw.choice(PAYERS) for _ in range(PAYMENTS + OVERSTATED_PAYMENTS)]
    payments = [
        PayMerchant(
            transaction_id=f"hot-pay-{number}",
            actor=f"local:{payer}",  # the local edge's credentials: an account acts for itself
            role="user",
            from_account=payer,
            to_account=MERCHANT,
            amount="1.00",
            currency="USD",
            to_shards=SHARDS if number < PAYMENTS else OVERSTATED_SHARDS,
        )
        for number, payer in enumerate(payers)
    ]
    answers = _ask(pipeline, *payments)
    expected = [
        ("success", None)
        if shard_index(payment.transaction_id, payment.to_shards) < SHARDS
        else ("failure", Reason.ACCOUNT_NOT_FOUND)
        for payment in payments
    ]
    assert [(outcome.status, outcome.reason) for outcome in answers] == expected
    paid_minor = 100 * sum(1 for status, _ in expected if status == "success")
    assert paid_minor > 100 * PAYMENTS and ("failure", Reason.ACCOUNT_NOT_FOUND) in expected

    balances, partition_of = _ledger(settings)
    shards = [shard_account_id(MERCHANT, index) for index in range(SHARDS)]
    assert sum(balances[shard] for shard in shards) == paid_minor
    assert sum(balances[payer] for payer in PAYERS) == 100 * 100 * len(PAYERS) - paid_minor
    assert all(balances[shard] > 0 for shard in shards)  # every shard took its share
    for shard in shards:
        assert partition_of[shard] == partition_for(shard, PARTITIONS)  # each on its own id's partition
    assert len({partition_of[shard] for shard in shards}) > 1

    # Paying out: only the owner moves money out of a shard.
    stranger = edge(
        Transfer,
        transaction_id="hot-out-1",
        from_account=shards[1],
        to_account=PAYERS[0],
        amount="1.00",
        currency="USD",
    )
    owner = edge(
        Transfer,
        transaction_id="hot-out-2",
        from_account=shards[1],
        to_account=PAYERS[0],
        amount="1.00",
        currency="USD",
        actor=f"local:{MERCHANT}",  # its owner, as the local edge opened it
    )
    refused, paid_out = _ask(pipeline, stranger, owner)
    assert (refused.status, refused.reason) == ("failure", Reason.NOT_AUTHORIZED)
    assert paid_out.status == "success"

    report = run_audit(settings, settled=True)
    assert report.passed, report.render_text()
    [merchant] = [entry for entry in report.sharded_merchants if entry.merchant == MERCHANT]
    assert (merchant.shards, merchant.balance_minor) == (SHARDS, paid_minor - 100)
    assert f"sharded merchant {MERCHANT}:" in report.render_text()
    assert report.in_flight == []


def test_the_account_route_sums_a_sharded_merchants_shards_and_lists_them(db_url: str) -> None:
    # The events of one partition holding every account, decided by the core, into the read model.
    state, events = State(), []
    merchant = dict(kind="merchant", shards=3, actor="shop")
    commands = [
        # Opened as through the API, by the principals whose tokens read them below.
        edge(OpenAccount, transaction_id="m-open", account_id="shop", currency="USD", **merchant),
        edge(OpenAccount, transaction_id="p-open", account_id="payer", currency="USD", actor="payer"),
        edge(Deposit, transaction_id="p-fund", account_id="payer", amount="50.00", currency="USD"),
        *(
            edge(
                PayMerchant,
                transaction_id=f"pay-{n}",
                from_account="payer",
                to_account="shop",
                amount="2.50",
                currency="USD",
                to_shards=3,
                actor="payer",
            )
            for n in range(12)
        ),
    ]
    pending: list = list(commands)
    while pending:
        decision = apply(state, pending.pop(0), 1_700_000_000_000)
        events += decision.events
        pending += decision.follow_ups
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(
            Batch(
                events=events,
                outcomes=[],
                offsets_before={("t.events", 0): None},
                offsets_after={("t.events", 0): len(events)},
            )
        )
    gate = Gate(auth_config(), RateLimits(rate_per_s=10_000, burst=10_000))
    with TestClient(create_app(db_url, caller=gate.requires(*SCOPES))) as client:
        view = client.get("/v1/accounts/shop", headers=bearer("shop", "wallet:user")).json()
        shards = {shard["account_id"]: shard["balance"] for shard in view["shards"]}
        assert list(shards) == ["shop::s1", "shop::s2"]
        own_minor = state.accounts["shop"].balance_minor
        assert canonical_balance_minor(view["balance"], "USD") == 12 * 250  # shard 0 and the shards together
        assert own_minor + sum(canonical_balance_minor(b, "USD") for b in shards.values()) == 12 * 250
        assert view["available"] == view["balance"] and view["sequence"] == state.accounts["shop"].seq
        # Another caller sees neither the merchant nor its shards; a plain account lists none.
        assert client.get("/v1/accounts/shop", headers=bearer("payer", "wallet:user")).status_code == 404
        assert client.get("/v1/accounts/payer", headers=bearer("payer", "wallet:user")).json()["shards"] == []
