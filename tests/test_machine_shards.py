"""The rules of sharded merchants: opening the shards, paying a shard, refusing forged shards.

One partition's `State` carries every leg by hand (`settle`), as in test_machine_rules; the
cross-partition path is the saga driver's, in test_machine_properties.
"""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from schemas.commands import (
    SHARDS_MAX,
    OpenAccount,
    OpenShard,
    PayMerchant,
    merchant_of_shard,
    shard_account_id,
    shard_index,
)
from schemas.events import AccountOpened, TransferCredited, TransferDebited
from schemas.outcomes import Reason
from streams.core.errors import UndecidableInput
from streams.core.state import CorruptLog, State, fold
from tests.test_machine_rules import (
    TS_MS,
    apply,
    assert_rejected,
    balance,
    deposit,
    new_tx,
    outcomes_of,
    settle,
    succeed,
    transfer,
    withdraw,
)


def open_sharded(account_id: str, shards: int, kind: str = "merchant", *, tx: str | None = None) -> OpenAccount:
    return OpenAccount(
        transaction_id=tx or new_tx(),
        actor="shop-owner",
        role="user",
        account_id=account_id,
        currency="USD",
        kind=kind,  # type: ignore[arg-type]  # a test also tries a user with shards
        shards=shards,
    )


def pay(from_account: str, to_account: str, amount: str, to_shards: int, *, tx: str | None = None) -> PayMerchant:
    return PayMerchant(
        transaction_id=tx or new_tx(),
        actor=from_account,
        role="user",
        from_account=from_account,
        to_account=to_account,
        amount=amount,
        currency="USD",
        to_shards=to_shards,
    )


def sharded_ledger(shards: int = 4) -> State:
    """One partition with payers p0..p9 holding 100.00 each and merchant `shop` of `shards` shards."""
    state = State()
    settle(state, open_sharded("shop", shards))
    for index in range(10):
        succeed(
            state,
            OpenAccount(
                transaction_id=new_tx(), actor=f"p{index}", role="user", account_id=f"p{index}", currency="USD"
            ),
        )
        succeed(state, deposit(f"p{index}", "100.00"))
    return state


def test_a_sharded_open_opens_the_merchant_and_asks_for_each_other_shard_by_a_leg() -> None:
    state = State()
    command = open_sharded("shop", 3)
    decision = apply(state, command)
    assert decision.outcome is not None and decision.outcome.status == "success"
    [opened] = decision.events
    assert isinstance(opened, AccountOpened) and (opened.shards, opened.shard_of) == (3, None)
    legs = [leg for leg in decision.follow_ups if isinstance(leg, OpenShard)]
    assert len(legs) == len(decision.follow_ups)
    assert [(leg.account_id, leg.shard_index, leg.owner) for leg in legs] == [
        ("shop::s1", 1, "shop-owner"),
        ("shop::s2", 2, "shop-owner"),
    ]
    for leg in legs:
        shard = apply(state, leg)
        [event] = shard.events
        assert isinstance(event, AccountOpened)
        assert (event.account_id, event.owner, event.kind, event.shard_of, event.shards) == (
            leg.account_id,
            "shop-owner",
            "merchant",
            "shop",
            3,
        )
        assert shard.outcome is None and shard.follow_ups == []  # the open answered already
        assert apply(state, leg).events == []  # a copy of the leg opens nothing twice
    # A retry of the open gets its answer and asks for no shard again.
    retry = apply(state, command)
    assert retry.follow_ups == [] and retry.outcome == decision.outcome


def test_an_unsharded_open_behaves_as_before() -> None:
    decision = apply(State(), open_sharded("shop", 1))
    assert decision.follow_ups == []
    [event] = decision.events
    assert isinstance(event, AccountOpened) and (event.shards, event.shard_of) == (1, None)


@pytest.mark.parametrize(
    ("account_id", "shards", "kind", "reason"),
    [
        ("shop::s1", 1, "merchant", Reason.RESERVED_ACCOUNT_ID),  # a derived id, opened by hand
        ("alice::x", 1, "user", Reason.RESERVED_ACCOUNT_ID),
        ("shop", 0, "merchant", Reason.INVALID_SHARDS),
        ("shop", SHARDS_MAX + 1, "merchant", Reason.INVALID_SHARDS),
        ("alice", 2, "user", Reason.INVALID_SHARDS),  # only merchants are sharded
        ("m" * 61, 2, "merchant", Reason.INVALID_SHARDS),  # m..m::s1 would pass 64 characters
    ],
)
def test_open_refusals_of_sharded_and_derived_ids(account_id: str, shards: int, kind: str, reason: str) -> None:
    command = open_sharded(account_id, shards, kind)
    decision = apply(State(), command)
    assert_rejected(decision, command, reason)


