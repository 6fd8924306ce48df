"""Restore reads everything the previous owner committed, on a real broker (issue 12, item 11).

The previous owner's last commit writes its transaction markers to `__consumer_offsets` and to
`wallet.events` separately, and `Consumer.committed()` waits only for the first. These tests
hold a transaction open on an events partition, the state a restore can meet between those
two writes, and show what a read_committed read does then and what the restore does.
"""

from __future__ import annotations

import ast
import random
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer

from infra.admin import admin_client
from infra.kafka_clients import kafka_security, restore_consumer_config
from schemas.codec import encode
from schemas.commands import OpenAccount
from schemas.partitioning import KAFKA_PARTITIONER
from streams.cli import state_dump
from streams.core.machine import apply
from streams.core.state import State
from streams.runtime.restore import fold_event_tail, stable_ends
from tests.support.commands import edge

OPEN_TRANSACTION_HELD_S = 1.5
TIMEOUT_S = 30


def _opening_events(account_id: str) -> list[bytes]:
    decision = apply(
        State(), edge(OpenAccount, transaction_id=f"open-{account_id}", account_id=account_id, currency="USD"), 1
    )
    return [encode(event) for event in decision.events]


def _open_transaction(settings, account_id: str) -> Producer:
    """A transactional producer whose records on events partition 0 are written but not committed."""
    producer = Producer(
        {
            **kafka_security("admin"),
            "bootstrap.servers": settings.bootstrap,
            "partitioner": KAFKA_PARTITIONER,
            "transactional.id": f"{settings.topic_prefix}previous-owner-{uuid.uuid4().hex[:6]}",
        }
    )
    producer.init_transactions(TIMEOUT_S)
    producer.begin_transaction()
    for value in _opening_events(account_id):
        producer.produce(settings.events_topic, value, account_id, partition=0)
    assert producer.flush(TIMEOUT_S) == 0  # in the log, above the last stable offset
    return producer


def _restore_consumer(settings) -> Consumer:
    return Consumer(restore_consumer_config(settings.bootstrap, settings.processor_group_id, uuid.uuid4().hex[:6]))


def test_a_read_committed_read_ends_before_a_transaction_still_open(make_settings):
    """The hazard: a read to the end, alone, stops at the last stable offset of the moment."""
    settings = make_settings(1)
    previous_owner = _open_transaction(settings, "late-alice")
    consumer = _restore_consumer(settings)
    try:
        state = State()
        fold_event_tail(consumer, settings.events_topic, {0: (state, 0)}, {0: 0}, TIMEOUT_S)
        assert "late-alice" not in state.accounts, "read_committed must not show an open transaction"
        previous_owner.commit_transaction(TIMEOUT_S)
        # Committed now, and the read above had already ended without it: a restore that
        # trusted it would decide on a state missing the previous owner's last events.
    finally:
        consumer.close()


def test_restore_waits_for_a_transaction_open_on_the_events_partition_and_folds_it(make_settings):
    settings = make_settings(1)
    previous_owner = _open_transaction(settings, "late-bob")
    admin = admin_client(settings.bootstrap)
    consumer = _restore_consumer(settings)
    state = State()
    finished: list[float] = []

    def restore() -> None:
        ends = stable_ends(admin, settings.events_topic, [0], TIMEOUT_S)
        fold_event_tail(consumer, settings.events_topic, {0: (state, 0)}, ends, TIMEOUT_S)
        finished.append(time.monotonic())

    restorer = threading.Thread(target=restore, daemon=True)
    try:
        restorer.start()
        time.sleep(OPEN_TRANSACTION_HELD_S)
        assert not finished, "the restore ended while a transaction was still open on the partition"
        committed_s = time.monotonic()
        previous_owner.commit_transaction(TIMEOUT_S)
        restorer.join(TIMEOUT_S)
        assert finished and finished[0] >= committed_s
        assert "late-bob" in state.accounts, "the previous owner's committed events were not folded"
    finally:
        consumer.close()


def test_restore_after_an_aborted_transaction_ends_without_its_records(make_settings):
    settings = make_settings(1)
    previous_owner = _open_transaction(settings, "never-carol")
    previous_owner.abort_transaction(TIMEOUT_S)
    consumer = _restore_consumer(settings)
    try:
        state = State()
        ends = stable_ends(admin_client(settings.bootstrap), settings.events_topic, [0], TIMEOUT_S)
        next_offsets = fold_event_tail(consumer, settings.events_topic, {0: (state, 0)}, ends, TIMEOUT_S)
        assert ends[0] > 0 and "never-carol" not in state.accounts
        assert next_offsets == {0: 0}
    finally:
        consumer.close()


