"""The read model's pure projection: entries from events, the status rules of a transaction id, and holds."""

from __future__ import annotations

import msgspec
import pytest

from benchmarks.support.reference_pipeline import decide
from consumers.readmodel.projection import AccountRow, TransactionRow, merge_status, project
from schemas.codec import decode_event, decode_outcome
from schemas.commands import CaptureHold, Deposit, Freeze, OpenAccount, PlaceHold, Transfer, VoidHold, Withdraw
from schemas.events import CommandRejected, HoldCaptured
from schemas.outcomes import Reason
from streams.core.state import CorruptLog
from tests.support.commands import edge

PENDING_A = TransactionRow("alice", "t1", "pending", None, "digest-a")
SUCCESS_A = TransactionRow("alice", "t1", "success", None, "digest-a")
FAILURE_A = TransactionRow("alice", "t1", "failure", Reason.INSUFFICIENT_FUNDS, "digest-a")
CONFLICT_A = TransactionRow("alice", "t1", "failure", Reason.DUPLICATE_CONFLICT, "digest-a")
CONFLICT_B = TransactionRow("alice", "t1", "failure", Reason.DUPLICATE_CONFLICT, "digest-b")
STRANGER_B = TransactionRow("alice", "t1", "failure", Reason.NOT_AUTHORIZED, "digest-b", "mallory")


@pytest.mark.parametrize(
    "current, incoming, expected",
    [
        (None, PENDING_A, PENDING_A),
        (PENDING_A, SUCCESS_A, SUCCESS_A),
        (SUCCESS_A, PENDING_A, SUCCESS_A),  # the debit event read after the outcome
        (SUCCESS_A, SUCCESS_A, SUCCESS_A),  # a retry re-publishes the answer
        (SUCCESS_A, FAILURE_A, SUCCESS_A),  # the first final answer wins
        (PENDING_A, CONFLICT_B, PENDING_A),  # answers the request that reused the id
        (SUCCESS_A, CONFLICT_B, SUCCESS_A),
        (PENDING_A, CONFLICT_A, CONFLICT_A),  # a conflict that carries this request's own digest answers it
        (CONFLICT_B, PENDING_A, PENDING_A),  # read before the transaction's own debit: replaced by it
        (CONFLICT_B, SUCCESS_A, SUCCESS_A),  # ... or by its own answer
        (CONFLICT_A, PENDING_A, CONFLICT_A),
        (PENDING_A, STRANGER_B, PENDING_A),  # a stranger's request under alice's id answers the stranger
        (STRANGER_B, PENDING_A, PENDING_A),  # ... read before alice's own: replaced by it
        (STRANGER_B, SUCCESS_A, SUCCESS_A),
        (None, STRANGER_B, STRANGER_B),
    ],
    ids=lambda row: f"{row.status}/{row.reason}/{row.digest}" if row else "none",
)
def test_transaction_status_merge_keeps_the_transactions_own_first_final_answer(current, incoming, expected) -> None:
    merged = merge_status(current, incoming)
    assert (merged if merged is not None else current) == expected
    if merged is not None:
        assert merged != current or current is None, "a change that changes nothing must be reported as None"


def _scenario_events():
    commands = [
        edge(OpenAccount, transaction_id="o1", account_id="alice", currency="USD"),
        edge(OpenAccount, transaction_id="o2", account_id="bob", currency="USD"),
        edge(OpenAccount, transaction_id="o3", account_id="carol", currency="USD"),
        edge(Deposit, transaction_id="d1", account_id="alice", amount="100.00", currency="USD"),
        edge(Withdraw, transaction_id="w1", account_id="alice", amount="10.50", currency="USD"),
        edge(Freeze, transaction_id="f1", account_id="carol"),
        edge(Transfer, transaction_id="t1", from_account="alice", to_account="bob", amount="20.00", currency="USD"),
        edge(Transfer, transaction_id="t2", from_account="alice", to_account="carol", amount="5.00", currency="USD"),
        edge(Withdraw, transaction_id="w2", account_id="bob", amount="999.00", currency="USD"),
    ]
    return [decode_event(record.value) for record in decide(commands, partition_count=1).events[0]]


def test_entries_carry_the_signed_amount_and_the_balance_after_each_event() -> None:
    changes = project({}, {}, _scenario_events(), [])
    alice = [
        (e.type, e.amount_minor, e.balance_after_minor, e.counterparty)
        for e in changes.entries
        if e.account_id == "alice"
    ]
    assert alice == [
        ("account_opened", 0, 0, None),
        ("deposited", 10000, 10000, None),
        ("withdrawn", -1050, 8950, None),
        ("transfer_debited", -2000, 6950, "bob"),
        ("transfer_debited", -500, 6450, "carol"),
        ("transfer_refunded", 500, 6950, "carol"),  # carol is frozen
    ]
    carol = [(e.type, e.amount_minor, e.balance_after_minor) for e in changes.entries if e.account_id == "carol"]
    assert carol == [("account_opened", 0, 0), ("account_frozen", 0, 0)]
    assert {row.account_id: (row.balance_minor, row.sequence, row.status) for row in changes.accounts} == {
        "alice": (6950, 6, "active"),
        "bob": (2000, 2, "active"),
        "carol": (0, 2, "frozen"),
    }


