"""The command side end to end: the HTTP API, the CLI and the load generator against the real
broker and a real `wallet processor` subprocess.

Each test opens its own accounts (unique ids), so tests share one processor and one set of
topics. Balances are read from the ledger itself (a fold of wallet.events), never from the
answers under test.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from benchmarks.api_latency import measure_api_latency
from infra.admin import ensure_topics
from infra.ports import free_loopback_ports
from infra.settings import Settings
from producers.api import ApiOptions
from producers.load import LoadSpec, ledger_balances, run_load
from streams.core.money import canonical_balance_minor
from tests.support.auth import TEST_SECRET, auth_config, bearer, token
from tests.support.processes import ProcessorProcess
from tests.support.serving import serving_in_thread
from wallet import localkafka
from wallet.api_app import create_app

REQUEST_WAIT_MS = 20_000  # generous: the processor may still be joining its group at the first request
HTTP_TIMEOUT_S = 60
PENDING_WAIT_MS = 1000
PRIVATE_BROKER_START_TIMEOUT_S = 90
OUTAGE_PUBLISH_TIMEOUT_MS = 3000
# The publish bound, librdkafka's once-a-second timeout scan, and slack for a loaded machine.
OUTAGE_ANSWER_BOUND_S = OUTAGE_PUBLISH_TIMEOUT_MS / 1000 + 5


@pytest.fixture(scope="module")
def processor(wallet_settings: Settings):
    process = ProcessorProcess(wallet_settings, "e2e-1").start().wait_until_assigned()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def api(wallet_settings: Settings, processor: ProcessorProcess):
    # One principal with every scope: this module tests the commands, test_api_auth.py the scopes.
    app = create_app(wallet_settings, ApiOptions(request_wait_ms=REQUEST_WAIT_MS), auth=auth_config())
    with (
        serving_in_thread(app) as url,
        httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S, headers=bearer("e2e")) as client,
    ):
        yield client


def _id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def _command(api: httpx.Client, path: str, body: dict, expected_http: int = 200, **params) -> dict:
    body = {"transaction_id": _id("tx"), **body}
    response = api.post(path, json=body, params=params)
    assert response.status_code == expected_http, response.text
    reply = response.json()
    if expected_http in (200, 202):
        assert reply["transaction_id"] == body["transaction_id"]
    return reply


def _open(api: httpx.Client, currency: str = "USD", kind: str = "user", funds: str | None = None) -> str:
    account = _id(kind)
    opened = _command(api, "/v1/accounts", {"account_id": account, "currency": currency, "kind": kind})
    assert opened["status"] == "success"
    if funds is not None:
        reply = _command(api, f"/v1/accounts/{account}/deposit", {"amount": funds, "currency": currency})
        assert reply["status"] == "success"
    return account


def _transfer(
    api: httpx.Client, from_account: str, to_account: str, amount: str, currency: str = "USD", **extra
) -> dict:
    return _command(
        api,
        "/v1/wallet/balance_transfer",
        {"from_account": from_account, "to_account": to_account, "amount": amount, "currency": currency, **extra},
    )


def test_a_transfer_between_funded_accounts_succeeds_and_moves_the_money(
    api: httpx.Client, wallet_settings: Settings
) -> None:
    sender, receiver = _open(api, funds="100.00"), _open(api)
    for amount in ("30.25", "0.75"):
        reply = _transfer(api, sender, receiver, amount)
        assert (reply["status"], reply["reason"]) == ("success", None)
    assert ledger_balances(wallet_settings, [sender, receiver]) == {sender: "69.00", receiver: "31.00"}


@pytest.mark.parametrize(
    ("receiver_setup", "reason"),
    [
        ("missing", "account_not_found"),
        ("frozen", "account_frozen"),
        ("closed", "account_closed"),
        ("other_currency", "currency_mismatch"),
    ],
)
def test_a_transfer_the_receiver_refuses_fails_with_the_reason_and_is_refunded(
    api: httpx.Client, wallet_settings: Settings, receiver_setup: str, reason: str
) -> None:
    sender = _open(api, funds="50.00")
    if receiver_setup == "missing":
        receiver = _id("nobody")
    elif receiver_setup == "other_currency":
        receiver = _open(api, currency="EUR")
    else:
        receiver = _open(api)
        action = "freeze" if receiver_setup == "frozen" else "close"
        assert _command(api, f"/v1/accounts/{receiver}/{action}", {})["status"] == "success"
    reply = _transfer(api, sender, receiver, "20.00")
    assert (reply["status"], reply["reason"]) == ("failure", reason)
    assert ledger_balances(wallet_settings, [sender])[sender] == "50.00"  # debited, then refunded


@pytest.mark.parametrize(
    ("sender_setup", "amount", "reason"),
    [
        ("poor", "50.01", "insufficient_funds"),
        ("frozen", "1.00", "account_frozen"),
        ("missing", "1.00", "account_not_found"),
        ("same_account", "1.00", "same_account"),
    ],
)
def test_a_transfer_the_sender_side_refuses_fails_with_the_reason(
    api: httpx.Client, sender_setup: str, amount: str, reason: str
) -> None:
    sender = _id("nobody") if sender_setup == "missing" else _open(api, funds="50.00")
    receiver = sender if sender_setup == "same_account" else _open(api)
    if sender_setup == "frozen":
        assert _command(api, f"/v1/accounts/{sender}/freeze", {})["status"] == "success"
    reply = _transfer(api, sender, receiver, amount)
    assert (reply["status"], reply["reason"]) == ("failure", reason)


def test_a_merchant_payment_needs_a_merchant_receiver(api: httpx.Client, wallet_settings: Settings) -> None:
    payer, shop, friend = _open(api, funds="10.00"), _open(api, kind="merchant"), _open(api)
    assert _transfer(api, payer, friend, "1.00", merchant_payment=True)["reason"] == "not_a_merchant"
    assert _transfer(api, payer, shop, "4.00", merchant_payment=True)["status"] == "success"
    assert _transfer(api, payer, shop, "1.00")["status"] == "success"  # a plain transfer may pay a merchant too
    assert ledger_balances(wallet_settings, [payer, shop, friend]) == {payer: "5.00", shop: "5.00", friend: "0.00"}


def test_a_retried_request_gets_the_first_answer_and_moves_the_money_once(
    api: httpx.Client, wallet_settings: Settings
) -> None:
    sender, receiver = _open(api, funds="10.00"), _open(api)
    request = {
        "from_account": sender,
        "to_account": receiver,
        "amount": "4.00",
        "currency": "USD",
        "transaction_id": _id("retry"),
    }
    answers = [api.post("/v1/wallet/balance_transfer", json=request).json() for _ in range(3)]
    assert answers == [{"status": "success", "transaction_id": request["transaction_id"], "reason": None}] * 3
    # "4" is the same sum as "4.00": the same request, not a conflicting one.
    assert api.post("/v1/wallet/balance_transfer", json={**request, "amount": "4"}).json()["status"] == "success"
    assert ledger_balances(wallet_settings, [sender, receiver]) == {sender: "6.00", receiver: "4.00"}


def test_a_retried_failure_stays_a_failure_after_its_cause_is_gone(api: httpx.Client) -> None:
    sender, receiver = _open(api), _open(api)
    request = {
        "from_account": sender,
        "to_account": receiver,
        "amount": "5.00",
        "currency": "USD",
        "transaction_id": _id("retry"),
    }
    assert api.post("/v1/wallet/balance_transfer", json=request).json()["reason"] == "insufficient_funds"
    funded = _command(api, f"/v1/accounts/{sender}/deposit", {"amount": "100.00", "currency": "USD"})
    assert funded["status"] == "success"
    again = api.post("/v1/wallet/balance_transfer", json=request).json()
    assert (again["status"], again["reason"]) == ("failure", "insufficient_funds")


def test_reusing_a_transaction_id_for_another_request_is_a_conflict_that_changes_nothing(
    api: httpx.Client, wallet_settings: Settings
) -> None:
    sender, receiver = _open(api, funds="10.00"), _open(api)
    first = {
        "from_account": sender,
        "to_account": receiver,
        "amount": "3.00",
        "currency": "USD",
        "transaction_id": _id("reused"),
    }
    assert api.post("/v1/wallet/balance_transfer", json=first).json()["status"] == "success"
    conflicting = api.post("/v1/wallet/balance_transfer", json={**first, "amount": "7.00"}).json()
    assert (conflicting["status"], conflicting["reason"]) == ("failure", "duplicate_conflict")
    assert ledger_balances(wallet_settings, [sender, receiver]) == {sender: "7.00", receiver: "3.00"}
    status = api.get(f"/v1/transactions/{first['transaction_id']}").json()
    assert (status["status"], status["reason"]) == ("success", None)  # the transaction's answer, not the conflict's


def test_an_account_goes_through_its_whole_life(api: httpx.Client, wallet_settings: Settings) -> None:
    account = _open(api, funds="20.00")
    path = f"/v1/accounts/{account}"
    assert _command(api, f"{path}/withdraw", {"amount": "25.00", "currency": "USD"})["reason"] == "insufficient_funds"
    assert _command(api, f"{path}/withdraw", {"amount": "5.00", "currency": "EUR"})["reason"] == "currency_mismatch"
    assert _command(api, f"{path}/close", {})["reason"] == "balance_not_zero"
    assert _command(api, f"{path}/unfreeze", {})["reason"] == "account_not_frozen"
    assert _command(api, f"{path}/freeze", {})["status"] == "success"
    assert _command(api, f"{path}/withdraw", {"amount": "1.00", "currency": "USD"})["reason"] == "account_frozen"
    assert _command(api, f"{path}/unfreeze", {})["status"] == "success"
    assert _command(api, f"{path}/withdraw", {"amount": "20.00", "currency": "USD"})["status"] == "success"
    assert _command(api, f"{path}/close", {})["status"] == "success"
    assert _command(api, f"{path}/deposit", {"amount": "1.00", "currency": "USD"})["reason"] == "account_closed"
    assert _command(api, "/v1/accounts", {"account_id": account, "currency": "USD"})["reason"] == "account_exists"
    assert ledger_balances(wallet_settings, [account]) == {account: "0.00"}


def test_an_invalid_request_is_refused_before_anything_is_published(api: httpx.Client) -> None:
    sender, receiver = _open(api, funds="10.00"), _open(api)
    transaction_id = _id("invalid")
    refused = api.post(
        "/v1/wallet/balance_transfer",
        json={
            "from_account": sender,
            "to_account": receiver,
            "amount": "1.001",
            "currency": "USD",
            "transaction_id": transaction_id,
        },
    )
    assert refused.status_code == 422
    assert api.get(f"/v1/transactions/{transaction_id}").json()["status"] == "unknown"  # never published


def test_a_request_is_pending_while_no_processor_runs_and_gets_its_answer_after_a_restart(
    api: httpx.Client, processor: ProcessorProcess, wallet_settings: Settings
) -> None:
    sender, receiver = _open(api, funds="10.00"), _open(api)
    request = {
        "from_account": sender,
        "to_account": receiver,
        "amount": "2.50",
        "currency": "USD",
        "transaction_id": _id("pending"),
    }
    processor.stop()
    try:
        pending = api.post("/v1/wallet/balance_transfer", json=request, params={"wait_ms": PENDING_WAIT_MS})
        assert (pending.status_code, pending.json()["status"]) == (202, "pending")
        assert api.get(f"/v1/transactions/{request['transaction_id']}").json()["status"] == "pending"
    finally:
        processor.start().wait_until_assigned()
    retried = api.post("/v1/wallet/balance_transfer", json=request)
    assert (retried.status_code, retried.json()["status"]) == (200, "success"), processor.log_tail()
    assert api.get(f"/v1/transactions/{request['transaction_id']}").json()["status"] == "success"
    assert ledger_balances(wallet_settings, [sender, receiver]) == {sender: "7.50", receiver: "2.50"}


# -- the CLI: the same commands from a terminal, through the HTTP API with WALLET_TOKEN ----------


def _wallet(api: httpx.Client, *arguments: str, scope: str = "wallet:user wallet:bank") -> subprocess.CompletedProcess:
    environment = {**os.environ, "WALLET_TOKEN": token("e2e-cli", scope), "WALLET_API_URL": str(api.base_url)}
    return subprocess.run(
        [sys.executable, "-m", "wallet.cli", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT_S,
    )


def test_the_cli_answers_with_readable_output_and_an_exit_status_per_outcome(
    api: httpx.Client, wallet_settings: Settings
) -> None:
    sender, receiver = _id("cli"), _id("cli")
    for arguments in (
        ("account", "open", sender, "USD"),
        ("account", "open", receiver, "USD"),
        ("account", "deposit", sender, "10", "USD"),
    ):
        done = _wallet(api, *arguments, "--wait-s", "30")
        assert (done.returncode, done.stdout.split(":")[0]) == (0, "success"), done.stdout + done.stderr
    transaction_id = _id("cli-tx")
    moved = _wallet(api, "transfer", sender, receiver, "2.50", "USD", "--tx", transaction_id)
    assert moved.returncode == 0 and moved.stdout.startswith(f"success: transfer {transaction_id}")
    retried = _wallet(api, "transfer", sender, receiver, "2.5", "USD", "--tx", transaction_id)
    assert retried.returncode == 0 and retried.stdout.startswith("success")
    conflict = _wallet(api, "transfer", sender, receiver, "3.00", "USD", "--tx", transaction_id)
    assert conflict.returncode == 1 and "duplicate_conflict" in conflict.stdout
    poor = _wallet(api, "transfer", sender, receiver, "100.00", "USD")
    assert poor.returncode == 1 and "insufficient_funds" in poor.stdout
    invalid = _wallet(api, "transfer", sender, receiver, "1.001", "USD")
    assert invalid.returncode == 1 and "invalid amount" in invalid.stderr

    status = _wallet(api, "status", transaction_id)
    assert status.returncode == 0 and status.stdout.startswith(f"success: {transaction_id}")
    unknown = _wallet(api, "status", _id("never"))
    assert unknown.returncode == 2 and unknown.stdout.startswith("unknown")
    not_mine = subprocess.run(
        [sys.executable, "-m", "wallet.cli", "status", transaction_id],
        env={**os.environ, "WALLET_TOKEN": token("someone-else", "wallet:user"), "WALLET_API_URL": str(api.base_url)},
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT_S,
    )
    assert not_mine.returncode == 2 and not_mine.stdout.startswith("unknown")
    no_token = subprocess.run(
        [sys.executable, "-m", "wallet.cli", "status", transaction_id],
        env={**{k: v for k, v in os.environ.items() if k != "WALLET_TOKEN"}, "WALLET_API_URL": str(api.base_url)},
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT_S,
    )
    assert no_token.returncode == 1 and "401" in no_token.stderr and "WALLET_TOKEN" in no_token.stderr
    assert ledger_balances(wallet_settings, [sender, receiver]) == {sender: "7.50", receiver: "2.50"}


# -- the load generator ----------------------------------------------------------------------


def test_the_load_generator_gets_an_outcome_for_every_transfer_and_conserves_money(
    processor: ProcessorProcess, wallet_settings: Settings
) -> None:
    spec = LoadSpec(
        accounts=20,
        count=2000,
        zipf_s=1.0,
        funding_amount="50.00",
        missing_receiver_share=0.05,
        frozen_accounts=1,
        outcome_wait_s=120,
    )
    report = run_load(wallet_settings, spec, progress=False, out=io.StringIO())
    assert (report.published, report.received) == (2000, 2000)
    reasons = {reason for (status, reason) in report.outcomes if status == "failure"}
    assert {"account_not_found", "account_frozen"} <= reasons
    balances = ledger_balances(wallet_settings, spec.account_ids())
    # every cent deposited is still in the accounts: nothing in flight once every outcome is in
    assert None not in balances.values(), balances
    assert (
        sum(canonical_balance_minor(balance, "USD") for balance in balances.values() if balance is not None)
        == 20 * 5000
    )


# -- a broker outage -----------------------------------------------------------------------


@pytest.mark.kafka
def test_requests_during_a_broker_outage_get_503_within_a_bound(tmp_path: Path) -> None:
    # A private broker: the shared one must never be stopped.
    kafka_port, controller_port = free_loopback_ports(2)
    settings = Settings().with_overrides(
        kafka_bootstrap="",
        run_dir=tmp_path,
        local_kafka_port=kafka_port,
        local_controller_port=controller_port,
        partitions=2,
    )
    localkafka.fetch_jars(settings)
    localkafka.start(settings, timeout_s=PRIVATE_BROKER_START_TIMEOUT_S, stop_with_parent=True)
    try:
        ensure_topics(settings)
        app = create_app(
            settings,
            ApiOptions(request_wait_ms=PENDING_WAIT_MS, publish_timeout_ms=OUTAGE_PUBLISH_TIMEOUT_MS),
            auth=auth_config(),
        )
        with (
            serving_in_thread(app) as url,
            httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S, headers=bearer("outage")) as client,
        ):
            # A fresh broker may still be electing the topics' leaders: the outage starts once the API is connected.
            deadline_s = time.monotonic() + PRIVATE_BROKER_START_TIMEOUT_S
            while not client.get("/healthz").json()["outcomes_consumer_ready"]:
                assert time.monotonic() < deadline_s, "the API never connected to the private broker"
                time.sleep(0.2)
            request = {"account_id": "outage", "currency": "USD", "transaction_id": "outage-open"}
            # No processor runs: accepted, then pending. On a loaded machine the API's producer may
            # reach the new broker's partition leaders after its consumer did: the first answers
            # can be 503, and a client retries with the same transaction id, as told.
            while (before := client.post("/v1/accounts", json=request)).status_code == 503:
                assert time.monotonic() < deadline_s, f"the API never published to the private broker: {before.text}"
                time.sleep(0.5)
            assert (before.status_code, before.json().get("status")) == (202, "pending"), before.text
            localkafka.stop(settings)
            # Answered by the quick broker check once librdkafka has noticed the outage (about 1 s),
            # by the publish timeout before that: within the bound either way.
            for attempt in range(2):
                started_s = time.monotonic()
                during = client.post("/v1/accounts", json={**request, "transaction_id": f"outage-{attempt}"})
                assert time.monotonic() - started_s < OUTAGE_ANSWER_BOUND_S
                assert (during.status_code, during.json()["error"]) == (503, "kafka_unavailable"), during.text
                assert "retry with the same transaction_id" in during.json()["message"]
    finally:
        localkafka.stop(settings)


# -- the latency harness -----------------------------------------------------------------------


def test_the_latency_harness_measures_answered_transfers_at_the_offered_rate(api: httpx.Client) -> None:
    result = measure_api_latency(
        str(api.base_url), rate_per_s=20, duration_s=1.5, warmup_s=0, accounts=4, jwt_secret=TEST_SECRET
    )
    assert result.requests == 30
    assert result.statuses == {"200 success": 30}
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p95 <= result.latency_ms_p99 <= result.latency_ms_max
