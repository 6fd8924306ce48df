"""The standby replica (issue 15, bounded takeover), on the real broker.

The follower alone: what it hands over equals a fresh fold of the same events, at the right
offset, and it follows on a state handed back to it; a record it cannot fold drops only that
partition. Then two `--standby` processors, one SIGKILLed under load: the survivor takes the
dead one's partitions from its standby and folds only the tail, and the ledger holds.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid

from confluent_kafka import Consumer, Producer

from infra.admin import admin_client
from infra.kafka_clients import kafka_security, restore_consumer_config
from schemas.codec import encode
from schemas.commands import Deposit, OpenAccount, Withdraw
from schemas.partitioning import KAFKA_PARTITIONER
from streams.cli import state_dump
from streams.core.machine import apply
from streams.core.state import State
from streams.runtime.restore import fold_event_tail, stable_ends
from streams.runtime.standby import Standby
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic, wait_for
from tests.support.processes import ProcessorProcess
from tests.test_processor_faults import _accounts_and_funding, _publish_steadily, _transfer_stream, check_ledger
from wallet.stack import processors_not_ready

TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 180
TAKEOVER_ACCOUNTS = 200
TAKEOVER_TRANSFERS = 3_000


class _EventWriter:
    """Decides commands on a reference state, as a processor would, and writes their events to
    one events partition in committed transactions."""

    def __init__(self, settings, partition: int) -> None:
        self.settings, self.partition = settings, partition
        self.reference = State()
        self._producer = Producer(
            {
                **kafka_security("admin"),
                "bootstrap.servers": settings.bootstrap,
                "partitioner": KAFKA_PARTITIONER,
                "transactional.id": f"{settings.topic_prefix}writer-{partition}-{uuid.uuid4().hex[:6]}",
            }
        )
        self._producer.init_transactions(TIMEOUT_S)
        self._ts_ms = int(time.time() * 1000)
        self._accounts: list[str] = []

    def write(self, commands: int, rng: random.Random) -> None:
        self._producer.begin_transaction()
        for _ in range(commands):
            self._ts_ms += 1
            if not self._accounts or rng.random() < 0.1:
                account = f"p{self.partition}-{len(self._accounts)}"
                self._accounts.append(account)
                command = edge(OpenAccount, transaction_id=f"open-{account}", account_id=account, currency="USD")
            else:
                account = rng.choice(self._accounts)
                kind = Deposit if rng.random() < 0.7 else Withdraw
                command = edge(
                    kind,
                    transaction_id=f"{kind.__name__}-{self._ts_ms}",
                    account_id=account,
                    amount=f"{rng.randint(1, 500) / 100:.2f}",
                    currency="USD",
                )
            for event in apply(self.reference, command, self._ts_ms).events:
                self._producer.produce(self.settings.events_topic, encode(event), event.account_id, self.partition)
        self._producer.commit_transaction(TIMEOUT_S)


def _standby(settings) -> Standby:
    config = restore_consumer_config(settings.bootstrap, settings.processor_group_id, uuid.uuid4().hex[:6])
    return Standby({**config, "enable.partition.eof": False}, settings.events_topic)


def _end(settings, partition: int) -> int:
    return stable_ends(admin_client(settings.bootstrap), settings.events_topic, [partition], TIMEOUT_S)[partition]


def _fresh_fold(settings, partition: int) -> tuple[State, int]:
    """What a restore from an empty state builds of the partition."""
    consumer = Consumer(restore_consumer_config(settings.bootstrap, settings.processor_group_id, uuid.uuid4().hex[:6]))
    try:
        state = State()
        end = _end(settings, partition)
        ends = fold_event_tail(consumer, settings.events_topic, {partition: (state, 0)}, {partition: end}, TIMEOUT_S)
        return state, ends[partition]
    finally:
        consumer.close()


def _caught_up(standby: Standby, partition: int, next_offset: int) -> bool:
    """Past the last event a fresh fold found (the commit marker after it is never delivered)."""
    return standby.followed().get(partition, -1) >= next_offset


def test_the_state_taken_from_the_standby_equals_a_fresh_fold_and_a_handed_back_one_is_followed_on(make_settings):
    settings = make_settings(2)
    rng = random.Random(15)
    writers = [_EventWriter(settings, 0), _EventWriter(settings, 1)]
    for writer in writers:
        writer.write(300, rng)
    standby = _standby(settings)
    standby.follow(0, State(), 0)
    standby.follow(1, State(), 0)
    standby.start()
    try:
        fresh_state, fresh_next = _fresh_fold(settings, 0)
        wait_for(lambda: _caught_up(standby, 0, fresh_next), TIMEOUT_S, "the standby to reach partition 0's end")
        taken = standby.take(0)
        assert taken is not None
        state, next_offset = taken
        assert next_offset == fresh_next, "the offset handed over is the first event not folded"
        assert state == fresh_state == writers[0].reference
        assert standby.take(0) is None, "a taken partition is no longer followed"

        # Taken: more events of partition 0 do not reach the state the task now owns.
        snapshot_accounts = {account_id: account.balance_minor for account_id, account in state.accounts.items()}
        writers[0].write(200, rng)
        writers[1].write(200, rng)
        next_1 = _fresh_fold(settings, 1)[1]
        wait_for(lambda: _caught_up(standby, 1, next_1), TIMEOUT_S, "the standby to follow partition 1 on")
        assert {a: account.balance_minor for a, account in state.accounts.items()} == snapshot_accounts

        # Handed back (a revoked task's committed state): followed on from its offset, to the same end.
        standby.follow(0, state, next_offset)
        fresh_state, fresh_next = _fresh_fold(settings, 0)
        assert fresh_next > next_offset
        wait_for(lambda: _caught_up(standby, 0, fresh_next), TIMEOUT_S, "the standby to follow a handed-back state on")
        taken = standby.take(0)
        assert taken is not None
        assert taken[0] is state, "the handed-back state itself is folded on"
        assert taken == (fresh_state, fresh_next)
        assert state == writers[0].reference
    finally:
        standby.close()


def test_a_record_the_standby_cannot_fold_drops_that_partition_only(make_settings):
    settings = make_settings(2)
    rng = random.Random(16)
    writers = [_EventWriter(settings, 0), _EventWriter(settings, 1)]
    standby = _standby(settings)
    standby.follow(0, State(), 0)
    standby.follow(1, State(), 0)
    standby.start()
    try:
        raw = Producer({**kafka_security("admin"), "bootstrap.servers": settings.bootstrap})
        raw.produce(settings.events_topic, b"\xff not an event", b"x", partition=1)
        assert raw.flush(TIMEOUT_S) == 0
        wait_for(lambda: 1 not in standby.followed(), TIMEOUT_S, "the standby to drop partition 1")
        assert standby.take(1) is None, "a dropped partition falls back to the snapshot and the log"
        writers[0].write(100, rng)
        next_0 = _fresh_fold(settings, 0)[1]
        wait_for(lambda: _caught_up(standby, 0, next_0), TIMEOUT_S, "the standby to go on with partition 0")
        taken = standby.take(0)
        assert taken is not None and taken[0] == writers[0].reference
    finally:
        standby.close()


def _tail_folds(instance: ProcessorProcess) -> list[tuple[list[int], int]]:
    """Each takeover from the standby the processor logged: (partitions, events of the tail folded)."""
    found = []
    for match in re.finditer(
        r"partitions (\[[\d, ]*\]) taken from the standby .*?; (\d+) events of the tail folded",
        instance.log_path.read_text(errors="replace"),
    ):
        found.append(([int(p) for p in match.group(1).strip("[]").split(",")], int(match.group(2))))
    return found


def test_a_standby_processor_takes_a_killed_peers_partitions_folding_only_the_tail(make_settings, report_figure):
    settings = make_settings(4)
    ts_ms = int(time.time() * 1000)
    accounts, funding = _accounts_and_funding(ts_ms)
    accounts, funding = accounts[:TAKEOVER_ACCOUNTS], funding[: 2 * TAKEOVER_ACCOUNTS]
    transfers = _transfer_stream(accounts, ts_ms + 1, random.Random(17))[:TAKEOVER_TRANSFERS]
    survivor = ProcessorProcess(settings, "standby-a", "--standby").start()
    victim = ProcessorProcess(settings, "standby-b", "--standby").start()
    outcomes = OutcomeCollector(settings)
    try:
        admin = admin_client(settings.bootstrap)
        wait_for(lambda: processors_not_ready(admin, settings, 2) is None, DRAIN_TIMEOUT_S, "both in the group")
        publish(command_producer(settings), settings, funding)
        outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
        half = len(transfers) // 2
        publish(command_producer(settings), settings, transfers[:half])
        outcomes.wait_all({t.transaction_id for t in transfers[:half]}, timeout_s=DRAIN_TIMEOUT_S)
        takeovers_before = len(_tail_folds(survivor))
        publisher = _publish_steadily(settings, transfers[half:], duration_s=4)
        time.sleep(1)
        victim.kill()
        # The static member's partitions move when its session times out.
        wait_for(
            lambda: len(_tail_folds(survivor)) > takeovers_before,
            DRAIN_TIMEOUT_S,
            "the survivor to take the killed peer's partitions from its standby",
        )
        publisher.join(timeout=120)
        assert not publisher.is_alive(), "publishing the transfers did not finish"
        outcomes.wait_all({t.transaction_id for t in transfers}, timeout_s=DRAIN_TIMEOUT_S)
    finally:
        outcomes.close()
        survivor.stop()
        if victim.process and victim.process.poll() is None:
            victim.stop()
    partitions, tail_folded = _tail_folds(survivor)[takeovers_before]
    logged = sum(1 for record in read_topic(settings, settings.events_topic) if record.partition in partitions)
    report_figure(
        f"standby takeover after SIGKILL: {tail_folded} events of the tail folded for partitions {partitions} "
        f"holding {logged} events (load average {os.getloadavg()[0]:.1f})"
    )
    assert logged > 1_000, f"too few events in partitions {partitions} for the test to say anything: {logged}"
    assert tail_folded * 10 < logged, (
        f"the takeover of {partitions} folded {tail_folded} events of their {logged}: not only the tail"
    )
    check_ledger(settings, funding + transfers, [state_dump(survivor.store), state_dump(victim.store)])
