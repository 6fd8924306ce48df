"""Holds through the HTTP API and the CLI against the real broker, a real `wallet processor`
subprocess and a live read model: place, partial and final captures across partitions, void,
expiry by the processors' ticks, a refused capture refunded, who may capture, and what the
hold and account routes show.

Each test opens its own accounts (unique ids), so the tests share one processor, one read
model and one set of topics. Balances are read from the ledger (a fold of wallet.events)
where the answer under test is the read model's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consumers.readmodel.consumer import ReadModelConsumer
from consumers.readmodel.query_api import WAIT_MS_MAX
from consumers.readmodel.store import ReadModelStore
from infra.settings import Settings
from producers.load import ledger_balances
from schemas.partitioning import partition_for
from tests.support.api_callers import HTTP_TIMEOUT_S, Caller, open_account, served_api, unique_id
from tests.support.api_callers import people as callers
from tests.support.auth import token
from tests.support.processes import ProcessorProcess

READ_MODEL_WAIT_S = 20.0
ACCOUNT_WAIT_MS = WAIT_MS_MAX
# An expiry of 1 s, then a tick within a tick interval (1 s) or two, then the read model.
EXPIRY_WAIT_S = 20.0
POLL_INTERVAL_S = 0.1
READ_MODEL_BATCH_WAIT_MS = 20
CONSUMER_STOP_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def processor(wallet_settings: Settings) -> Iterator[ProcessorProcess]:
    process = ProcessorProcess(wallet_settings, "holds-1").start().wait_until_assigned()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def readmodel_db(wallet_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A read model kept up to date by the consumer on a thread, as `wallet readmodel` would."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('holds-readmodel') / 'readmodel.db'}"
    store = ReadModelStore(db_url)
    store.create_schema()
    consumer = ReadModelConsumer(store, wallet_settings, batch_wait_ms=READ_MODEL_BATCH_WAIT_MS)
    consumer.start()
    stopping, failures = threading.Event(), []

    def consume() -> None:
        try:
            while not stopping.is_set():
                consumer.step()
        except BaseException as error:  # noqa: BLE001 - reported by the fixture's teardown
            failures.append(error)

    thread = threading.Thread(target=consume, name="holds-readmodel", daemon=True)
    thread.start()
    try:
        yield db_url
    finally:
        stopping.set()
        thread.join(CONSUMER_STOP_TIMEOUT_S)
        consumer.close()
        store.close()
    assert not failures, failures


@pytest.fixture(scope="module")
def api(wallet_settings: Settings, processor: ProcessorProcess, readmodel_db: str) -> Iterator[httpx.Client]:
    with served_api(wallet_settings, readmodel_db) as client:
        yield client


@pytest.fixture(scope="module")
def people(api: httpx.Client) -> dict[str, Caller]:
    return callers(api)


def _id_apart_from(account: str, partitions: int) -> str:
    """An account id on another partition than `account`'s: a capture across partitions."""
    while True:
        other = unique_id("apart")
        if partition_for(other, partitions) != partition_for(account, partitions):
            return other


def _place(
    owner: Caller, account: str, to_account: str, amount: str, expires_in_s: int = 600, hold_id: str | None = None
):
    hold_id = hold_id or unique_id("hold")
    body = {
        "to_account": to_account,
        "amount": amount,
        "currency": "USD",
        "transaction_id": hold_id,
        "expires_in_s": expires_in_s,
    }
    return hold_id, owner.outcome(f"/v1/accounts/{account}/holds", body)


def _hold_when(caller: Caller, hold_id: str, done, wait_s: float = READ_MODEL_WAIT_S, **params) -> dict:
    """The hold as the read model shows it, once `done(hold)` holds (bounded)."""
    deadline_s = time.monotonic() + wait_s
    while True:
        response = caller.get(f"/v1/holds/{hold_id}", **params)
        hold = response.json() if response.status_code == 200 else None
        if hold is not None and done(hold):
            return hold
        assert time.monotonic() < deadline_s, f"hold {hold_id} is {response.status_code} {response.text}"
        time.sleep(POLL_INTERVAL_S)


