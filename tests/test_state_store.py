"""The processor's RocksDB snapshot restores exactly the state it was written from."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.commands import CaptureHold, Deposit, OpenAccount, PlaceHold, Tick, Transfer, VoidHold
from schemas.events import HOLD_EVENTS
from streams.core.machine import apply
from streams.core.state import IDEMPOTENCY_EVICT_STEP_MS, IDEMPOTENCY_WINDOW_MS, State, memory_key
from streams.runtime.store import SNAPSHOT_FORMAT, Checkpoint, PartitionChanges, StateStore

MINUTE_MS = 60_000


def _decide(state: State, commands, changes: PartitionChanges, at_ms: int | None = None) -> None:
    """Decides each (record time, command), or each command at `at_ms`."""
    for item in commands:
        record_time_ms, command = (at_ms, item) if at_ms is not None else item
        for event in apply(state, command, record_time_ms).events:
            if hasattr(event, "seq"):
                changes.accounts.add(event.account_id)
            if isinstance(event, HOLD_EVENTS):
                changes.hold_keys.add((event.account_id, event.hold_id))
            changes.memory_keys.add(memory_key(event))


def _same(a: State, b: State) -> None:
    assert a.accounts == b.accounts
    assert a.memory == b.memory
    assert a.holds == b.holds
    assert a.clock_ms == b.clock_ms


def test_snapshot_written_in_several_flushes_restores_accounts_memory_and_clock_and_keeps_forgetting(tmp_path):
    store = StateStore(tmp_path / "store")
    state, checkpoint = State(), Checkpoint()
    opening = [
        (0, OpenAccount(transaction_id=f"open-{n}", actor=n, role="user", account_id=n, currency="USD")) for n in "ab"
    ]
    funding = [
        (1, Deposit(transaction_id="fund", actor="bank", role="bank", account_id="a", amount="100.00", currency="USD"))
    ]
    for _flush, commands in enumerate(
        [opening + funding]
        + [
            [
                (
                    flush * 10 * MINUTE_MS + i,
                    Transfer(
                        transaction_id=f"t{flush}-{i}",
                        actor="a",
                        role="user",
                        from_account="a",
                        to_account="b",
                        amount="0.01",
                        currency="USD",
                    ),
                )
                for i in range(50)
            ]
            for flush in range(1, 6)
        ]
    ):
        changes = PartitionChanges()
        _decide(state, commands, changes)
        checkpoint.events_offset += 100
        store.save(3, state, changes, checkpoint)
    restored, restored_checkpoint = store.load(3)
    _same(restored, state)
    assert restored_checkpoint.events_offset == checkpoint.events_offset == 600
    assert store.partitions() == [3]

    # Both move past the window: the restored state must forget exactly what the live one forgets.
    assert restored.accounts["a"].in_flight_count == 250  # pending debits (the credit legs are elsewhere)
    late = Deposit(transaction_id="late", actor="bank", role="bank", account_id="a", amount="1.00", currency="USD")
    apply(state, late, IDEMPOTENCY_WINDOW_MS + 25 * MINUTE_MS)
    apply(restored, late, IDEMPOTENCY_WINDOW_MS + 25 * MINUTE_MS)
    _same(restored, state)
    assert 0 < restored.accounts["a"].in_flight_count < 250
    assert 0 < len(state.memory) < 250, "some but not all of the transfers' ids are past the horizon"
    store.close()


def test_expired_segments_are_dropped_and_do_not_come_back(tmp_path):
    store = StateStore(tmp_path / "store")
    state, checkpoint = State(), Checkpoint()
    changes = PartitionChanges()
    _decide(
        state,
        [OpenAccount(transaction_id="open", actor="a", role="user", account_id="a", currency="USD")],
        changes,
        at_ms=0,
    )
    store.save(0, state, changes, checkpoint)
    changes = PartitionChanges()
    _decide(
        state,
        [
            Deposit(
                transaction_id="much-later", actor="bank", role="bank", account_id="a", amount="1.00", currency="USD"
            )
        ],
        changes,
        at_ms=2 * IDEMPOTENCY_WINDOW_MS,
    )
    store.save(0, state, changes, checkpoint)
    assert store.drop_expired_segments(0, state.clock_ms) == 1
    restored, _ = store.load(0)
    _same(restored, state)
    assert set(restored.memory) == {("a", "much-later", "")}
    store.close()


def test_a_pending_debit_forgotten_without_an_event_of_its_account_restores_as_forgotten(tmp_path):
    # Account a's debit is forgotten when b's deposit moves the clock past the window; a itself
    # is not written again, yet the restore must not count the forgotten debit in flight.
    store = StateStore(tmp_path / "store")
    state, checkpoint = State(), Checkpoint()
    changes = PartitionChanges()
    _decide(
        state,
        [OpenAccount(transaction_id=f"open-{n}", actor=n, role="user", account_id=n, currency="USD") for n in "ab"],
        changes,
        at_ms=0,
    )
    _decide(
        state,
        [
            Deposit(transaction_id="fund", actor="bank", role="bank", account_id="a", amount="1.00", currency="USD"),
            Transfer(
                transaction_id="t",
                actor="a",
                role="user",
                from_account="a",
                to_account="elsewhere",
                amount="1.00",
                currency="USD",
            ),
        ],
        changes,
        at_ms=0,
    )
    store.save(0, state, changes, checkpoint)
    restored, _ = store.load(0)
    assert restored.accounts == state.accounts and restored.accounts["a"].owner == "a"
    debit = restored.memory[("a", "t", "")]
    assert (debit.amount_minor, debit.to_account) == (100, "elsewhere")
    changes = PartitionChanges()
    _decide(
        state,
        [Deposit(transaction_id="later", actor="bank", role="bank", account_id="b", amount="1.00", currency="USD")],
        changes,
        at_ms=2 * IDEMPOTENCY_WINDOW_MS,
    )
    assert state.accounts["a"].in_flight_count == 0
    store.save(0, state, changes, checkpoint)
    restored, _ = store.load(0)
    _same(restored, state)
    store.close()


def _pair_commands() -> list:
    """Two accounts' worth of history: an account opened, funded, and a debit in flight."""
    return [
        OpenAccount(transaction_id="open-a", actor="a", role="user", account_id="a", currency="USD"),
        Deposit(transaction_id="fund", actor="bank", role="bank", account_id="a", amount="9.00", currency="USD"),
        Transfer(
            transaction_id="t",
            actor="a",
            role="user",
            from_account="a",
            to_account="b",
            amount="1.00",
            currency="USD",
        ),
    ]


