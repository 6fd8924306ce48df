"""The one gate every decider of `wallet.commands` passes records through (streams.core.admission).

The processor, the audit's replay and the reference pipeline all call it; these tests pin what
it lets through and what each refusal answers, so that none of them can refuse differently.
"""

from __future__ import annotations

import msgspec

from schemas.codec import encode
from schemas.commands import TICK_TRANSACTION_ID, Tick, owner_account
from schemas.leg_auth import LegKeyring
from schemas.outcomes import Reason
from schemas.partitioning import partition_for
from streams.core.admission import Refusal, admit, decide
from streams.core.state import State
from tests.test_machine_rules import TS_MS, debit_in_transit, deposit, ledger, transfer

PARTITIONS = 4
KEYRING = LegKeyring.parse("k1:" + "11" * 32)
OTHER_KEYRING = LegKeyring.parse("k1:" + "22" * 32)


def owner_partition(account: str) -> int:
    return partition_for(account, PARTITIONS)


def test_a_command_on_its_owners_partition_is_admitted_as_decoded() -> None:
    command = deposit("alice", "5.00")
    assert admit(encode(command), owner_partition("alice"), owner_partition, KEYRING) == command


def test_undecodable_bytes_are_refused_as_invalid_command_with_an_answer_when_the_request_is_readable() -> None:
    value = b'{"unknown_field":1,' + encode(deposit("alice", "5.00"))[1:]
    refusal = admit(value, owner_partition("alice"), owner_partition, KEYRING)
    assert isinstance(refusal, Refusal)
    assert refusal.outcome is not None
    assert (refusal.outcome.status, refusal.outcome.reason, refusal.outcome.account_id) == (
        "failure",
        Reason.INVALID_COMMAND,
        "alice",
    )
    garbage = admit(b"\xff not json", 0, owner_partition, KEYRING)
    assert isinstance(garbage, Refusal) and garbage.outcome is None


def test_a_record_whose_type_is_not_a_string_is_refused_not_a_crash() -> None:
    # Written straight to the topic: a JSON object or list as the type tag once raised
    # TypeError (unhashable) out of the readable-request lookup, a crash on every restart.
    body = encode(deposit("alice", "5.00"))[len(b'{"type":"deposit"') :]
    for tag in (b"{}", b"[]", b'{"a":1}', b"[1,2]", b"null", b"7", b"true"):
        refusal = admit(b'{"type":' + tag + body, owner_partition("alice"), owner_partition, KEYRING)
        assert isinstance(refusal, Refusal) and refusal.outcome is None, tag


def test_a_command_on_another_partition_is_refused_as_wrong_partition_and_answered() -> None:
    command = deposit("alice", "5.00")
    elsewhere = (owner_partition("alice") + 1) % PARTITIONS
    refusal = admit(encode(command), elsewhere, owner_partition, KEYRING)
    assert isinstance(refusal, Refusal)
    assert f"partition {elsewhere}" in refusal.reason
    assert refusal.outcome is not None
    assert (refusal.outcome.reason, refusal.outcome.transaction_id) == (Reason.WRONG_PARTITION, command.transaction_id)


def test_a_leg_is_admitted_only_with_the_processors_mac_and_a_forged_one_gets_no_answer() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    partition = owner_partition(owner_account(leg))
    assert admit(encode(KEYRING.sign(leg)), partition, owner_partition, KEYRING) == KEYRING.sign(leg)
    for forged in (leg, OTHER_KEYRING.sign(leg)):  # unsigned, and signed with another key
        refusal = admit(encode(forged), partition, owner_partition, KEYRING)
        assert isinstance(refusal, Refusal) and refusal.outcome is None


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
        assert isinstance(refusal, Refusal) and refusal.outcome is None, mac


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
        assert isinstance(refusal, Refusal) and refusal.outcome is None
        assert "does not verify" in refusal.reason


def test_what_the_core_cannot_decide_is_refused_and_leaves_the_state_untouched() -> None:
    state = ledger(("alice", "USD", "user", "10.00"), ("bob", "USD", "user", ""))
    leg = debit_in_transit(state, transfer("alice", "bob", "4.00", tx="t-1"))
    negative = msgspec.structs.replace(leg, amount="-4.00")
    bob = State()
    refusal = decide(bob, negative, TS_MS)
    assert isinstance(refusal, Refusal) and refusal.outcome is None
    assert (bob.accounts, bob.clock_ms) == ({}, 0)
    assert not isinstance(decide(state, deposit("alice", "1.00"), TS_MS), Refusal)


def test_a_tick_is_admitted_only_on_the_partition_it_names_and_a_misplaced_one_gets_no_answer() -> None:
    tick = Tick(transaction_id=TICK_TRANSACTION_ID, partition=2)
    assert admit(encode(tick), 2, owner_partition, KEYRING) == tick
    refusal = admit(encode(tick), 3, owner_partition, KEYRING)
    assert isinstance(refusal, Refusal) and refusal.outcome is None
    assert "tick of partition 2 arrived on partition 3" in refusal.reason