def test_rejections_change_no_account_and_write_no_entry() -> None:
    events = _scenario_events()
    rejection = next(event for event in events if type(event) is CommandRejected and event.transaction_id == "w2")
    stored_bob = AccountRow("bob", "USD", "user", "active", 2000, 2)
    changes = project({"bob": stored_bob}, {}, [rejection], [])
    assert changes.accounts == [] and changes.entries == []


def test_events_already_stored_are_not_applied_twice() -> None:
    events = _scenario_events()
    stored = {row.account_id: row for row in project({}, {}, events, []).accounts}
    again = project(stored, {}, events, [])
    assert again.entries == [] and again.accounts == []


def test_a_gap_in_an_accounts_sequence_stops_the_projection() -> None:
    events = [
        event for event in _scenario_events() if event.account_id == "alice" and type(event) is not CommandRejected
    ]
    with pytest.raises(CorruptLog, match="seq 3 follows 1"):
        project({}, {}, [events[0], events[2]], [])


def test_a_balance_that_does_not_follow_from_the_amount_stops_the_projection() -> None:
    events = [event for event in _scenario_events() if event.account_id == "alice"]
    forged = msgspec.structs.replace(events[1], balance="1000.00")
    with pytest.raises(CorruptLog):
        project({}, {}, [events[0], forged], [])


def _same_id_on_two_accounts():
    """T succeeds as a deposit on alice and fails as a withdrawal on bob; U is a transfer from bob
    refunded because carol is frozen, and alice has a request V of her own."""
    commands = [
        edge(OpenAccount, transaction_id="o1", account_id="alice", currency="USD"),
        edge(OpenAccount, transaction_id="o2", account_id="bob", currency="USD"),
        edge(OpenAccount, transaction_id="o3", account_id="carol", currency="USD"),
        edge(Deposit, transaction_id="T", account_id="alice", amount="10.00", currency="USD"),
        edge(Withdraw, transaction_id="T", account_id="bob", amount="10.00", currency="USD"),
        edge(Deposit, transaction_id="U", account_id="bob", amount="10.00", currency="USD"),
        edge(Deposit, transaction_id="U", account_id="carol", amount="1.00", currency="USD"),
        edge(Freeze, transaction_id="f", account_id="carol"),
        edge(Transfer, transaction_id="V", from_account="bob", to_account="carol", amount="2.00", currency="USD"),
        edge(Deposit, transaction_id="V", account_id="alice", amount="3.00", currency="USD"),
    ]
    log = decide(commands, partition_count=1)
    return [decode_event(record.value) for record in log.events[0]]


def test_one_transaction_id_on_two_accounts_is_two_requests_with_their_own_answers() -> None:
    changes = project({}, {}, _same_id_on_two_accounts(), [])
    statuses = {(row.account_id, row.transaction_id): (row.status, row.reason) for row in changes.transactions}
    assert statuses[("alice", "T")] == ("success", None)
    assert statuses[("bob", "T")] == ("failure", Reason.INSUFFICIENT_FUNDS)
    # A transfer refunded by a frozen receiver is the sender's failure, whatever the receiver did with V.
    assert statuses[("bob", "V")] == ("failure", Reason.ACCOUNT_FROZEN)
    assert statuses[("alice", "V")] == ("success", None)
    assert ("carol", "V") not in statuses  # the receiver's refusal of the leg answers no request of carol's


def test_a_v2_outcome_answers_the_request_of_the_account_it_names() -> None:
    from schemas.outcomes import Outcome

    outcome = Outcome(
        transaction_id="T",
        account_id="bob",
        actor="bob",
        status="failure",
        reason=Reason.INSUFFICIENT_FUNDS,
        digest="d",
    )
    [row] = project({}, {}, [], [outcome]).transactions
    assert (row.account_id, row.transaction_id, row.status, row.actor) == ("bob", "T", "failure", "bob")


# -- holds ---------------------------------------------------------------------------------


def _hold_scenario():
    """alice holds money for shop: h-part is captured in two parts (the second final), h-void voided,
    h-gone left to expire (1 ms: the next decision on the partition expires it), h-refused captured
    whole to a shop frozen meanwhile (refunded), h-open stays open."""
    capture = {"account_id": "alice"}
    commands = [
        edge(OpenAccount, transaction_id="o1", account_id="alice", currency="USD"),
        edge(OpenAccount, transaction_id="o2", account_id="shop", currency="USD", kind="merchant"),
        edge(OpenAccount, transaction_id="o3", account_id="frozen-shop", currency="USD"),
        edge(Deposit, transaction_id="d1", account_id="alice", amount="100.00", currency="USD"),
        _place("h-open", "shop", "7.00"),
        _place("h-part", "shop", "40.00"),
        edge(CaptureHold, transaction_id="c1", hold_id="h-part", amount="10.00", final=False, **capture),
        edge(CaptureHold, transaction_id="c2", hold_id="h-part", amount="5.00", **capture),
        _place("h-void", "shop", "20.00"),
        edge(VoidHold, transaction_id="v1", hold_id="h-void", **capture),
        _place("h-gone", "shop", "10.00", expires_in_ms=1),
        _place("h-refused", "frozen-shop", "6.00"),
        edge(Freeze, transaction_id="f1", account_id="frozen-shop"),
        edge(CaptureHold, transaction_id="c3", hold_id="h-refused", **capture),
        edge(CaptureHold, transaction_id="c4", hold_id="h-open", amount="7.01", **capture),
    ]
    log = decide(commands, partition_count=1)
    return [decode_event(record.value) for record in log.events[0]], [
        decode_outcome(record.value) for record in log.outcomes[0]
    ]


