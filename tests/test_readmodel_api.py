"""The query API over a read model the consumer filled from the real broker, on SQLite and PostgreSQL,
read with real tokens: the audit principal reads everything, a user only what it owns."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from benchmarks.support.reference_pipeline import ReferenceLog, publish
from consumers.readmodel.query_api import HISTORY_LIMIT_MAX, create_app
from consumers.readmodel.store import ReadModelStore
from producers.auth import SCOPES, Gate, RateLimits
from schemas.events import AccountOpened, Deposited
from schemas.outcomes import Outcome
from streams.core.money import canonical_balance_minor, format_amount

pytest.register_assert_rewrite("tests.readmodel_fixtures")
from tests.readmodel_fixtures import (  # noqa: E402  (after the assert-rewrite registration)
    PublishedLog,
    consume_until_caught_up,
    expected_rows,
    expected_transactions,
)
from tests.support.auth import auth_config, bearer  # noqa: E402

pytest_plugins = ["tests.readmodel_fixtures"]

WRITER_TIMEOUT_S = 30


@pytest.fixture
def client(published_log: PublishedLog, db_url: str) -> Iterator[TestClient]:
    with ReadModelStore(db_url) as store:
        consume_until_caught_up(store, published_log.settings)
    gate = Gate(auth_config(), RateLimits(rate_per_s=10_000, burst=10_000))
    with TestClient(
        create_app(db_url, published_log.settings, caller=gate.requires(*SCOPES)),
        headers=bearer("auditor", "wallet:audit"),
    ) as test_client:
        yield test_client


def _busiest_account(log: PublishedLog) -> tuple:
    rows = expected_rows(log)
    counts: dict[str, int] = {}
    for entry in rows["entries"]:
        counts[entry[0]] = counts.get(entry[0], 0) + 1
    busiest = max(counts, key=counts.__getitem__)
    return next(account for account in rows["accounts"] if account[0] == busiest)


def test_account_route_gives_the_folded_balance_and_404_for_an_unknown_account(
    client: TestClient, published_log: PublishedLog
) -> None:
    account_id, currency, kind, status, balance_minor, sequence, _owner, held_minor = _busiest_account(published_log)
    response = client.get(f"/v1/accounts/{account_id}")
    assert response.status_code == 200
    assert response.json() == {
        "account_id": account_id,
        "currency": currency,
        "kind": kind,
        "status": status,
        "balance": format_amount(balance_minor, currency),
        "held": format_amount(held_minor, currency),
        "available": format_amount(balance_minor - held_minor, currency),
        "sequence": sequence,
        "shards": [],
    }

    missing = client.get("/v1/accounts/nobody-here")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "account_not_found",
        "message": "account 'nobody-here' not found",
        "errors": [
            {"field": "account_id", "reason": "account_not_found", "message": "account 'nobody-here' not found"}
        ],
    }
    waited = client.get("/v1/accounts/nobody-here", params={"min_sequence": 1, "wait_ms": 200})
    assert (waited.status_code, waited.json()["error"]) == (404, "account_not_found")


def test_history_pages_newest_first_through_the_cursor_and_covers_every_entry(
    client: TestClient, published_log: PublishedLog
) -> None:
    account_id, currency, *_ = _busiest_account(published_log)
    expected = [entry for entry in expected_rows(published_log)["entries"] if entry[0] == account_id][::-1]
    pages, cursor = [], None
    while True:
        params = {"limit": 7} | ({"cursor": cursor} if cursor is not None else {})
        body = client.get(f"/v1/accounts/{account_id}/transactions", params=params).json()
        pages.append(body["entries"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(page) for page in pages[:-1]] == [7] * (len(pages) - 1) and 1 <= len(pages[-1]) <= 7
    entries = [entry for page in pages for entry in page]
    assert [
        (e["transaction_id"], e["type"], e["amount"], e["balance_after"], e["sequence"], e["counterparty"])
        for e in entries
    ] == [
        (tx, kind, format_amount(amount, currency), format_amount(after, currency), seq, counterparty)
        for _, seq, tx, kind, amount, after, counterparty, _ in expected
    ]
    assert entries[-1]["type"] == "account_opened" and entries[-1]["sequence"] == 1
    assert any(entry["amount"].startswith("-") for entry in entries), "debits are signed"
    ts_ms = expected[0][7]
    expected_time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms // 1000)) + f".{ts_ms % 1000:03d}Z"
    assert entries[0]["time"] == expected_time


def test_transaction_status_is_success_failure_pending_or_unknown(
    client: TestClient, published_log: PublishedLog
) -> None:
    by_request = expected_transactions(published_log)
    accounts_of: dict[str, int] = {}
    for _, transaction_id in by_request:
        accounts_of[transaction_id] = accounts_of.get(transaction_id, 0) + 1
    # Ids one account uses: the route that names no account answers those only.
    statuses = {tx: value for (_, tx), value in by_request.items() if accounts_of[tx] == 1}
    success = next(tx for tx, (status, _) in statuses.items() if status == "success")
    failure, (_, reason) = next((tx, value) for tx, value in statuses.items() if value[0] == "failure")
    pending = sorted(published_log.in_flight)[0]
    assert client.get(f"/v1/transactions/{success}").json() == {
        "transaction_id": success,
        "status": "success",
        "reason": None,
    }
    assert client.get(f"/v1/transactions/{failure}").json() == {
        "transaction_id": failure,
        "status": "failure",
        "reason": reason,
    }
    assert client.get(f"/v1/transactions/{pending}").json() == {
        "transaction_id": pending,
        "status": "pending",
        "reason": None,
    }
    assert client.get("/v1/transactions/never-sent").json() == {
        "transaction_id": "never-sent",
        "status": "unknown",
        "reason": None,
    }


def test_a_read_waits_for_the_callers_own_write_and_answers_409_when_it_does_not_come(
    client: TestClient, published_log: PublishedLog, db_url: str
) -> None:
    settings = published_log.settings
    # An account no other test looks at; its state from the API, since every run of this test adds a deposit.
    account_id = next(
        account[0]
        for account in reversed(expected_rows(published_log)["accounts"])
        if account[3] == "active" and account[0] != _busiest_account(published_log)[0]
    )
    before = client.get(f"/v1/accounts/{account_id}").json()
    currency, sequence = before["currency"], before["sequence"]
    balance_minor = canonical_balance_minor(before["balance"], currency)
    transaction_id = f"own-write-{uuid.uuid4().hex[:8]}"
    deposit = Deposited(
        account_id=account_id,
        transaction_id=transaction_id,
        ts_ms=1,
        command="deposit",
        actor="bank",
        digest=transaction_id,
        seq=sequence + 1,
        amount=format_amount(500, currency),
        currency=currency,
        balance=format_amount(balance_minor + 500, currency),
    )
    outcome = Outcome(
        transaction_id=transaction_id, account_id=account_id, actor="bank", status="success", digest=transaction_id
    )

    def write_later() -> None:
        time.sleep(0.3)  # the request below is already waiting
        log = ReferenceLog.empty(settings.partitions)
        log.add(deposit)
        log.add(outcome)
        publish(settings, log)
        with ReadModelStore(db_url) as store:
            consume_until_caught_up(store, settings)

    writer = threading.Thread(target=write_later)
    writer.start()
    try:
        response = client.get(f"/v1/accounts/{account_id}", params={"min_sequence": sequence + 1, "wait_ms": 10_000})
    finally:
        writer.join(WRITER_TIMEOUT_S)
    assert response.status_code == 200
    assert response.json()["sequence"] == sequence + 1
    assert response.json()["balance"] == format_amount(balance_minor + 500, currency)
    history = client.get(f"/v1/accounts/{account_id}/transactions", params={"min_sequence": sequence + 1, "limit": 1})
    assert history.json()["entries"][0]["transaction_id"] == deposit.transaction_id

    started_s = time.monotonic()
    late = client.get(f"/v1/accounts/{account_id}", params={"min_sequence": sequence + 9, "wait_ms": 300})
    assert time.monotonic() - started_s >= 0.3
    assert late.status_code == 409
    assert late.json()["error"] == "not_caught_up" and late.json()["errors"][0]["field"] == "min_sequence"
    assert f"is at sequence {sequence + 1}" in late.json()["message"]


def test_lag_route_reports_every_partition_and_zero_once_caught_up(client: TestClient, published_log) -> None:
    body = client.get("/v1/readmodel/lag").json()
    settings = published_log.settings
    assert body["total_lag"] == 0
    assert sorted((item["topic"], item["partition"]) for item in body["partitions"]) == sorted(
        (topic, partition)
        for topic in (settings.events_topic, settings.outcomes_topic)
        for partition in range(settings.partitions)
    )
    assert all(item["next_offset"] == item["end_offset"] > 0 for item in body["partitions"])


@pytest.mark.parametrize(
    "params, field",
    [
        ({"limit": HISTORY_LIMIT_MAX + 1}, "limit"),
        ({"limit": 0}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"min_sequence": 1, "wait_ms": 60_000}, "wait_ms"),
    ],
)
def test_out_of_bounds_query_parameters_are_422_naming_the_field(
    client: TestClient, published_log, params, field
) -> None:
    account_id = _busiest_account(published_log)[0]
    response = client.get(f"/v1/accounts/{account_id}/transactions", params=params)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request" and response.json()["errors"][0]["field"] == field


def test_a_user_reads_only_its_own_accounts_history_and_requests(
    client: TestClient, published_log: PublishedLog, db_url: str
) -> None:
    settings = published_log.settings
    owner, account_id, transaction_id = (f"{label}-{uuid.uuid4().hex[:8]}" for label in ("alice", "acct", "tx"))
    opened = AccountOpened(
        account_id=account_id,
        transaction_id=transaction_id,
        ts_ms=1,
        command="open_account",
        actor=owner,
        digest=transaction_id,
        seq=1,
        currency="USD",
        kind="user",
        balance="0.00",
        owner=owner,
    )
    log = ReferenceLog.empty(settings.partitions)
    log.add(opened)
    log.add(
        Outcome(
            transaction_id=transaction_id, status="success", digest=transaction_id, account_id=account_id, actor=owner
        )
    )
    publish(settings, log)
    with ReadModelStore(db_url) as store:
        consume_until_caught_up(store, settings)
    mine, stranger = bearer(owner, "wallet:user"), bearer("mallory", "wallet:user")
    paths = (f"/v1/accounts/{account_id}", f"/v1/accounts/{account_id}/transactions")
    assert [client.get(path, headers=mine).status_code for path in paths] == [200, 200]
    assert [client.get(path).status_code for path in paths] == [200, 200]  # the auditor reads everything
    for path in paths:
        refused = client.get(path, headers=stranger)
        assert (refused.status_code, refused.json()["error"]) == (404, "account_not_found")
    status = f"/v1/transactions/{transaction_id}"
    assert client.get(status, headers=mine).json()["status"] == "success"
    assert client.get(status, headers=mine, params={"account_id": account_id}).json()["status"] == "success"
    assert client.get(status, headers=mine, params={"account_id": "other"}).json()["status"] == "unknown"
    assert client.get(status, headers=stranger).json()["status"] == "unknown"
    assert client.get(status).json()["status"] == "success"
    assert client.get(status, headers={}).status_code == 200  # the client's default header: the auditor
    assert client.get(status, headers={"Authorization": "Bearer not-a-token"}).status_code == 401