def _saved_pair(tmp_path) -> tuple[StateStore, State]:
    """A store holding partition 0 with that history."""
    store = StateStore(tmp_path / "store")
    state, changes = State(), PartitionChanges()
    _decide(state, _pair_commands(), changes, at_ms=MINUTE_MS)
    store.save(0, state, changes, Checkpoint(events_offset=3))
    return store, state


@pytest.mark.parametrize(
    ("what", "key", "value"),
    [
        ("undecodable account", b"a/\x00\x00\x00\x00/a", b"\xc1 not msgpack"),
        ("account of the wrong shape", b"a/\x00\x00\x00\x00/a", msgspec.msgpack.encode(["USD", "user", "active"])),
        ("negative balance", b"a/\x00\x00\x00\x00/a", msgspec.msgpack.encode(["USD", "user", "active", -5, 2, "a"])),
        ("unknown status", b"a/\x00\x00\x00\x00/a", msgspec.msgpack.encode(["USD", "user", "gone", 800, 3, "a"])),
        (
            "checkpoint of the wrong types",
            b"o/\x00\x00\x00\x00",
            msgspec.msgpack.encode(["3", 0, 1, SNAPSHOT_FORMAT]),
        ),
        ("negative checkpoint offset", b"o/\x00\x00\x00\x00", msgspec.msgpack.encode([-1, 0, 1, SNAPSHOT_FORMAT])),
        ("undecodable memory segment", b"s/\x00\x00\x00\x00/" + b"\x00" * 16, b"\x92\x01"),
        (
            "pending debit of an unknown account",
            b"s/\x00\x00\x00\x00/" + b"\x00" * 7 + b"\x09" + b"\x00" * 8,
            msgspec.msgpack.encode([["zed", "t2", "", "d", "pending", None, MINUTE_MS, 100, "b", None]]),
        ),
        (
            "credit leg remembered as pending",
            b"s/\x00\x00\x00\x00/" + b"\x00" * 7 + b"\x09" + b"\x00" * 8,
            msgspec.msgpack.encode([["a", "t2", "b", "d", "pending", None, MINUTE_MS, 100, "b", None]]),
        ),
        (
            "hold of an unknown account",
            b"h/\x00\x00\x00\x00/" + msgspec.msgpack.encode(("zed", "h")),
            msgspec.msgpack.encode(["b", 100, 100, 0, 2 * MINUTE_MS, "d", "zed", MINUTE_MS, "open", None]),
        ),
        (
            "open hold that holds nothing",
            b"h/\x00\x00\x00\x00/" + msgspec.msgpack.encode(("a", "h")),
            msgspec.msgpack.encode(["b", 100, 0, 0, 2 * MINUTE_MS, "d", "a", MINUTE_MS, "open", None]),
        ),
        (
            "hold beyond the balance",
            b"h/\x00\x00\x00\x00/" + msgspec.msgpack.encode(("a", "h")),
            msgspec.msgpack.encode(["b", 900, 900, 0, 2 * MINUTE_MS, "d", "a", MINUTE_MS, "open", None]),
        ),
        (
            "hold of the wrong shape",
            b"h/\x00\x00\x00\x00/" + msgspec.msgpack.encode(("a", "h")),
            msgspec.msgpack.encode(["b", 100, 100]),
        ),
    ],
)
def test_a_corrupt_snapshot_is_ignored_and_the_partition_restores_from_the_log_alone(tmp_path, what, key, value):
    """The snapshot is a cache of the log read back from disk (a trust boundary): one that cannot
    be read, or holds a state no fold could reach, must not stop the processor nor seed its state."""
    store, _ = _saved_pair(tmp_path)
    store._db[key] = value  # what a torn write, a disk fault or a stray tool leaves
    restored, checkpoint = store.load(0)
    assert (restored.accounts, restored.memory, restored.clock_ms) == ({}, {}, 0), what
    assert checkpoint == Checkpoint(), what
    # The untrusted snapshot is gone: what the restore then saves is read back whole.
    assert store.partitions() == []
    rebuilt, changes = State(), PartitionChanges()
    _decide(rebuilt, _pair_commands(), changes, at_ms=MINUTE_MS)
    store.save(0, rebuilt, changes, Checkpoint(events_offset=3))
    again, _ = store.load(0)
    _same(again, rebuilt)
    store.close()


