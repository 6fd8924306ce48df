"""The metrics without a broker: what the processor's tally counts, what the HTTP middleware labels,
the readers `wallet top` computes with, and `/readyz` of an API that cannot reach Kafka."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from infra.metrics import (
    Scrape,
    bucket_increase,
    histogram_quantile,
    new_registry,
    parse_exposition,
    rate_per_s,
)
from infra.ports import free_loopback_ports
from infra.settings import Settings
from producers.api import ApiOptions, BodyGate
from producers.api_metrics import ApiMetrics, RequestMetrics
from schemas.outcomes import Reason
from streams.core.machine import apply
from streams.core.state import State
from streams.runtime.metrics import BatchTally, ProcessorMetrics, open_debits_by_currency
from tests.support.auth import auth_config
from tests.support.serving import serving_in_thread
from tests.test_machine_rules import TS_MS, deposit, open_account, transfer
from wallet.api_app import create_app


def _scrape(registry: CollectorRegistry) -> Scrape:
    return parse_exposition(generate_latest(registry).decode(), 0.0)


def _decide(state: State, command, tally: BatchTally):
    decision = apply(state, command, TS_MS)
    tally.decision(type(command), decision)
    return decision


def test_a_committed_batch_counts_its_decisions_by_command_and_outcome_once() -> None:
    state, tally = State(), BatchTally()
    for command in (open_account("alice"), open_account("bob"), deposit("alice", "10.00")):
        _decide(state, command, tally)
    debit = _decide(state, transfer("alice", "bob", "4.00"), tally)
    _decide(state, transfer("alice", "bob", "50.00"), tally)  # more than alice has
    (credit_leg,) = debit.follow_ups
    _decide(state, credit_leg, tally)
    tally.dead_letter()
    registry = CollectorRegistry()
    metrics = ProcessorMetrics(registry)
    assert _scrape(registry).total("wallet_processor_commands_decided_total") == 0  # counted at commit only

    metrics.committed(tally, commands=7, events=6, commit_s=0.004)

    found = _scrape(registry)
    decided = {
        (labels["command"], labels["status"], labels["reason"]): value
        for labels, value in found.matching("wallet_processor_commands_decided_total")
    }
    assert decided == {
        ("open_account", "success", ""): 2,
        ("deposit", "success", ""): 1,
        ("transfer", "continues", ""): 1,  # debited; the answer comes with the credit
        ("transfer", "failure", Reason.INSUFFICIENT_FUNDS): 1,
        ("credit_leg", "success", ""): 1,
    }
    assert found.total("wallet_processor_legs_produced_total") == 1
    assert found.total("wallet_processor_outcomes_produced_total") == 5  # 5 decisions answered; a dead letter never is
    assert found.total("wallet_processor_dead_letters_total") == 1
    assert found.total("wallet_processor_events_produced_total") == 6
    assert found.total("wallet_processor_batch_commands_sum") == 7
    assert found.buckets("wallet_processor_transaction_commit_duration_seconds")[0.005] == 1
    assert found.buckets("wallet_processor_transaction_commit_duration_seconds")[0.0025] == 0


def test_open_debits_are_the_pending_debits_of_the_owned_state_by_currency() -> None:
    state, tally = State(), BatchTally()
    for command in (open_account("a"), open_account("b"), deposit("a", "10.00"), open_account("j", "JPY")):
        _decide(state, command, tally)
    _decide(state, deposit("j", "500", "JPY"), tally)
    _decide(state, open_account("k", "JPY"), tally)
    first = _decide(state, transfer("a", "b", "1.25"), tally)
    _decide(state, transfer("a", "b", "2.00"), tally)
    _decide(state, transfer("j", "k", "300", "JPY"), tally)
    assert open_debits_by_currency([state]) == {"USD": (2, 325), "JPY": (1, 300)}
    # The credit on the receiver's side does not close the sender's debit: the sender never hears of it.
    (credit_leg,) = first.follow_ups
    _decide(state, credit_leg, tally)
    assert open_debits_by_currency([state, State()]) == {"USD": (2, 325), "JPY": (1, 300)}
    registry = CollectorRegistry()
    metrics = ProcessorMetrics(registry)
    metrics.set_state([state], {0: 3, 1: 0})
    found = _scrape(registry)
    assert found.by_label("wallet_processor_debits_open_minor", "currency") == {"USD": 325, "JPY": 300}
    assert found.by_label("wallet_processor_consumer_lag_records", "partition") == {"0": 3, "1": 0}
    assert found.total("wallet_processor_partitions_owned") == 1


def test_histogram_quantile_interpolates_within_the_bucket_like_promql() -> None:
    buckets = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)  # rank 70: halfway through (0.1, 0.2]
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.47)
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None
    # Ranks past the last finite bound are that bound: the histogram cannot say more.
    assert histogram_quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == 0.1


def test_rates_and_windows_count_a_restarted_process_from_zero() -> None:
    before = Scrape({("x_total", ()): 100.0, ("h_bucket", (("le", "1.0"),)): 8.0}, taken_s=10.0)
    later = Scrape({("x_total", ()): 150.0, ("h_bucket", (("le", "1.0"),)): 9.0}, taken_s=12.0)
    restarted = Scrape({("x_total", ()): 4.0, ("h_bucket", (("le", "1.0"),)): 2.0}, taken_s=12.0)
    assert rate_per_s(before, later, "x_total") == 25.0
    assert rate_per_s(before, restarted, "x_total") == 2.0
    assert bucket_increase(before, later, "h") == {1.0: 1.0}
    assert bucket_increase(before, restarted, "h") == {1.0: 2.0}


def _labelled_app(metrics: ApiMetrics) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/accounts/{account_id}")
    async def account(account_id: str) -> dict:
        return {"account_id": account_id}

    @app.post("/v1/accounts")
    async def open_one() -> dict:
        return {}

    included = APIRouter()  # as the wallet's own routes are: in routers the app includes

    @included.post("/v1/holds")
    async def place() -> dict:
        return {}

    app.include_router(included)
    app.add_middleware(BodyGate, body_bytes_max=16)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def test_requests_are_labelled_by_route_template_never_by_the_path_or_a_made_up_method() -> None:
    registry = CollectorRegistry()
    app = _labelled_app(ApiMetrics(registry))
    with serving_in_thread(app) as base_url:
        for account_id in ("alice", "bob", "carol"):
            assert httpx.get(f"{base_url}/v1/accounts/{account_id}").status_code == 200
        assert httpx.post(f"{base_url}/v1/accounts", content=b"{" + b" " * 64 + b"}").status_code == 413
        # Refused before routing, on an included router's route: its template was once a 500.
        assert httpx.post(f"{base_url}/v1/holds", content=b"{" + b" " * 64 + b"}").status_code == 413
        assert httpx.get(f"{base_url}/no/such/route").status_code == 404
        # A method the HTTP parser knows but no route serves reaches the app: 405, labelled "other".
        assert httpx.request("PURGE", f"{base_url}/v1/accounts/alice").status_code == 405
        # One no parser knows is refused by the server (httptools) before the app: nothing counted.
        assert httpx.request("BREW", f"{base_url}/v1/accounts/alice").status_code == 400
    durations = _scrape(registry).by_label("wallet_api_request_duration_seconds_count", "route")
    assert durations == {"/v1/accounts/{account_id}": 4, "/v1/accounts": 1, "/v1/holds": 1, "unmatched": 1}
    methods = _scrape(registry).by_label("wallet_api_request_duration_seconds_count", "method")
    assert methods == {"GET": 4, "POST": 2, "other": 1}
    statuses = _scrape(registry).by_label("wallet_api_request_duration_seconds_count", "status")
    assert statuses == {"200": 3, "413": 2, "404": 1, "405": 1}


def test_an_api_cut_off_from_kafka_is_live_but_not_ready_and_counts_its_refusals() -> None:
    (nobody,) = free_loopback_ports(1)
    registry = new_registry()
    metrics = ApiMetrics(registry)
    settings = Settings().with_overrides(kafka_bootstrap=f"127.0.0.1:{nobody}")
    app = create_app(settings, ApiOptions(request_wait_ms=0), auth=auth_config(), metrics=metrics)
    with serving_in_thread(app) as base_url:
        assert httpx.get(f"{base_url}/healthz", timeout=10).json()["outcomes_consumer_ready"] is False
        ready = httpx.get(f"{base_url}/readyz", timeout=10)
        refused = httpx.get(f"{base_url}/v1/transactions/t-1", timeout=10)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["error"] == "not_ready"
    assert {error["field"] for error in body["errors"]} == {"outcomes_consumer", "kafka"}
    assert refused.status_code == 401
    found = _scrape(registry)
    assert found.total("wallet_api_refusals_total", status="401") == 1
    assert found.total("wallet_api_outcome_consumer_ready") == 0
    assert found.total("wallet_api_request_duration_seconds_count", route="/readyz", status="503") == 1
    assert "process_cpu_seconds_total" in found.names()  # the process' own figures come with every registry
