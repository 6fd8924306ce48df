"""The holds part of `wallet demo`: through the HTTP API, as a client would, on two accounts of
its own (so the transfer workload's conservation line stays about the workload alone).

A payer funded with DEMO_HOLD_FUNDING places four holds for a shop: one captured in two partial
captures (the second final, releasing the rest), one captured whole, one voided and one left to
expire; no request names the last one again: the log's clock ends it (a later command on the
payer's partition, or the processors' ticks when the partition is idle).
The summary shows each hold as the read model has it, and the payer's balance, held and
available amounts.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from dataclasses import dataclass

from infra.settings import Settings
from wallet.stack import API_PROBE_TIMEOUT_S, StackState, get_json

DEMO_HOLD_CURRENCY = "USD"
DEMO_HOLD_FUNDING = "100.00"
DEMO_HOLD_EXPIRES_IN_S = 1
DEMO_HOLD_LONG_EXPIRES_IN_S = 600
HOLD_REQUEST_WAIT_MS = 10_000
HOLD_HTTP_TIMEOUT_S = HOLD_REQUEST_WAIT_MS / 1000 + 10
# The expiring hold's expiry, a tick interval or two (1 s by default) and the read model's lag.
HOLD_EXPIRED_WAIT_S = 30.0
HOLD_POLL_INTERVAL_S = 0.2
# The demo acts as one principal: it opens (and so owns) the two accounts and funds the payer.
DEMO_HOLDS_PRINCIPAL = "wallet-demo-holds"
DEMO_HOLDS_SCOPES = "wallet:user wallet:bank"
TOKEN_TTL_S = 600


@dataclass(frozen=True)
class _Plan:
    """A hold the demo places and what it does with it, and the state and amounts it must end with."""

    label: str
    amount: str
    captures: tuple[tuple[str | None, bool], ...]  # (amount or None for all, final) per capture
    void: bool
    expires_in_s: int
    expected: tuple[str, str, str]  # (state, captured, released)


PLANS = (
    _Plan(
        "partial",
        "40.00",
        (("10.00", False), ("5.00", True)),
        False,
        DEMO_HOLD_LONG_EXPIRES_IN_S,
        ("captured", "15.00", "25.00"),
    ),
    _Plan("full", "25.00", ((None, True),), False, DEMO_HOLD_LONG_EXPIRES_IN_S, ("captured", "25.00", "0.00")),
    _Plan("void", "15.00", (), True, DEMO_HOLD_LONG_EXPIRES_IN_S, ("voided", "0.00", "15.00")),
    _Plan("expire", "10.00", (), False, DEMO_HOLD_EXPIRES_IN_S, ("expired", "0.00", "10.00")),
)


class HoldDemoError(Exception):
    pass


def run_holds(settings: Settings, state: StackState) -> bool:
    """The holds workload and its summary; returns whether every hold ended as planned."""
    from infra.secrets import jwt_secret
    from producers.auth import issue_token

    print("\n== holds: place, capture (in part and whole), void and expire, through the HTTP API ==")
    if not get_json(f"{state.api_url}/healthz", API_PROBE_TIMEOUT_S)[1].get("readmodel"):
        print("skipped: the API has no read model, which captures and voids find their hold in")
        return True
    token = issue_token(jwt_secret(settings), DEMO_HOLDS_PRINCIPAL, DEMO_HOLDS_SCOPES, ttl_s=TOKEN_TTL_S)
    run = uuid.uuid4().hex[:8]
    payer, shop = f"demo-payer-{run}", f"demo-shop-{run}"
    try:
        holds = _place_and_settle(state.api_url, token, run, payer, shop)
        shown = [_until_ended(state.api_url, token, hold_id) for hold_id in holds]
        payer_view = _get(state.api_url, token, f"/v1/accounts/{payer}")
        shop_view = _get(state.api_url, token, f"/v1/accounts/{shop}")
    except HoldDemoError as error:
        print(f"holds: FAILED: {error}")
        return False
    as_planned = True
    for plan, hold in zip(PLANS, shown, strict=True):
        ended = (hold["state"], hold["captured"], hold["released"])
        as_planned &= ended == plan.expected
        captures = f" in {len(plan.captures)} captures" if len(plan.captures) > 1 else ""
        print(
            f"  {hold['hold_id']:34} {hold['amount']:>6} {hold['currency']} {hold['state']:8} ({hold['captured']} "
            f"captured{captures}, {hold['released']} released)"
            + ("" if ended == plan.expected else f"   NOT as planned: {plan.expected}")
        )
    print(
        f"  payer {payer}: balance {payer_view['balance']}, held {payer_view['held']}, available "
        f"{payer_view['available']}; shop {shop}: balance {shop_view['balance']} {DEMO_HOLD_CURRENCY}"
    )
    counts = {state: sum(hold["state"] == state for hold in shown) for state in ("captured", "voided", "expired")}
    print(
        f"holds: {len(shown)} placed, {counts['captured']} captured (1 in two partial captures), "
        f"{counts['voided']} voided, {counts['expired']} expired at the log's time: "
        + ("as planned" if as_planned else "NOT as planned")
    )
    return as_planned


def _place_and_settle(api_url: str, token: str, run: str, payer: str, shop: str) -> list[str]:
    """Opens and funds the accounts, places every hold, then captures and voids; the hold ids."""
    _command(api_url, token, "/v1/accounts", {"account_id": payer, "currency": DEMO_HOLD_CURRENCY}, f"{payer}.open")
    _command(
        api_url,
        token,
        "/v1/accounts",
        {"account_id": shop, "currency": DEMO_HOLD_CURRENCY, "kind": "merchant"},
        f"{shop}.open",
    )
    _command(
        api_url,
        token,
        f"/v1/accounts/{payer}/deposit",
        {"amount": DEMO_HOLD_FUNDING, "currency": DEMO_HOLD_CURRENCY},
        f"{payer}.fund",
    )
    hold_ids = []
    for plan in PLANS:
        hold_id = f"demo-hold-{run}-{plan.label}"
        body = {
            "to_account": shop,
            "amount": plan.amount,
            "currency": DEMO_HOLD_CURRENCY,
            "expires_in_s": plan.expires_in_s,
        }
        _command(api_url, token, f"/v1/accounts/{payer}/holds", body, hold_id)
        hold_ids.append(hold_id)
    for plan, hold_id in zip(PLANS, hold_ids, strict=True):
        for number, (amount, final) in enumerate(plan.captures, start=1):
            body = {"final": final, "capture_id": f"{hold_id}.capture-{number}"}
            if amount is not None:
                body["amount"] = amount
            _command(api_url, token, f"/v1/holds/{hold_id}/capture", body, None)
        if plan.void:
            _command(api_url, token, f"/v1/holds/{hold_id}/void", {}, None)
    return hold_ids


def _command(api_url: str, token: str, path: str, body: dict, transaction_id: str | None) -> None:
    """POSTs one command and requires `success`."""
    from producers.cli import call_api

    if transaction_id is not None:
        body = {**body, "transaction_id": transaction_id}
    status, reply = call_api(
        api_url, "POST", f"{path}?wait_ms={HOLD_REQUEST_WAIT_MS}", body, HOLD_HTTP_TIMEOUT_S, token=token
    )
    if status != 200 or reply.get("status") != "success":
        raise HoldDemoError(f"POST {path} answered HTTP {status}: {reply}")


def _get(api_url: str, token: str, path: str) -> dict:
    try:
        status, reply = get_json(f"{api_url}{path}", HOLD_HTTP_TIMEOUT_S, token)
    except (OSError, ValueError) as error:
        raise HoldDemoError(f"GET {path} failed: {error}") from None
    if status != 200:
        raise HoldDemoError(f"GET {path} answered HTTP {status}: {reply}")
    return reply


def _until_ended(api_url: str, token: str, hold_id: str) -> dict:
    """The hold once the read model shows it ended, which for the expiring one takes ticks."""
    path = f"/v1/holds/{urllib.parse.quote(hold_id, safe='')}"
    deadline_s = time.monotonic() + HOLD_EXPIRED_WAIT_S
    while True:
        try:
            hold = _get(api_url, token, path)
        except HoldDemoError:
            hold = None  # not in the read model yet
        if hold is not None and hold["state"] != "open":
            return hold
        if time.monotonic() > deadline_s:
            raise HoldDemoError(f"hold {hold_id} did not end within {HOLD_EXPIRED_WAIT_S:.0f} s: {hold}")
        time.sleep(HOLD_POLL_INTERVAL_S)