REBALANCES = 4
REBALANCE_ACCOUNTS = 300
REBALANCE_TRANSFERS = 4_000
ASSIGNED_TIMEOUT_S = 60
DRAIN_TIMEOUT_S = 180


def test_rebalances_right_after_commits_lose_and_double_nothing(make_settings):
    """A second instance joins and leaves again and again while the first commits a batch every
    few milliseconds, so each move of partitions follows a commit of their previous owner;
    the audit then proves from the log that nothing was lost or doubled."""
    from tests.support.kafka_io import OutcomeCollector, command_producer, publish, wait_for
    from tests.support.processes import ProcessorProcess
    from tests.test_processor_faults import _accounts_and_funding, _publish_steadily, _transfer_stream, check_ledger

    settings = make_settings(8)
    ts_ms = int(time.time() * 1000)
    accounts, funding = _accounts_and_funding(ts_ms)
    accounts, funding = accounts[:REBALANCE_ACCOUNTS], funding[: 2 * REBALANCE_ACCOUNTS]
    transfers = [t for t in _transfer_stream(accounts, ts_ms + 1, random.Random(11))][:REBALANCE_TRANSFERS]
    first = ProcessorProcess(settings, "owner-a").start()
    second = ProcessorProcess(settings, "owner-b")
    outcomes = OutcomeCollector(settings)
    try:
        publish(command_producer(settings), settings, funding)
        outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
        publisher = _publish_steadily(settings, transfers, duration_s=REBALANCES * 12)
        for round_number in range(1, REBALANCES + 1):
            second.start()
            wait_for(
                lambda rounds=round_number: _assignments(second) >= rounds,
                ASSIGNED_TIMEOUT_S,
                f"owner-b taking partitions (round {round_number})",
            )
            assert second.stop() == 0, second.log_tail()
            wait_for(
                lambda: _owned_now(first) == set(range(settings.partitions)),
                ASSIGNED_TIMEOUT_S,
                f"owner-a taking every partition back (round {round_number})",
            )
        publisher.join(timeout=120)
        assert not publisher.is_alive(), "publishing the transfers did not finish"
        outcomes.wait_all({t.transaction_id for t in transfers}, timeout_s=DRAIN_TIMEOUT_S)
    finally:
        outcomes.close()
        first.stop()
        second.stop() if second.process and second.process.poll() is None else None
    check_ledger(settings, funding + transfers, [state_dump(first.store), state_dump(second.store)])


def _assignments(instance) -> int:
    return instance.log_path.read_text(errors="replace").count("assigned partitions")


def _owned_now(instance) -> set[int]:
    """The partitions an instance's log last said it owns."""
    lines = [line for line in instance.log_path.read_text(errors="replace").splitlines() if "now owning [" in line]
    return set(ast.literal_eval(lines[-1].rsplit("now owning ", 1)[1])) if lines else set()


def test_a_processor_stopped_by_sigterm_hands_its_partitions_over_at_once(make_settings):
    """A static member that merely closes keeps its partitions until its session times out: the
    group waits for it to come back. A SIGTERM is a stop, not a restart, so the processor leaves
    the group and its partitions move to the other instance well within the session timeout."""
    from infra.kafka_clients import processor_consumer_config
    from tests.support.kafka_io import wait_for
    from tests.support.processes import ProcessorProcess

    settings = make_settings(4)
    session_timeout_s = processor_consumer_config(settings.bootstrap, "group", "instance")["session.timeout.ms"] / 1000
    first = ProcessorProcess(settings, "stays").start().wait_until_assigned()
    second = ProcessorProcess(settings, "stops").start()
    try:
        wait_for(
            lambda: _owned_now(second) and len(_owned_now(first)) < settings.partitions,
            ASSIGNED_TIMEOUT_S,
            "the two instances sharing the partitions",
        )
        stopped_s = time.monotonic()
        assert second.stop() == 0, second.log_tail()
        wait_for(
            lambda: _owned_now(first) == set(range(settings.partitions)),
            ASSIGNED_TIMEOUT_S,
            "the instance that stays owning every partition",
            interval_s=0.1,
        )
        handover_s = time.monotonic() - stopped_s
    finally:
        first.stop()
        second.stop() if second.process and second.process.poll() is None else None
    assert handover_s < session_timeout_s / 2, (
        f"the partitions moved {handover_s:.1f} s after the SIGTERM: the stopped instance did not leave the group"
    )
