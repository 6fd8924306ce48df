"""The processor's RocksDB snapshot restores exactly the state it was written from."""
from __future__ import annotations

from schemas.commands import Deposit, OpenAccount, Transfer
from streams.core.machine import apply
from streams.core.state import IDEMPOTENCY_WINDOW_MS, State
from streams.runtime.store import Checkpoint, PartitionChanges, StateStore

MINUTE_MS = 60_000


def _decide(state: State, commands, changes: PartitionChanges) -> None:
    for command in commands:
        for event in apply(state, command).events:
            if hasattr(event, "seq"):
                changes.accounts.add(event.account_id)
            changes.memory_keys.add((event.account_id, event.transaction_id))


def _same(a: State, b: State) -> None:
    assert a.accounts == b.accounts
    assert a.memory == b.memory
    assert a.clock_ms == b.clock_ms


def test_snapshot_written_in_several_flushes_restores_accounts_memory_and_clock_and_keeps_forgetting(tmp_path):
    store = StateStore(tmp_path / "store")
    state, checkpoint = State(), Checkpoint()
    opening = [OpenAccount(transaction_id=f"open-{n}", ts_ms=0, account_id=n, currency="USD") for n in "ab"]
    funding = [Deposit(transaction_id="fund", ts_ms=1, account_id="a", amount="100.00", currency="USD")]
    for flush, commands in enumerate([opening + funding] + [
        [Transfer(transaction_id=f"t{flush}-{i}", ts_ms=flush * 10 * MINUTE_MS + i, from_account="a", to_account="b",
                  amount="0.01", currency="USD") for i in range(50)] for flush in range(1, 6)
    ]):
        changes = PartitionChanges()
        _decide(state, commands, changes)
        checkpoint.events_offset += 100
        store.save(3, state, changes, checkpoint)
    restored, restored_checkpoint = store.load(3)
    _same(restored, state)
    assert restored_checkpoint.events_offset == checkpoint.events_offset == 600
    assert store.partitions() == [3]

    # Both move past the window: the restored state must forget exactly what the live one forgets.
    late = Deposit(transaction_id="late", ts_ms=IDEMPOTENCY_WINDOW_MS + 25 * MINUTE_MS, account_id="a", amount="1.00",
                   currency="USD")
    apply(state, late)
    apply(restored, late)
    _same(restored, state)
    assert 0 < len(state.memory) < 250, "some but not all of the transfers' ids are past the horizon"
    store.close()


def test_expired_segments_are_dropped_and_do_not_come_back(tmp_path):
    store = StateStore(tmp_path / "store")
    state, checkpoint = State(), Checkpoint()
    changes = PartitionChanges()
    _decide(state, [OpenAccount(transaction_id="open", ts_ms=0, account_id="a", currency="USD")], changes)
    store.save(0, state, changes, checkpoint)
    changes = PartitionChanges()
    _decide(state, [Deposit(transaction_id="much-later", ts_ms=2 * IDEMPOTENCY_WINDOW_MS, account_id="a",
                            amount="1.00", currency="USD")], changes)
    store.save(0, state, changes, checkpoint)
    assert store.drop_expired_segments(0, state.clock_ms) == 1
    restored, _ = store.load(0)
    _same(restored, state)
    assert set(restored.memory) == {("a", "much-later")}
    store.close()