def test_payments_spread_over_the_shards_by_transaction_id_and_the_total_is_conserved() -> None:
    state = sharded_ledger(4)
    shards = [shard_account_id("shop", index) for index in range(4)]
    counts: Counter[str] = Counter()
    for number in range(200):
        command = pay(f"p{number % 10}", "shop", "0.50", 4, tx=f"pay-{number}")
        decisions = settle(state, command)
        debit = decisions[0].events[0]
        assert isinstance(debit, TransferDebited)
        assert debit.to_account == shards[shard_index(command.transaction_id, 4)]  # replayable: the id decides
        [credit] = [event for decision in decisions for event in decision.events if isinstance(event, TransferCredited)]
        counts[credit.account_id] += 1
        assert [o.status for o in outcomes_of(decisions)] == ["success"]
    assert set(counts) == set(shards) and min(counts.values()) > 20  # every shard takes a share
    assert sum(balance(state, shard) for shard in shards) == 200 * 50
    assert sum(balance(state, f"p{index}") for index in range(10)) == 10 * 10_000 - 200 * 50


def test_a_stated_shard_count_too_large_reaches_a_missing_shard_and_refunds_the_payer() -> None:
    state = sharded_ledger(2)
    # A transaction id whose pick among 8 is a shard that does not exist.
    tx = next(f"over-{n}" for n in range(100) if shard_index(f"over-{n}", 8) >= 2)
    outcomes = outcomes_of(settle(state, pay("p0", "shop", "5.00", 8, tx=tx)))
    assert [(o.status, o.reason) for o in outcomes] == [("failure", Reason.ACCOUNT_NOT_FOUND)]
    assert balance(state, "p0") == 10_000


@pytest.mark.parametrize("to_shards", [0, SHARDS_MAX + 1])
def test_an_invalid_stated_shard_count_is_refused_before_any_debit(to_shards: int) -> None:
    state = sharded_ledger(2)
    command = pay("p0", "shop", "5.00", to_shards)
    assert_rejected(apply(state, command), command, Reason.INVALID_SHARDS)


def test_a_shard_count_on_a_derived_id_is_refused_and_a_plain_payment_to_a_shard_is_a_payment() -> None:
    state = sharded_ledger(2)
    command = pay("p0", "shop::s1", "5.00", 2)
    assert_rejected(apply(state, command), command, Reason.INVALID_SHARDS)
    outcomes = outcomes_of(settle(state, pay("p0", "shop::s1", "5.00", 1)))
    assert [o.status for o in outcomes] == ["success"] and balance(state, "shop::s1") == 500


def test_only_the_owner_pays_out_of_a_shard() -> None:
    state = sharded_ledger(2)
    settle(state, pay("p0", "shop::s1", "5.00", 1))
    stranger = transfer("shop::s1", "p1", "1.00", actor="p0")
    assert_rejected(apply(state, stranger), stranger, Reason.NOT_AUTHORIZED)
    succeed(state, withdraw("shop::s1", "2.00", actor="shop-owner", role="user"))
    outcomes = outcomes_of(settle(state, transfer("shop::s1", "p1", "3.00", actor="shop-owner")))
    assert [o.status for o in outcomes] == ["success"] and balance(state, "shop::s1") == 0


def genuine_shard_leg(**changes: object) -> OpenShard:
    leg = OpenShard(
        transaction_id="open-shop",
        actor="shop-owner",
        issued_ms=TS_MS,
        account_id="shop::s1",
        merchant_account="shop",
        shard_index=1,
        shards=2,
        owner="shop-owner",
        currency="USD",
        digest="d",
    )
    return msgspec.structs.replace(leg, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"account_id": "alice"},  # not a derived id at all
        {"account_id": "shop::s2"},  # another shard than it says
        {"shard_index": 2},  # an index beyond the shard count
        {"merchant_account": "a::b", "account_id": "a::b::s1"},  # of a reserved merchant id
        {"currency": "XXX"},
    ],
)
def test_an_open_shard_leg_that_is_not_a_derived_shard_is_undecidable_and_folds_nothing(changes: dict) -> None:
    state = State()
    with pytest.raises(UndecidableInput):
        apply(state, genuine_shard_leg(**changes))
    assert state.accounts == {} and state.memory == {}


def test_an_open_shard_leg_for_another_owner_of_an_open_shard_is_undecidable() -> None:
    state = State()
    apply(state, genuine_shard_leg())
    with pytest.raises(UndecidableInput):
        apply(state, genuine_shard_leg(owner="mallory", transaction_id="forged"))
    assert state.accounts["shop::s1"].owner == "shop-owner"


def test_fold_refuses_a_shard_opening_under_an_id_that_is_not_derived() -> None:
    forged = AccountOpened(
        account_id="alice",
        transaction_id="t",
        ts_ms=TS_MS,
        command="open_shard",
        digest="d",
        actor="mallory",
        seq=1,
        owner="mallory",
        currency="USD",
        kind="merchant",
        balance="0.00",
        shards=2,
        shard_of="shop",
    )
    with pytest.raises(CorruptLog):
        fold(State(), forged)


def test_derived_ids_map_back_to_their_merchant_only() -> None:
    assert merchant_of_shard("shop::s7") == "shop"
    assert merchant_of_shard("x:::s1") == "x:"
    for not_derived in ("shop", "shop::s0", "shop::s07", "shop::s64", "shop::sx", "::s1", "a::b::s1"):
        assert merchant_of_shard(not_derived) is None, not_derived