def _account_at(caller: Caller, account: str, sequence: int) -> dict:
    response = caller.get(f"/v1/accounts/{account}", min_sequence=sequence, wait_ms=ACCOUNT_WAIT_MS)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_hold_captured_in_two_parts_across_partitions_moves_exactly_what_was_captured(
    people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bank = people["alice"], people["bank"]
    payer = open_account(alice, bank, funds="100.00")
    shop = open_account(alice, bank, kind="merchant", account=_id_apart_from(payer, wallet_settings.partitions))
    hold_id, placed = _place(alice, payer, shop, "40.00")
    assert placed == ("success", None)
    account = _account_at(alice, payer, 3)  # opened, funded, held
    assert (account["balance"], account["held"], account["available"]) == ("100.00", "40.00", "60.00")
    # Only available money moves out: 70.00 of a balance of 100.00 of which 40.00 is held is refused.
    withdraw = {"amount": "70.00", "currency": "USD", "transaction_id": unique_id("w")}
    assert bank.outcome(f"/v1/accounts/{payer}/withdraw", withdraw) == ("failure", "insufficient_funds")

    first = {"amount": "10.00", "final": False, "capture_id": f"{hold_id}.c1"}
    assert alice.outcome(f"/v1/holds/{hold_id}/capture", first) == ("success", None)
    partly = _hold_when(alice, hold_id, lambda hold: hold["captured"] == "10.00")
    assert (partly["state"], partly["held"], partly["released"]) == ("open", "30.00", "0.00")
    assert alice.outcome(f"/v1/holds/{hold_id}/capture", {"amount": "5.00", "capture_id": f"{hold_id}.c2"}) == (
        "success",
        None,
    )
    ended = _hold_when(alice, hold_id, lambda hold: hold["state"] != "open")
    assert {
        key: ended[key] for key in ("state", "amount", "captured", "released", "held", "account_id", "to_account")
    } == {
        "state": "captured",
        "amount": "40.00",
        "captured": "15.00",
        "released": "25.00",
        "held": "0.00",
        "account_id": payer,
        "to_account": shop,
    }
    assert ledger_balances(wallet_settings, [payer, shop]) == {payer: "85.00", shop: "15.00"}
    account = _account_at(alice, payer, 5)
    assert (account["balance"], account["held"], account["available"]) == ("85.00", "0.00", "85.00")

    # A retry is the same answer; a new capture of an ended hold moves nothing.
    assert alice.outcome(f"/v1/holds/{hold_id}/capture", {"amount": "5.00", "capture_id": f"{hold_id}.c2"}) == (
        "success",
        None,
    )
    assert alice.outcome(f"/v1/holds/{hold_id}/capture", {"capture_id": f"{hold_id}.c3"}) == (
        "failure",
        "hold_captured",
    )
    status = alice.get(f"/v1/transactions/{hold_id}.c1", account_id=payer).json()
    assert (status["status"], status["reason"]) == ("success", None)
    assert ledger_balances(wallet_settings, [payer, shop]) == {payer: "85.00", shop: "15.00"}


def test_a_void_releases_the_hold_and_a_capture_after_it_is_refused(
    people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bank = people["alice"], people["bank"]
    payer = open_account(alice, bank, funds="50.00")
    shop = open_account(alice, bank)
    hold_id, placed = _place(alice, payer, shop, "30.00")
    assert placed == ("success", None)
    # A hold needs available money: 30.00 of 50.00 is held, so another 30.00 is refused.
    assert _place(alice, payer, shop, "30.00")[1] == ("failure", "insufficient_funds")
    assert alice.outcome(f"/v1/holds/{hold_id}/capture", {"amount": "30.01", "capture_id": unique_id("c")}) == (
        "failure",
        "capture_exceeds_hold",
    )
    assert alice.outcome(f"/v1/holds/{hold_id}/void") == ("success", None)
    assert alice.outcome(f"/v1/holds/{hold_id}/void") == ("success", None)  # the default void id: a retry
    voided = _hold_when(alice, hold_id, lambda hold: hold["state"] != "open")
    assert (voided["state"], voided["captured"], voided["released"], voided["held"]) == (
        "voided",
        "0.00",
        "30.00",
        "0.00",
    )
    assert alice.outcome(f"/v1/holds/{hold_id}/capture") == ("failure", "hold_voided")
    account = _account_at(alice, payer, 4)
    assert (account["balance"], account["held"], account["available"]) == ("50.00", "0.00", "50.00")
    assert ledger_balances(wallet_settings, [payer, shop]) == {payer: "50.00", shop: "0.00"}


def test_only_the_payers_owner_or_an_operator_captures_and_the_destinations_owner_reads(
    people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bob, bank, operator = people["alice"], people["bob"], people["bank"], people["operator"]
    payer = open_account(alice, bank, funds="20.00")
    shop = open_account(bob, bank)
    hold_id, placed = _place(alice, payer, shop, "12.00")
    assert placed == ("success", None)
    # Bob may not place a hold on alice's account: the core refuses it, and says who asked.
    assert _place(bob, payer, shop, "1.00")[1] == ("failure", "not_authorized")
    seen = _hold_when(bob, hold_id, lambda hold: True)
    assert (seen["account_id"], seen["to_account"], seen["amount"]) == (payer, shop, "12.00")
    refused = bob.post(f"/v1/holds/{hold_id}/capture")
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    assert operator.outcome(f"/v1/holds/{hold_id}/capture", {"amount": "2.00"}) == ("success", None)
    assert ledger_balances(wallet_settings, [payer, shop]) == {payer: "18.00", shop: "2.00"}
    stranger = Caller(alice.api, unique_id("carol"), "wallet:user")
    assert stranger.get(f"/v1/holds/{hold_id}").status_code == 404


def test_a_hold_nobody_touches_expires_by_the_processors_ticks(people: dict[str, Caller]) -> None:
    alice, bank = people["alice"], people["bank"]
    payer = open_account(alice, bank, funds="10.00")
    shop = open_account(alice, bank)
    hold_id, placed = _place(alice, payer, shop, "4.00", expires_in_s=1)
    assert placed == ("success", None)
    expired = _hold_when(alice, hold_id, lambda hold: hold["state"] != "open", wait_s=EXPIRY_WAIT_S)
    assert (expired["state"], expired["released"], expired["held"]) == ("expired", "4.00", "0.00")
    assert expired["expires_ms"] - expired["placed_ms"] == 1000
    assert expired["updated_ms"] >= expired["expires_ms"]
    assert alice.outcome(f"/v1/holds/{hold_id}/capture") == ("failure", "hold_expired")
    account = _account_at(alice, payer, 4)
    assert (account["held"], account["available"]) == ("0.00", "10.00")


def test_a_capture_the_destination_refuses_is_refunded_to_available_money(
    people: dict[str, Caller], wallet_settings: Settings
) -> None:
    alice, bank, operator = people["alice"], people["bank"], people["operator"]
    payer = open_account(alice, bank, funds="10.00")
    shop = open_account(alice, bank, account=_id_apart_from(payer, wallet_settings.partitions))
    hold_id, placed = _place(alice, payer, shop, "6.00")
    assert placed == ("success", None)
    assert operator.outcome(f"/v1/accounts/{shop}/freeze", {"transaction_id": unique_id("freeze")}) == ("success", None)
    assert alice.outcome(f"/v1/holds/{hold_id}/capture") == ("failure", "account_frozen")
    assert ledger_balances(wallet_settings, [payer, shop]) == {payer: "10.00", shop: "0.00"}
    account = _account_at(alice, payer, 5)  # opened, funded, held, captured, refunded
    assert (account["balance"], account["held"], account["available"]) == ("10.00", "0.00", "10.00")
    status = alice.get(f"/v1/transactions/{hold_id}.capture", account_id=payer).json()
    assert (status["status"], status["reason"]) == ("failure", "account_frozen")


# -- the CLI ---------------------------------------------------------------------------------


def _wallet(api: httpx.Client, sub: str, *arguments: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "WALLET_TOKEN": token(sub, "wallet:user wallet:bank"),
        "WALLET_API_URL": str(api.base_url),
    }
    return subprocess.run(
        [sys.executable, "-m", "wallet.cli", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT_S,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_the_hold_verbs_of_the_cli_answer_readably_with_an_exit_status_per_outcome(
    api: httpx.Client, wallet_settings: Settings
) -> None:
    sub, hold_id = unique_id("cli"), unique_id("cli-hold")
    caller = Caller(api, sub, "wallet:user wallet:bank")  # the CLI's principal, for the setup and the reads
    payer, shop = open_account(caller, caller, funds="20.00"), open_account(caller, caller)
    placed = _wallet(api, sub, "hold", "place", payer, shop, "8", "USD", "--expires-in-s", "600", "--tx", hold_id)
    assert placed.returncode == 0, placed.stdout + placed.stderr
    assert placed.stdout.startswith(f"success: place_hold {hold_id}")
    part = _wallet(api, sub, "hold", "capture", hold_id, "--amount", "3", "--no-final", "--tx", f"{hold_id}.c1")
    assert part.returncode == 0, part.stdout + part.stderr
    assert part.stdout.startswith(f"success: capture_hold {hold_id}.c1 of hold {hold_id}")
    beyond = _wallet(api, sub, "hold", "capture", hold_id, "--amount", "6", "--tx", f"{hold_id}.c2")
    assert beyond.returncode == 1 and "capture_exceeds_hold" in beyond.stdout
    voided = _wallet(api, sub, "hold", "void", hold_id)
    assert voided.returncode == 0, voided.stdout + voided.stderr
    assert voided.stdout.startswith(f"success: void_hold {hold_id}.void of hold {hold_id}")
    _hold_when(caller, hold_id, lambda hold: hold["state"] == "voided")
    shown = _wallet(api, sub, "hold", "show", hold_id)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.splitlines()[:2] == [
        f"hold {hold_id}: {payer} -> {shop}, 8.00 USD, voided",
        "  captured 3.00, released 5.00, still held 0.00 USD",
    ]
    missing = _wallet(api, sub, "hold", "show", unique_id("never"))
    assert missing.returncode == 1 and "hold_not_found" in missing.stderr
    bad = _wallet(api, sub, "hold", "capture", "bad id")
    assert bad.returncode == 1 and "hold id" in bad.stderr
    assert ledger_balances(wallet_settings, [payer, shop]) == {payer: "17.00", shop: "3.00"}
