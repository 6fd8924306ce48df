"""The HTTP API as its clients hold it: an app served on a thread with token auth, and one
`Caller` per principal (its token, its requests). Shared by the identity and the hold tests."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator

import httpx

from infra.settings import Settings
from producers.api import ApiOptions
from producers.auth import RateLimits
from tests.support.auth import auth_config, bearer
from tests.support.serving import serving_in_thread
from wallet.api_app import create_app

# Generous: the processor may still be joining its group at the first request.
REQUEST_WAIT_MS = 20_000
HTTP_TIMEOUT_S = 60
# Far above what a test sends: a test of the limit builds its own app.
RATE_PER_S = 1000
# A capture or a void is named by its hold's id (and its capture id), not by a transaction id.
_NAMED_BY_THE_HOLD = re.compile(r"/v1/holds/[^/]+/(capture|void)")


def unique_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def served_api(settings: Settings, readmodel_db: str) -> Iterator[httpx.Client]:
    app = create_app(
        settings,
        ApiOptions(request_wait_ms=REQUEST_WAIT_MS),
        readmodel_db=readmodel_db,
        auth=auth_config(),
        rate_limits=RateLimits(rate_per_s=RATE_PER_S, burst=RATE_PER_S),
    )
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        yield client


class Caller:
    """One principal with its token: what a client of the API holds."""

    def __init__(self, api: httpx.Client, sub: str, scope: str) -> None:
        self.api = api
        self.sub = sub
        self.headers = bearer(sub, scope)

    def post(self, path: str, body: dict | None = None, **params) -> httpx.Response:
        """POSTs `body`, with a fresh transaction id unless it names one or the route takes none."""
        named = {} if _NAMED_BY_THE_HOLD.fullmatch(path) else {"transaction_id": unique_id("tx")}
        return self.api.post(path, json={**named, **(body or {})}, params=params, headers=self.headers)

    def command(self, path: str, body: dict | None = None, **params) -> dict:
        response = self.post(path, body, **params)
        assert response.status_code == 200, response.text
        return response.json()

    def outcome(self, path: str, body: dict | None = None, **params) -> tuple[str, str | None]:
        reply = self.command(path, body, **params)
        return reply["status"], reply["reason"]

    def get(self, path: str, **params) -> httpx.Response:
        return self.api.get(path, params=params, headers=self.headers)


def people(api: httpx.Client) -> dict[str, Caller]:
    """A user each for alice and bob, a bank, an operator and an auditor, with unique names."""
    return {
        "alice": Caller(api, unique_id("alice"), "wallet:user"),
        "bob": Caller(api, unique_id("bob"), "wallet:user"),
        "bank": Caller(api, unique_id("bank"), "wallet:bank"),
        "operator": Caller(api, unique_id("ops"), "wallet:operator"),
        "auditor": Caller(api, unique_id("audit"), "wallet:audit"),
    }


def open_account(
    owner: Caller, bank: Caller, funds: str | None = None, kind: str = "user", account: str | None = None
) -> str:
    """A new USD account of `owner`'s (a unique id unless `account` names one), funded by `bank`
    with `funds` if given; its id."""
    account = account or unique_id(f"{owner.sub}-{kind}")
    assert owner.outcome("/v1/accounts", {"account_id": account, "currency": "USD", "kind": kind}) == ("success", None)
    if funds is not None:
        deposit = {"amount": funds, "currency": "USD"}
        assert bank.outcome(f"/v1/accounts/{account}/deposit", deposit) == ("success", None)
    return account
