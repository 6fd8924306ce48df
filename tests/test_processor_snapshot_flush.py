"""The snapshot flush runs off the processor's loop, on a real broker: a stalled disk does not stop
the loop from deciding and committing, a stop waits for the write in flight and leaves a snapshot
that covers every committed event, and a failed write crashes the processor."""

from __future__ import annotations

import threading
import time

import pytest

from schemas.commands import Deposit, OpenAccount, Transfer
from streams.cli import state_dump
from streams.runtime.processor import Processor, ProcessorConfig
from streams.runtime.snapshot_writer import SnapshotWriteFailed
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic, wait_for
from tests.test_processor_faults import check_ledger

ACCOUNTS = 20
STALL_TIMEOUT_S = 300.0  # a stalled write is released by the test, or fails after this long
DRAIN_TIMEOUT_S = 120.0


class _Disk:
    """The store's RocksDB with its writes intercepted (rocksdict's methods cannot be patched)."""

    def __init__(self, db, write) -> None:
        self._db = db
        self.write = write

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def _funding() -> list:
    commands = []
    for i in range(ACCOUNTS):
        account = f"acct-{i:02d}"
        commands.append(edge(OpenAccount, transaction_id=f"open-{account}", account_id=account, currency="USD"))
        commands.append(
            edge(Deposit, transaction_id=f"fund-{account}", account_id=account, amount="50.00", currency="USD")
        )
    return commands


def _transfers(count: int) -> list:
    return [
        edge(
            Transfer,
            transaction_id=f"tx-{i}",
            from_account=f"acct-{i % ACCOUNTS:02d}",
            to_account=f"acct-{(i * 7 + 3) % ACCOUNTS:02d}",
            amount="0.25",
            currency="USD",
        )
        for i in range(count)
    ]


def _processor(settings, instance_id: str) -> Processor:
    return Processor(
        settings,
        ProcessorConfig(
            instance_id=instance_id,
            store_path=settings.run_dir / instance_id,
            batch_size_max=50,
            state_flush_interval_ms=100,
        ),
    )


def test_a_stalled_snapshot_write_does_not_stop_the_loop_and_a_stop_waits_for_it(make_settings):
    settings = make_settings(2)
    funding, transfers = _funding(), _transfers(200)
    processor = _processor(settings, "stalled-disk")
    store = processor._store
    db = store._db
    stalled, release = threading.Event(), threading.Event()

    def stalled_write(batch) -> None:
        stalled.set()
        if not release.wait(STALL_TIMEOUT_S):
            raise AssertionError("the stalled snapshot write was never released")
        db.write(batch)

    store._db = _Disk(db, stalled_write)
    answered_while_stalled: list[bool] = []

    def drive() -> None:
        outcomes = OutcomeCollector(settings)
        try:
            publish(command_producer(settings), settings, funding)
            outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
            # The funding committed: the next flush writes it, and that write stalls.
            wait_for(stalled.is_set, DRAIN_TIMEOUT_S, "the first snapshot write")
            publish(command_producer(settings), settings, transfers)
            try:
                outcomes.wait_all([t.transaction_id for t in transfers], timeout_s=DRAIN_TIMEOUT_S)
            finally:
                answered_while_stalled.append(not release.is_set())
                processor.stop()  # still stalled: the stop must wait for the write in flight
                time.sleep(0.5)
                release.set()
        finally:
            outcomes.close()

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    processor.run()
    driver.join(timeout=DRAIN_TIMEOUT_S)
    assert answered_while_stalled == [True], "the loop stood still while the snapshot was written"

    # A clean stop leaves a snapshot that covers every committed event, and equals their fold.
    dump = state_dump(settings.run_dir / "stalled-disk")
    check_ledger(settings, funding + transfers, [dump])
    next_event = {}
    for record in read_topic(settings, settings.events_topic):
        next_event[record.partition] = record.offset + 1
    assert {int(p): part["events_offset"] for p, part in dump["partitions"].items()} == next_event


def test_a_failed_snapshot_write_crashes_the_processor(make_settings):
    settings = make_settings(2)
    funding = _funding()
    processor = _processor(settings, "broken-disk")
    store = processor._store

    def failing_write(batch) -> None:
        raise OSError("injected: the disk under the state store is gone")

    store._db = _Disk(store._db, failing_write)

    def drive() -> None:
        outcomes = OutcomeCollector(settings)
        try:
            publish(command_producer(settings), settings, funding)
            outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
        finally:
            outcomes.close()
            # Bounds the test on a processor that swallowed the failure.
            time.sleep(10)
            processor.stop()

    threading.Thread(target=drive, daemon=True).start()
    with pytest.raises(SnapshotWriteFailed, match="injected: the disk"):
        processor.run()
