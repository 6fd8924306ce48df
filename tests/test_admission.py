"""The one gate every decider of `wallet.commands` passes records through (streams.core.admission).

The processor, the audit's replay and the reference pipeline all call it; these tests pin what
it lets through and what each refusal answers, so that none of them can refuse differently.
"""

from __future__ import annotations

import copy

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.commands import TICK_TRANSACTION_ID, CreditLeg, Tick, owner_account
from schemas.events import CommandRejected, TransferCredited, TransferDebited, TransferRefunded
from schemas.leg_auth import LegKeyring
from schemas.partitioning import partition_for
from streams.core.admission import Forward, Refusal, admit, decide
from streams.core.machine import Decision
from streams.core.state import State
from tests.test_machine_rules import (
    TS_MS,
    close,
    debit_in_transit,
    deposit,
    freeze,
    ledger,
    outcomes_of,
    settle,
    snapshot,
    succeed,
    transfer,
)

PARTITIONS = 4
KEYRING = LegKeyring.parse("k1:" + "11" * 32)
OTHER_KEYRING = LegKeyring.parse("k1:" + "22" * 32)


def owner_partition(account: str) -> int:
    return partition_for(account, PARTITIONS)


def test_a_command_on_its_owners_partition_is_admitted_as_decoded() -> None:
    command = deposit("alice", "5.00")
    assert admit(encode(command), owner_partition("alice"), owner_partition, KEYRING) == command


def test_undecodable_bytes_are_refused_and_never_answered_even_when_they_name_a_request() -> None:
    # An answer under the transaction id such bytes claim would be a second, contradicting
    # answer to the real request of that id.
    value = b'{"unknown_field":1,' + encode(deposit("alice", "5.00"))[1:]
    refusal = admit(value, owner_partition("alice"), owner_partition, KEYRING)
    assert isinstance(refusal, Refusal) and refusal.forward_to is None
    assert "not a valid command" in refusal.reason
    assert refusal._fields == ("reason", "forward_to")  # nothing a refusal could answer with
    garbage = admit(b"\xff not json", 0, owner_partition, KEYRING)
    assert isinstance(garbage, Refusal) and garbage.forward_to is None


HOSTILE_VALUES = {
    "invalid UTF-8 in a string": b'{"type":"transfer","transaction_id":"\xff\xfe"}',
    "invalid UTF-8 in a key": b'{"type":"deposit","\xff":1}',
    "a tombstone": None,
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in a command": b'{"type":"transfer","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_VALUES))
def test_a_hostile_value_is_refused_not_raised(name: str) -> None:
    # Each once raised out of the gate: the processor stopped on it at every restart, and the
    # audit crashed on it.
    refusal = admit(HOSTILE_VALUES[name], owner_partition("alice"), owner_partition, KEYRING)
    assert isinstance(refusal, Refusal) and refusal.forward_to is None, refusal


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), junk=st.binary(min_size=1, max_size=8))
def test_any_bytes_spliced_into_a_command_are_admitted_or_refused_never_raised(position: int, junk: bytes) -> None:
    record = encode(transfer("alice", "bob", "4.00", tx="t-1"))
    cut = position % (len(record) + 1)
    admitted = admit(record[:cut] + junk + record[cut:], owner_partition("alice"), owner_partition, KEYRING)
    assert isinstance(admitted, (Refusal, msgspec.Struct))


def test_a_record_whose_type_is_not_a_string_is_refused_not_a_crash() -> None:
    # Written straight to the topic: a JSON object or list as the type tag once raised
    # TypeError (unhashable) out of the readable-request lookup, a crash on every restart.
    body = encode(deposit("alice", "5.00"))[len(b'{"type":"deposit"') :]
    for tag in (b"{}", b"[]", b'{"a":1}', b"[1,2]", b"null", b"7", b"true"):
        refusal = admit(b'{"type":' + tag + body, owner_partition("alice"), owner_partition, KEYRING)
        assert isinstance(refusal, Refusal) and refusal.forward_to is None, tag


