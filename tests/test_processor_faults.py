"""Faults on a real broker: SIGKILLs under load, a rebalance mid-stream, poison records.

After each, the invariants are checked from the log itself by the audit, not from what the
processor says about itself: one final outcome per request, conservation of money per
currency, gap-free per-account sequences, byte-identical re-decision of the commands, and
the RocksDB snapshots equal to the fold of the events.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

from confluent_kafka import Producer

from consumers.audit import run_audit
from schemas.codec import command_digest, decode_outcome
from schemas.commands import Command, Deposit, OpenAccount, Transfer
from streams.cli import state_dump
from streams.runtime.processor import Processor, ProcessorConfig
from streams.runtime.transactions import TransactionAborted
from tests.support.commands import edge
from tests.support.kafka_io import OutcomeCollector, command_producer, publish, read_topic, wait_for
from tests.support.processes import ProcessorProcess

ACCOUNTS = 1_000
TRANSFERS = 20_000
KILLS_MIN = 5
DRAIN_TIMEOUT_S = 180


def _accounts_and_funding(ts_ms: int) -> tuple[list[str], list]:
    accounts = [f"acct-{i:04d}" for i in range(ACCOUNTS)]
    commands = []
    for account in accounts:
        commands.append(edge(OpenAccount, transaction_id=f"open-{account}", account_id=account, currency="USD"))
        commands.append(
            edge(Deposit, transaction_id=f"fund-{account}", account_id=account, amount="50.00", currency="USD")
        )
    return accounts, commands


def _transfer_stream(accounts: list[str], ts_ms: int, rng: random.Random) -> list:
    """Transfers among the accounts, with client retries (same payload), conflicts and bad receivers."""
    transfers: list[Command] = []
    for i in range(TRANSFERS):
        roll = rng.random()
        if roll < 0.03 and transfers:
            previous = rng.choice(transfers)  # a client retry of an earlier request
            transfers.append(previous)
            continue
        if roll < 0.04 and transfers:
            previous = rng.choice(transfers)  # the same id reused for another payload
            transfers.append(Transfer(**{**_fields(previous), "amount": "0.01"}))
            continue
        sender = rng.choice(accounts)
        receiver = rng.choice(accounts) if roll > 0.06 else f"missing-{i}"
        if receiver == sender:
            receiver = accounts[0 if sender != accounts[0] else 1]
        transfers.append(
            edge(
                Transfer,
                transaction_id=f"tx-{i}",
                from_account=sender,
                to_account=receiver,
                amount=f"{rng.randint(1, 2000) / 100:.2f}",
                currency="USD",
            )
        )
    return transfers


def _fields(command) -> dict:
    return {name: getattr(command, name) for name in command.__struct_fields__}


def check_ledger(settings, client_commands: list, dumps: list[dict]) -> None:
    """The non-negotiables, read from the topics and the RocksDB snapshots by the audit, plus
    the one thing only the test knows: which requests it sent."""
    outcomes = []
    for record in read_topic(settings, settings.outcomes_topic):
        assert record.value is not None  # the wallet writes no tombstones
        outcomes.append(decode_outcome(record.value))
    answers = defaultdict(set)
    for outcome in outcomes:
        answers[(outcome.transaction_id, outcome.digest)].add((outcome.status, outcome.reason))
    for command in client_commands:
        found = answers.get((command.transaction_id, command_digest(command)))
        assert found, f"no outcome for {command.transaction_id} ({command})"
        assert len(found) == 1, f"{command.transaction_id} has several answers: {found}"
    report = run_audit(settings, state_dumps=dumps, settled=True)
    assert report.passed, report.render_text()


def _publish_steadily(settings, commands: list, duration_s: float) -> threading.Thread:
    def run():
        producer = command_producer(settings)
        chunk = max(1, len(commands) // int(duration_s * 10))
        for start in range(0, len(commands), chunk):
            publish(producer, settings, commands[start : start + chunk])
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(make_settings):
    settings = make_settings(8)
    rng = random.Random(20261126)
    ts_ms = int(time.time() * 1000)
    accounts, funding = _accounts_and_funding(ts_ms)
    transfers = _transfer_stream(accounts, ts_ms + 1, rng)
    instances = [ProcessorProcess(settings, "crash-a").start(), ProcessorProcess(settings, "crash-b").start()]
    outcomes = OutcomeCollector(settings)
    try:
        publish(command_producer(settings), settings, funding)
        outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
        publisher = _publish_steadily(settings, transfers, duration_s=15)
        for _ in range(KILLS_MIN + 1):
            time.sleep(rng.uniform(0.5, 3.0))
            victim = rng.choice(instances)
            victim.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            victim.start()
        publisher.join(timeout=120)
        assert not publisher.is_alive(), "publishing the transfers did not finish"
        outcomes.wait_all({t.transaction_id for t in transfers}, timeout_s=DRAIN_TIMEOUT_S)
    finally:
        outcomes.close()
        for instance in instances:
            instance.stop()
    check_ledger(settings, funding + transfers, [state_dump(i.store) for i in instances])


def test_a_second_instance_joining_and_leaving_mid_stream_moves_partitions_not_money(make_settings):
    settings = make_settings(8)
    rng = random.Random(7)
    ts_ms = int(time.time() * 1000)
    accounts, funding = _accounts_and_funding(ts_ms)
    transfers = _transfer_stream(accounts, ts_ms + 1, rng)[:8_000]
    first = ProcessorProcess(settings, "rebalance-a").start()
    second = ProcessorProcess(settings, "rebalance-b")
    outcomes = OutcomeCollector(settings)
    try:
        publish(command_producer(settings), settings, funding)
        outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
        publisher = _publish_steadily(settings, transfers, duration_s=8)
        time.sleep(2)
        second.start()
        # Stopped once it has taken partitions: a SIGTERM while Python still imports kills it.
        wait_for(lambda: "assigned partitions" in second.log_tail(200), DRAIN_TIMEOUT_S, "the second instance to join")
        time.sleep(1)
        assert second.stop() == 0, second.log_tail()
        publisher.join(timeout=120)
        outcomes.wait_all({t.transaction_id for t in transfers}, timeout_s=DRAIN_TIMEOUT_S)
    finally:
        outcomes.close()
        first.stop()
        second.stop() if second.process and second.process.poll() is None else None
    assert "assigned partitions" in second.log_tail(200), "the second instance never took partitions"
    check_ledger(settings, funding + transfers, [state_dump(i.store) for i in (first, second)])


def test_poison_records_go_to_the_dead_letter_topic_and_processing_continues(make_settings):
    settings = make_settings(2)
    processor = ProcessorProcess(settings, "poison").start()
    outcomes = OutcomeCollector(settings)
    try:
        raw = Producer({"bootstrap.servers": settings.bootstrap})
        poison = [
            (b"acct", b"\xff\xfe not json"),
            (b"acct", b'{"type": "transfer", "amount": 5}'),
            (b"acct", b'{"type": "no_such_command", "transaction_id": "x", "ts_ms": 1}'),
        ]
        for key, value in poison:
            raw.produce(settings.commands_topic, value, key, partition=0)
        raw.flush(10)
        after = edge(OpenAccount, transaction_id="after-poison", account_id="acct", currency="USD")
        publish(command_producer(settings), settings, [after])
        assert outcomes.wait("after-poison")[0].status == "success"
    finally:
        outcomes.close()
        processor.stop()
    dead = read_topic(settings, settings.dlq_topic)
    assert sorted(r.value for r in dead) == sorted(v for _, v in poison)
    for record in dead:
        headers = record.headers
        assert headers["source_topic"].decode() == settings.commands_topic
        assert headers["error"], "the reason must travel with the record"


def test_a_transaction_that_fails_to_commit_is_redone_from_the_log_not_guessed(make_settings, caplog):
    """The commit of the first batch (nothing committed before it) and of a later one fail:
    the processor aborts, replaces its producer, rebuilds from snapshot and log, rewinds to
    the committed offsets, and every command still takes effect exactly once."""
    settings = make_settings(2)
    ts_ms = int(time.time() * 1000)
    accounts, funding = _accounts_and_funding(ts_ms)
    accounts, funding = accounts[:20], funding[:40]
    transfers = [
        edge(
            Transfer,
            transaction_id=f"tx-{i}",
            from_account=accounts[i % 20],
            to_account=accounts[(i * 7 + 1) % 20],
            amount="1.25",
            currency="USD",
        )
        for i in range(300)
    ]
    processor = Processor(
        settings, ProcessorConfig(instance_id="flaky", store_path=settings.run_dir / "flaky", batch_size_max=100)
    )
    transactions = processor._transactions
    commit = transactions.commit
    commits = []

    def commit_failing_now_and_then(offsets, group_metadata):
        commits.append(offsets)
        if len(commits) in (1, 4):
            raise TransactionAborted("injected: the commit failed")  # the transaction left open
        return commit(offsets, group_metadata)

    transactions.commit = commit_failing_now_and_then
    publish(command_producer(settings), settings, funding)

    def drive():
        outcomes = OutcomeCollector(settings)
        try:
            outcomes.wait_all([c.transaction_id for c in funding], timeout_s=DRAIN_TIMEOUT_S)
            publish(command_producer(settings), settings, transfers)
            outcomes.wait_all([t.transaction_id for t in transfers], timeout_s=DRAIN_TIMEOUT_S)
        finally:
            outcomes.close()
            processor.stop()

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    with caplog.at_level("WARNING", logger="wallet.processor"):
        processor.run()
    driver.join(timeout=10)
    assert len(commits) > 4, "the failures were not both injected"
    assert sum("recovering" in message for message in caplog.messages) == 2
    check_ledger(settings, funding + transfers, [state_dump(settings.run_dir / "flaky")])
