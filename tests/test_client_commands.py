"""The client library's side of contract v2: one id rule, actor and role, and no saga legs ever."""

from __future__ import annotations

from typing import Any

import pytest

from producers.client import CommandPublisher, check_ids, client_command, local_command
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    TICK_TRANSACTION_ID,
    CaptureHold,
    CreditLeg,
    Deposit,
    Freeze,
    OpenAccount,
    RefundLeg,
    Tick,
    Transfer,
    VoidHold,
    is_valid_id,
)


@pytest.mark.parametrize(
    "text",
    ["alice\n", "alice\r\n", "\nalice", "al ice", "", "-alice", "ali/ce", "é", "a" * (ACCOUNT_ID_LENGTH_MAX + 1)],
)
def test_ids_the_contract_refuses_are_refused_by_the_one_rule(text: str) -> None:
    # re.match with "$" accepted "alice\n" in the client library while the API refused it.
    assert not is_valid_id(text, ACCOUNT_ID_LENGTH_MAX)
    with pytest.raises(ValueError):
        check_ids(local_command(Deposit, transaction_id="t-1", account_id=text, amount="1.00", currency="USD"))


@pytest.mark.parametrize("text", ["alice", "a", "A.b_c:d@e-f", "0" * ACCOUNT_ID_LENGTH_MAX])
def test_ids_the_contract_allows_pass(text: str) -> None:
    assert is_valid_id(text, ACCOUNT_ID_LENGTH_MAX)
    check_ids(local_command(Deposit, transaction_id="t-1", account_id=text, amount="1.00", currency="USD"))


def test_client_commands_carry_the_actor_and_role_given_or_the_local_edges() -> None:
    frozen = client_command(Freeze, transaction_id="t", account_id="a")
    assert isinstance(frozen, Freeze)  # client_command builds the class it is given
    assert (frozen.actor, frozen.role) == ("operator", "operator")
    opened = client_command(OpenAccount, transaction_id="t", account_id="a", currency="USD", actor="alice")
    assert isinstance(opened, OpenAccount)
    assert (opened.actor, opened.role) == ("alice", "user")
    sent = client_command(Transfer, transaction_id="t", from_account="a", to_account="b", amount="1.00", currency="USD")
    assert isinstance(sent, Transfer)
    # `local:` and the account id, which no token's sub can be: as the bare id, a token whose sub
    # was "a" owned every account a local edge had opened as "a" and moved its money.
    assert (sent.actor, sent.role) == ("local:a", "user")
    with pytest.raises(ValueError):
        client_command(Freeze, transaction_id="t\n", account_id="a")


def _legs() -> list:
    common: dict[str, Any] = dict(
        transaction_id="t",
        actor="a",
        issued_ms=1,
        from_account="a",
        to_account="b",
        amount="1.00",
        currency="USD",
        digest="d",
    )
    return [CreditLeg(**common), RefundLeg(**common, reason="account_frozen", debit_ms=1)]


@pytest.mark.parametrize("leg", _legs(), ids=["credit_leg", "refund_leg"])
def test_the_client_library_refuses_to_publish_saga_legs(leg) -> None:
    publisher = CommandPublisher("127.0.0.1:1", "never.used", message_timeout_ms=100)
    try:
        with pytest.raises(ValueError, match="saga leg"):
            publisher.submit(leg)
        with pytest.raises(ValueError, match="saga leg"):
            publisher.publish_batch([leg])
        with pytest.raises(ValueError):
            client_command(type(leg), transaction_id="t")
    finally:
        publisher.close(timeout_s=0)


def test_a_capture_or_void_names_a_hold_id_the_contract_allows() -> None:
    for hold_id in ("hold\n", "bad id", "h" * 129):
        with pytest.raises(ValueError, match="hold_id"):
            client_command(CaptureHold, transaction_id="c", account_id="a", hold_id=hold_id)
        with pytest.raises(ValueError, match="hold_id"):
            client_command(VoidHold, transaction_id="v", account_id="a", hold_id=hold_id)
    captured = client_command(CaptureHold, transaction_id="c", account_id="a", hold_id="h-1", amount="1.00")
    assert isinstance(captured, CaptureHold) and (captured.actor, captured.role) == ("local:a", "user")


def test_the_client_library_refuses_to_publish_a_tick() -> None:
    publisher = CommandPublisher("127.0.0.1:1", "never.used", message_timeout_ms=100)
    tick = Tick(transaction_id=TICK_TRANSACTION_ID, partition=0)
    try:
        with pytest.raises(ValueError, match="only a processor"):
            publisher.publish_batch([tick])  # type: ignore[list-item]  # what a careless caller might do
        with pytest.raises(ValueError, match="only a processor"):
            check_ids(tick)  # type: ignore[arg-type]
    finally:
        publisher.close(timeout_s=0)