def _place(hold_id: str, to_account: str, amount: str, expires_in_ms: int = 600_000):
    return edge(
        PlaceHold,
        transaction_id=hold_id,
        account_id="alice",
        to_account=to_account,
        amount=amount,
        currency="USD",
        expires_in_ms=expires_in_ms,
    )


def test_holds_are_projected_from_their_events_with_what_each_captured_and_released() -> None:
    events, outcomes = _hold_scenario()
    changes = project({}, {}, events, outcomes)
    holds = {
        row.hold_id: (row.state, row.amount_minor, row.captured_minor, row.released_minor) for row in changes.holds
    }
    assert holds == {
        "h-part": ("captured", 4000, 1500, 2500),
        "h-void": ("voided", 2000, 0, 2000),
        "h-gone": ("expired", 1000, 0, 1000),
        # A refused capture is refunded to the balance; the hold it ended stays ended.
        "h-refused": ("captured", 600, 600, 0),
        "h-open": ("open", 700, 0, 0),
    }
    part = next(row for row in changes.holds if row.hold_id == "h-part")
    assert (part.account_id, part.to_account, part.currency) == ("alice", "shop", "USD")
    assert part.expires_ms == part.placed_ms + 600_000 and part.updated_ms > part.placed_ms
    accounts = {row.account_id: (row.balance_minor, row.held_minor) for row in changes.accounts}
    assert accounts == {"alice": (10_000 - 1500, 700), "shop": (1500, 0), "frozen-shop": (0, 0)}
    statuses = {
        row.transaction_id: (row.status, row.reason) for row in changes.transactions if row.account_id == "alice"
    }
    assert {tx: statuses[tx] for tx in ("h-part", "c1", "c2", "h-void", "v1", "h-gone", "c3", "c4")} == {
        "h-part": ("success", None),
        "c1": ("success", None),
        "c2": ("success", None),
        "h-void": ("success", None),
        "v1": ("success", None),
        "h-gone": ("success", None),  # placed; its expiry answers no request
        "c3": ("failure", Reason.ACCOUNT_FROZEN),
        "c4": ("failure", Reason.CAPTURE_EXCEEDS_HOLD),
    }
    alice = [(e.type, e.amount_minor, e.counterparty) for e in changes.entries if e.account_id == "alice"]
    assert ("hold_placed", 0, "shop") in alice and ("hold_captured", -1000, "shop") in alice
    assert ("hold_expired", 0, None) in alice and ("transfer_refunded", 600, "frozen-shop") in alice


def test_hold_events_already_stored_change_nothing() -> None:
    events, outcomes = _hold_scenario()
    first = project({}, {}, events, outcomes)
    stored_accounts = {row.account_id: row for row in first.accounts}
    stored_holds = {(row.account_id, row.hold_id): row for row in first.holds}
    again = project(stored_accounts, {}, events, [], holds=stored_holds)
    assert (again.entries, again.accounts, again.holds) == ([], [], [])


def test_a_hold_split_across_batches_projects_as_in_one() -> None:
    events, outcomes = _hold_scenario()
    whole = {(row.account_id, row.hold_id): row for row in project({}, {}, events, outcomes).holds}
    accounts: dict = {}
    holds: dict = {}
    for event in events:  # one event per batch, each batch starting from the stored rows
        changes = project(accounts, {}, [event], [], holds=holds)
        accounts.update({row.account_id: row for row in changes.accounts})
        holds.update({(row.account_id, row.hold_id): row for row in changes.holds})
    assert holds == whole


@pytest.mark.parametrize(
    ("forge", "match"),
    [
        # A final capture that releases more than its hold had left (h-open's money): the account's
        # held total follows, the hold's own amounts do not.
        (lambda event: msgspec.structs.replace(event, released="32.00", held="0.00"), "hold 'h-part'"),
        # An event of a hold the read model never saw placed.
        (lambda event: msgspec.structs.replace(event, hold_id="h-never"), "h-never"),
    ],
    ids=["released-beyond", "never-placed"],
)
def test_a_hold_event_that_does_not_follow_stops_the_projection(forge, match: str) -> None:
    events, _ = _hold_scenario()
    final_capture = next(
        i for i, event in enumerate(events) if type(event) is HoldCaptured and event.transaction_id == "c2"
    )
    forged = [*events[:final_capture], forge(events[final_capture])]
    with pytest.raises(CorruptLog, match=match):
        project({}, {}, forged, [])
