"""The hold routes' edge without a broker: every invalid field is named, the scopes and the
read-model lookup decide who may capture or void which hold (and a request that passes them
meets the Kafka outage: 503), and the query side shows a hold to its two accounts' owners only.

The read model is a SQLite file whose rows the test writes itself, so that these tests are about
the API alone; the projection that writes such rows from the log is tested in
tests/test_readmodel_projection.py.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from consumers.readmodel.projection import AccountRow, HoldRow
from consumers.readmodel.store import ReadModelStore
from infra.ports import free_loopback_ports
from infra.settings import Settings
from producers.api import ApiOptions
from producers.api_holds import HOLD_LOOKUP_WAIT_MS_MAX, own_id
from producers.auth import RateLimits
from producers.client import CAPTURE_ID_SUFFIX, VOID_ID_SUFFIX
from schemas.commands import TRANSACTION_ID_LENGTH_MAX, is_valid_id
from tests.support.auth import auth_config, bearer
from tests.support.serving import serving_in_thread
from wallet.api_app import create_app

PLACE = {"to_account": "shop-1", "amount": "12.34", "currency": "USD", "transaction_id": "h-new", "expires_in_s": 60}
# Rows of the read model: alice's two accounts (hold h-two names a hold on each), the shop of bob.
ACCOUNTS = [
    AccountRow("alice-1", "USD", "user", "active", 10_000, 5, "alice", 4_000),
    AccountRow("alice-2", "USD", "user", "active", 5_000, 3, "alice", 1_000),
    AccountRow("shop-1", "USD", "merchant", "active", 0, 1, "bob", 0),
]
HOLDS = [
    HoldRow(
        "alice-1",
        "h-one",
        "shop-1",
        "USD",
        3_000,
        500,
        0,
        "open",
        1_700_000_060_000,
        1_700_000_000_000,
        1_700_000_001_000,
    ),
    HoldRow(
        "alice-1",
        "h-two",
        "shop-1",
        "USD",
        1_000,
        0,
        0,
        "open",
        1_700_000_060_000,
        1_700_000_000_000,
        1_700_000_000_000,
    ),
    HoldRow(
        "alice-2",
        "h-two",
        "shop-1",
        "USD",
        1_000,
        0,
        0,
        "open",
        1_700_000_060_000,
        1_700_000_000_000,
        1_700_000_000_000,
    ),
    HoldRow(
        "alice-1",
        "h-done",
        "shop-1",
        "USD",
        2_000,
        1_500,
        500,
        "captured",
        1_700_000_060_000,
        1_700_000_000_000,
        1_700_000_002_000,
    ),
]
REQUEST_WAIT_MS = 1000
OUTAGE_ANSWER_BOUND_S = 5  # the API gives up on an unconnected outcome consumer after 2 s
ALICE, BOB, CAROL = bearer("alice", "wallet:user"), bearer("bob", "wallet:user"), bearer("carol", "wallet:user")
OPERATOR, AUDITOR, BANK = (
    bearer("ops", "wallet:operator"),
    bearer("auditor", "wallet:audit"),
    bearer("the-bank", "wallet:bank"),
)


def _write_rows(db_path: Path) -> str:
    db_url = f"sqlite:///{db_path}"
    with ReadModelStore(db_url) as store:
        store.create_schema()
    with sqlite3.connect(db_path) as connection:
        for table, rows in (("accounts", ACCOUNTS), ("holds", HOLDS)):
            columns = rows[0]._fields
            connection.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows
            )
    return db_url


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    (port,) = free_loopback_ports(1)
    # Nobody listens on this port: requests that pass validation and the lookup meet a Kafka outage.
    app = create_app(
        Settings().with_overrides(kafka_bootstrap=f"127.0.0.1:{port}"),
        ApiOptions(request_wait_ms=REQUEST_WAIT_MS),
        readmodel_db=_write_rows(tmp_path_factory.mktemp("holds-api") / "readmodel.db"),
        auth=auth_config(),
        rate_limits=RateLimits(rate_per_s=1000, burst=1000),
    )
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def _field_error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    first = body["errors"][0]
    return response.status_code, first["field"], first["reason"]


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"expires_in_s": 0}, "expires_in_s", "greater_than_equal"),
        ({"expires_in_s": 604_801}, "expires_in_s", "less_than_equal"),
        ({"expires_in_s": "60"}, "expires_in_s", "int_type"),
        ({"expires_in_s": 1.5}, "expires_in_s", "int_type"),
        ({"expires_in_s": True}, "expires_in_s", "int_type"),
        ({"amount": 12.34}, "amount", "amount_not_string"),
        ({"amount": "1.234"}, "amount", "invalid_amount"),
        ({"amount": "0.00"}, "amount", "invalid_amount"),
        ({"currency": "XYZ"}, "currency", "unknown_currency"),
        ({"to_account": "bad id"}, "to_account", "invalid_characters"),
        ({"transaction_id": "t" * 129}, "transaction_id", "too_long"),
        ({"hold_id": "h"}, "hold_id", "unknown_field"),
        ({"actor": "mallory"}, "actor", "unknown_field"),
    ],
)
def test_an_invalid_place_hold_field_is_refused_with_its_name_and_reason(
    api: httpx.Client, change: dict, field: str, reason: str
) -> None:
    response = api.post("/v1/accounts/alice-1/holds", json={**PLACE, **change}, headers=ALICE)
    assert _field_error(response) == (422, field, reason)


@pytest.mark.parametrize("missing", ["to_account", "amount", "currency", "transaction_id", "expires_in_s"])
def test_a_missing_place_hold_field_is_named(api: httpx.Client, missing: str) -> None:
    body = {name: value for name, value in PLACE.items() if name != missing}
    response = api.post("/v1/accounts/alice-1/holds", json=body, headers=ALICE)
    assert _field_error(response) == (422, missing, "missing")


@pytest.mark.parametrize(
    ("path", "body", "field", "reason"),
    [
        ("/v1/holds/h-one/capture", {"amount": 5}, "amount", "amount_not_string"),
        ("/v1/holds/h-one/capture", {"final": "yes"}, "final", "must_be_boolean"),
        ("/v1/holds/h-one/capture", {"capture_id": "bad id"}, "capture_id", "invalid_characters"),
        ("/v1/holds/h-one/capture", {"capture_id": ""}, "capture_id", "too_short"),
        # The body never names the account: the read model does.
        ("/v1/holds/h-one/capture", {"account_id": "alice-2"}, "account_id", "unknown_field"),
        ("/v1/holds/h-one/capture?account_id=bad%20id", {}, "account_id", "invalid_characters"),
        ("/v1/holds/bad%20id/capture", {}, "transaction_id", "invalid_characters"),
        ("/v1/holds/h-one/capture?wait_ms=-1", {}, "wait_ms", "greater_than_equal"),
        ("/v1/holds/h-one/void", {"void_id": "x" * 129}, "void_id", "too_long"),
        ("/v1/holds/h-one/void", {"amount": "1.00"}, "amount", "unknown_field"),
        # Checked once the read model has given the hold's currency (USD: 2 decimals).
        ("/v1/holds/h-one/capture", {"amount": "1.234"}, "amount", "invalid_amount"),
        ("/v1/holds/h-one/capture", {"amount": "-1.00"}, "amount", "invalid_amount"),
    ],
)
def test_an_invalid_capture_or_void_field_is_refused_with_its_name_and_reason(
    api: httpx.Client, path: str, body: dict, field: str, reason: str
) -> None:
    assert _field_error(api.post(path, json=body, headers=ALICE)) == (422, field, reason)


def test_a_hold_id_too_long_for_the_default_capture_id_still_gets_one_the_same_on_every_retry() -> None:
    hold_id = "h" * TRANSACTION_ID_LENGTH_MAX
    other = "h" * (TRANSACTION_ID_LENGTH_MAX - 1) + "i"  # the same up to its last character
    capture_id = own_id(None, hold_id, CAPTURE_ID_SUFFIX)
    assert capture_id == own_id(None, hold_id, CAPTURE_ID_SUFFIX), "a retry must get the same id"
    assert len(capture_id) <= TRANSACTION_ID_LENGTH_MAX and capture_id.endswith(CAPTURE_ID_SUFFIX)
    assert is_valid_id(capture_id, TRANSACTION_ID_LENGTH_MAX)
    assert own_id(None, other, CAPTURE_ID_SUFFIX) != capture_id
    assert own_id(None, "h-one", VOID_ID_SUFFIX) == "h-one" + VOID_ID_SUFFIX
    assert own_id("v-1", hold_id, VOID_ID_SUFFIX) == "v-1"


def test_a_capture_of_a_hold_id_of_the_longest_length_passes_validation(api: httpx.Client) -> None:
    response = api.post(f"/v1/holds/{'h' * TRANSACTION_ID_LENGTH_MAX}/capture?wait_ms=0", json={}, headers=ALICE)
    assert (response.status_code, response.json()["error"]) == (404, "hold_not_found"), response.text


def _outage(response: httpx.Response) -> None:
    """The request passed validation, the scopes and the lookup: it would have been published."""
    assert (response.status_code, response.json()["error"]) == (503, "kafka_unavailable"), response.text


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/accounts/alice-1/holds", PLACE, ALICE),
        ("/v1/holds/h-one/capture", {}, ALICE),
        ("/v1/holds/h-one/capture", {"amount": "5", "final": False, "capture_id": "c-1"}, ALICE),
        ("/v1/holds/h-one/void", {}, ALICE),
        ("/v1/holds/h-one/capture", {}, OPERATOR),  # an operator acts on any hold
        ("/v1/holds/h-one/void", None, OPERATOR),  # no body at all: every field has a default
        ("/v1/holds/h-two/capture?account_id=alice-2", {}, ALICE),
        ("/v1/holds/h-done/capture", {}, ALICE),  # an ended hold: the core answers (first answer or hold_captured)
        # JSON Schema's integer includes 60.0; optional ids may be null (found by schemathesis).
        ("/v1/accounts/alice-1/holds", {**PLACE, "expires_in_s": 60.0}, ALICE),
        ("/v1/holds/h-one/capture", {"capture_id": None, "amount": None}, ALICE),
        ("/v1/holds/h-one/void", {"void_id": None}, ALICE),
    ],
)
def test_a_request_the_caller_may_make_passes_to_kafka(
    api: httpx.Client, path: str, body: dict | None, headers: dict
) -> None:
    started_s = time.monotonic()
    _outage(api.post(path, json=body, headers=headers) if body is not None else api.post(path, headers=headers))
    assert time.monotonic() - started_s < OUTAGE_ANSWER_BOUND_S


@pytest.mark.parametrize(
    ("path", "headers", "status", "error"),
    [
        ("/v1/accounts/alice-1/holds", {}, 401, "unauthorized"),
        ("/v1/accounts/alice-1/holds", BANK, 403, "forbidden"),
        ("/v1/accounts/alice-1/holds", OPERATOR, 403, "forbidden"),  # only the owner places
        ("/v1/holds/h-one/capture", {}, 401, "unauthorized"),
        ("/v1/holds/h-one/capture", AUDITOR, 403, "forbidden"),
        ("/v1/holds/h-one/void", BANK, 403, "forbidden"),
        # The destination's owner sees the hold but may not capture or void it.
        ("/v1/holds/h-one/capture", BOB, 403, "forbidden"),
        ("/v1/holds/h-one/void", BOB, 403, "forbidden"),
        # Another's hold is answered like a missing one.
        ("/v1/holds/h-one/capture?wait_ms=0", CAROL, 404, "hold_not_found"),
        ("/v1/holds/nowhere/void?wait_ms=0", ALICE, 404, "hold_not_found"),
        ("/v1/holds/h-one/capture?account_id=alice-2&wait_ms=0", ALICE, 404, "hold_not_found"),
        # One id, two of the caller's accounts: the caller must say which.
        ("/v1/holds/h-two/capture", ALICE, 409, "ambiguous_transaction_id"),
        ("/v1/holds/h-two/void", OPERATOR, 409, "ambiguous_transaction_id"),
    ],
)
def test_who_may_place_capture_and_void_which_hold(
    api: httpx.Client, path: str, headers: dict, status: int, error: str
) -> None:
    body = PLACE if path.endswith("/holds") else {}
    response = api.post(path, json=body, headers=headers)
    assert (response.status_code, response.json()["error"]) == (status, error), response.text


@pytest.mark.parametrize("wait_ms", [None, 600, 5000])
def test_a_hold_the_read_model_does_not_show_is_looked_for_a_bounded_while(
    api: httpx.Client, wait_ms: int | None
) -> None:
    # A hold placed a moment ago may not have reached the read model: the lookup waits for it as
    # long as the request would wait for its outcome (the fixture's default: 1000 ms), at most 2 s.
    lookup_s = min(REQUEST_WAIT_MS if wait_ms is None else wait_ms, HOLD_LOOKUP_WAIT_MS_MAX) / 1000
    started_s = time.monotonic()
    params = {} if wait_ms is None else {"wait_ms": wait_ms}
    response = api.post("/v1/holds/nowhere/capture", json={}, params=params, headers=ALICE)
    elapsed_s = time.monotonic() - started_s
    assert (response.status_code, response.json()["error"]) == (404, "hold_not_found")
    assert lookup_s <= elapsed_s < lookup_s + 1.5


def test_the_hold_route_shows_a_hold_to_the_owners_of_its_two_accounts_and_to_readers_of_everything(
    api: httpx.Client,
) -> None:
    expected = {
        "hold_id": "h-one",
        "account_id": "alice-1",
        "to_account": "shop-1",
        "currency": "USD",
        "amount": "30.00",
        "captured": "5.00",
        "released": "0.00",
        "held": "25.00",
        "state": "open",
        "expires_ms": 1_700_000_060_000,
        "placed_ms": 1_700_000_000_000,
        "updated_ms": 1_700_000_001_000,
    }
    for headers in (ALICE, BOB, OPERATOR, AUDITOR):
        response = api.get("/v1/holds/h-one", headers=headers)
        assert (response.status_code, response.json()) == (200, expected)
    missing = api.get("/v1/holds/h-one", headers=CAROL)
    assert (missing.status_code, missing.json()["error"]) == (404, "hold_not_found")
    ended = api.get("/v1/holds/h-done", headers=ALICE).json()
    assert (ended["state"], ended["captured"], ended["released"], ended["held"]) == (
        "captured",
        "15.00",
        "5.00",
        "0.00",
    )


def test_one_hold_id_on_two_accounts_needs_the_account_to_be_shown(api: httpx.Client) -> None:
    ambiguous = api.get("/v1/holds/h-two", headers=ALICE)
    assert _field_error(ambiguous) == (409, "account_id", "ambiguous_transaction_id")
    assert "alice-1, alice-2" in ambiguous.json()["message"]
    named = api.get("/v1/holds/h-two", params={"account_id": "alice-2"}, headers=ALICE)
    assert (named.status_code, named.json()["account_id"]) == (200, "alice-2")
    # The destination's owner sees both too, and must name one alike.
    assert api.get("/v1/holds/h-two", headers=BOB).status_code == 409


def test_an_account_shows_its_held_and_available_money_and_lists_its_holds(api: httpx.Client) -> None:
    account = api.get("/v1/accounts/alice-1", headers=ALICE).json()
    assert (account["balance"], account["held"], account["available"]) == ("100.00", "40.00", "60.00")
    listed = api.get("/v1/accounts/alice-1/holds", headers=ALICE).json()
    assert sorted(hold["hold_id"] for hold in listed["holds"]) == ["h-done", "h-one", "h-two"]
    open_only = api.get("/v1/accounts/alice-1/holds", params={"state": "open"}, headers=ALICE).json()
    assert sorted(hold["hold_id"] for hold in open_only["holds"]) == ["h-one", "h-two"]
    assert api.get("/v1/accounts/alice-1/holds", headers=BOB).status_code == 404  # not bob's account
    assert _field_error(api.get("/v1/accounts/alice-1/holds", params={"state": "gone"}, headers=ALICE))[0] == 422


def test_the_openapi_document_describes_the_hold_routes(api: httpx.Client) -> None:
    document = api.get("/openapi.json").json()
    assert {
        "/v1/accounts/{account_id}/holds",
        "/v1/holds/{transaction_id}/capture",
        "/v1/holds/{transaction_id}/void",
        "/v1/holds/{transaction_id}",
    } <= set(document["paths"])
    place = document["components"]["schemas"]["PlaceHoldRequest"]
    assert set(place["required"]) == {"to_account", "amount", "currency", "transaction_id", "expires_in_s"}
    assert (place["properties"]["expires_in_s"]["minimum"], place["properties"]["expires_in_s"]["maximum"]) == (
        1,
        604_800,
    )
    assert "required" not in document["components"]["schemas"]["CaptureHoldRequest"]


def test_without_a_read_model_capture_and_void_need_the_account(tmp_path: Path) -> None:
    (port,) = free_loopback_ports(1)
    app = create_app(Settings().with_overrides(kafka_bootstrap=f"127.0.0.1:{port}"), auth=auth_config())
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        refused = client.post("/v1/holds/h-one/void", json={}, headers=ALICE)
        assert _field_error(refused) == (422, "account_id", "account_id_required")
        _outage(client.post("/v1/holds/h-one/void", params={"account_id": "alice-1"}, json={}, headers=ALICE))
        paths = set(client.get("/openapi.json").json()["paths"])
    assert "/v1/holds/{transaction_id}/capture" in paths and "/v1/holds/{transaction_id}" not in paths


def test_a_wrong_method_on_a_path_of_two_routers_names_the_methods_of_both(api: httpx.Client) -> None:
    # POST places a hold (the command side), GET lists the holds (the query side): found by schemathesis.
    response = api.delete("/v1/accounts/alice-1/holds", headers=ALICE)
    assert (response.status_code, response.json()["error"]) == (405, "method_not_allowed")
    assert {"GET", "POST"} <= set(response.headers["allow"].split(", "))