def test_an_intact_snapshot_still_restores_after_the_checks(tmp_path):
    store, state = _saved_pair(tmp_path)
    restored, checkpoint = store.load(0)
    _same(restored, state)
    assert checkpoint.events_offset == 3
    store.close()


def _hold_commands() -> list:
    """a holds money for b four times: one hold partly captured, one voided, one left to expire
    and one open for a week."""
    a: dict[str, Any] = {"actor": "a", "role": "user", "account_id": "a"}
    return [
        OpenAccount(transaction_id="open-a", actor="a", role="user", account_id="a", currency="USD"),
        Deposit(transaction_id="fund", actor="bank", role="bank", account_id="a", amount="9.00", currency="USD"),
        *(
            PlaceHold(**a, transaction_id=hold_id, to_account="b", amount="1.00", currency="USD", expires_in_ms=expiry)
            for hold_id, expiry in (("h-c", MINUTE_MS), ("h-v", MINUTE_MS), ("h-e", MINUTE_MS), ("h-o", 7 * 86_400_000))
        ),
        CaptureHold(**a, transaction_id="c", hold_id="h-c", amount="0.40", final=False),
        VoidHold(**a, transaction_id="v", hold_id="h-v"),
    ]


def test_holds_open_and_ended_restore_with_the_held_totals_and_expire_alike(tmp_path):
    store = StateStore(tmp_path / "store")
    state, changes = State(), PartitionChanges()
    _decide(state, _hold_commands(), changes, at_ms=MINUTE_MS)
    store.save(0, state, changes, Checkpoint(events_offset=8))
    restored, _ = store.load(0)
    _same(restored, state)
    assert (restored.accounts["a"].held_minor, restored.accounts["a"].in_flight_minor) == (60 + 100 + 100, 40)
    # The restored deadlines expire the same holds, in the same order, as the live ones.
    tick = Tick(transaction_id="tick", partition=0)
    live_expired = apply(state, tick, 2 * MINUTE_MS).events
    assert [event.transaction_id for event in live_expired] == ["h-c", "h-e"]
    assert apply(restored, tick, 2 * MINUTE_MS).events == live_expired
    _same(restored, state)
    store.close()


def test_ended_holds_are_forgotten_a_window_after_their_end_and_dropped_from_the_store(tmp_path):
    store = StateStore(tmp_path / "store")
    state, changes = State(), PartitionChanges()
    _decide(state, _hold_commands(), changes, at_ms=MINUTE_MS)
    checkpoint = Checkpoint(events_offset=8)
    store.save(0, state, changes, checkpoint)
    later_ms = MINUTE_MS + IDEMPOTENCY_WINDOW_MS + 2 * IDEMPOTENCY_EVICT_STEP_MS
    changes = PartitionChanges()
    _decide(
        state,
        [Deposit(transaction_id="late", actor="bank", role="bank", account_id="a", amount="1.00", currency="USD")],
        changes,
        at_ms=later_ms,
    )
    # The void a window ago is forgotten; h-c and h-e expired only now (the deposit's decision
    # time expires them first), and the week-long hold is still open.
    assert {key[1]: hold.status for key, hold in state.holds.items()} == {
        "h-c": "expired",
        "h-e": "expired",
        "h-o": "open",
    }
    checkpoint.events_offset += 3  # the expiries of h-c and h-e and the deposit
    store.save(0, state, changes, checkpoint)
    restored, _ = store.load(0)
    _same(restored, state)  # the voided hold, still in the store, is not loaded
    assert store.drop_forgotten_holds(0, state.clock_ms) == 1
    assert store.drop_forgotten_holds(0, state.clock_ms) == 0
    restored, _ = store.load(0)
    _same(restored, state)
    store.close()