def test_a_client_command_on_another_partition_is_forwarded_unanswered_to_its_owners() -> None:
    # A copy of a transfer on another partition once got a `failure` answer there while its
    # own partition moved the money: two final answers to one request.
    command = deposit("alice", "5.00")
    elsewhere = (owner_partition("alice") + 1) % PARTITIONS
    refusal = admit(encode(command), elsewhere, owner_partition, KEYRING)
    assert isinstance(refusal, Refusal)
    assert f"partition {elsewhere}" in refusal.reason
    assert refusal.forward_to == Forward(owner_partition("alice"), "alice")
    assert admit(encode(command), refusal.forward_to.partition, owner_partition, KEYRING) == command


def test_a_leg_on_another_partition_is_refused_and_not_forwarded() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = KEYRING.sign(debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1")))
    elsewhere = (owner_partition(owner_account(leg)) + 1) % PARTITIONS
    refusal = admit(encode(leg), elsewhere, owner_partition, KEYRING)
    assert isinstance(refusal, Refusal) and refusal.forward_to is None


def test_a_leg_is_admitted_only_with_the_processors_mac_and_a_forged_one_gets_no_answer() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    partition = owner_partition(owner_account(leg))
    assert admit(encode(KEYRING.sign(leg)), partition, owner_partition, KEYRING) == KEYRING.sign(leg)
    for forged in (leg, OTHER_KEYRING.sign(leg)):  # unsigned, and signed with another key
        refusal = admit(encode(forged), partition, owner_partition, KEYRING)
        assert isinstance(refusal, Refusal) and refusal.forward_to is None


def test_a_leg_whose_mac_is_not_hex_is_refused_not_a_crash() -> None:
    # A record written straight to the topic: a non-ASCII MAC once raised TypeError out of
    # hmac.compare_digest, a bug's crash, so the processor restarted on the same record forever.
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    partition = owner_partition(owner_account(leg))
    genuine_mac = KEYRING.sign(leg).mac
    for mac in ("é" * 32, "\u0000" * 4, genuine_mac.upper(), genuine_mac + "00", '"' + genuine_mac[1:]):
        forged = msgspec.structs.replace(leg, kid=KEYRING.signing_kid, mac=mac)
        refusal = admit(encode(forged), partition, owner_partition, KEYRING)
        assert isinstance(refusal, Refusal) and refusal.forward_to is None, mac


def test_a_genuine_leg_is_admitted_only_in_the_bytes_its_processor_wrote() -> None:
    # The MAC covers the record's own bytes: the same fields in another order or spacing
    # (equal once decoded) are not what a processor wrote, and are refused.
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    partition = owner_partition(owner_account(leg))
    record = KEYRING.signed_record(leg)
    assert record == encode(KEYRING.sign(leg))  # one signature, whichever way it is asked for
    assert admit(record, partition, owner_partition, KEYRING) == KEYRING.sign(leg)
    spaced = record.replace(b'","', b'", "')
    reordered = msgspec.json.encode(dict(reversed(list(msgspec.json.decode(record).items()))))
    for variant in (spaced, reordered):
        assert msgspec.json.decode(variant) == msgspec.json.decode(record)
        refusal = admit(variant, partition, owner_partition, KEYRING)
        assert isinstance(refusal, Refusal) and refusal.forward_to is None
        assert "does not verify" in refusal.reason


def test_what_the_core_cannot_decide_is_refused_and_leaves_the_state_untouched() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    negative = msgspec.structs.replace(leg, amount="-4.00")
    bob = State()
    refusal = decide(bob, negative, TS_MS, owner_partition("bob"), owner_partition)
    assert isinstance(refusal, Refusal) and refusal.forward_to is None
    assert (bob.accounts, bob.clock_ms) == ({}, 0)
    assert not isinstance(
        decide(state, deposit("alice", "1.00"), TS_MS, owner_partition("alice"), owner_partition), Refusal
    )


def test_a_tick_is_admitted_only_on_the_partition_it_names_and_a_misplaced_one_gets_no_answer() -> None:
    tick = Tick(transaction_id=TICK_TRANSACTION_ID, partition=2)
    assert admit(encode(tick), 2, owner_partition, KEYRING) == tick
    refusal = admit(encode(tick), 3, owner_partition, KEYRING)
    assert isinstance(refusal, Refusal) and refusal.forward_to is None
    assert "tick of partition 2 arrived on partition 3" in refusal.reason


# bob and carol share a partition of PARTITIONS; alice has another one.
SAME_PARTITION = ("bob", "carol")


def _decided(state: State, command) -> Decision:
    decision = decide(state, command, TS_MS, owner_partition(owner_account(command)), owner_partition)
    assert not isinstance(decision, Refusal), decision
    return decision


def _two_ledgers(receiver_currency: str = "USD") -> tuple[State, State]:
    """The same partition twice: bob with 10.00 USD and carol, for deciding one way and the other."""
    sender, receiver = SAME_PARTITION
    assert owner_partition(sender) == owner_partition(receiver) != owner_partition("alice")
    state = ledger((sender, "USD", "user", "10.00"), (receiver, receiver_currency, "user", ""))
    return state, copy.deepcopy(state)


@pytest.mark.parametrize(
    ("receiver_currency", "before", "expected_kinds", "status"),
    [
        ("USD", None, [TransferDebited, TransferCredited], "success"),
        ("EUR", None, [TransferDebited, CommandRejected, TransferRefunded], "failure"),
        ("USD", freeze, [TransferDebited, CommandRejected, TransferRefunded], "failure"),
        ("USD", close, [TransferDebited, CommandRejected, TransferRefunded], "failure"),
    ],
    ids=["credited", "wrong-currency-refunded", "frozen-refunded", "closed-refunded"],
)
def test_a_transfer_within_one_partition_settles_in_one_decision_as_its_legs_would(
    receiver_currency, before, expected_kinds, status
) -> None:
    in_place, through_kafka = _two_ledgers(receiver_currency)
    if before is not None:
        for state in (in_place, through_kafka):
            succeed(state, before("carol", tx="before"))
    command = transfer("bob", "carol", "4.00", tx="t-1")

    decision = _decided(in_place, command)
    legs_delivered = settle(through_kafka, command)  # each leg decided as the next record of the partition

    assert [type(event) for event in decision.events] == expected_kinds
    assert decision.follow_ups == []  # nothing is written to wallet.commands
    assert decision.outcome is not None and decision.outcome.status == status
    assert [encode(event) for event in decision.events] == [
        encode(event) for step in legs_delivered for event in step.events
    ]
    assert [decision.outcome] == outcomes_of(legs_delivered)
    assert snapshot(in_place) == snapshot(through_kafka)


def test_a_transfer_to_another_partition_still_sends_its_credit_leg_and_waits_for_it() -> None:
    state = ledger(("bob", "USD", "user", "10.00"), ("alice", "USD", "user", ""))
    decision = _decided(state, transfer("bob", "alice", "4.00", tx="t-1"))
    assert [type(event) for event in decision.events] == [TransferDebited]
    [leg] = decision.follow_ups
    assert type(leg) is CreditLeg and leg.to_account == "alice"
    assert decision.outcome is None
    assert state.accounts["bob"].in_flight_count == 1


def test_a_repeated_transfer_within_one_partition_gets_its_answer_again_and_moves_nothing() -> None:
    state, _ = _two_ledgers()
    command = transfer("bob", "carol", "4.00", tx="t-1")
    first = _decided(state, command)
    balances = snapshot(state)
    again = _decided(state, command)
    assert again.events == [] and again.follow_ups == []
    assert again.outcome == first.outcome
    assert snapshot(state) == balances
