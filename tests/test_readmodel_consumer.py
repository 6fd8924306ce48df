"""The read-model consumer against the real broker, on SQLite and PostgreSQL: balances and history are
the fold of wallet.events, exactly once through SIGKILLs, and a rebuild ends equal to the live model."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.support.reference_pipeline import ABORTED_TRANSACTION_PREFIX
from consumers.readmodel.consumer import end_offsets, read_lag
from consumers.readmodel.store import TABLES, ReadModelStore
from infra.admin import admin_client
from infra.settings import PROJECT_ROOT, wallet_argv

pytest.register_assert_rewrite("tests.readmodel_fixtures")
from tests.readmodel_fixtures import (  # noqa: E402  (after the assert-rewrite registration)
    CATCH_UP_TIMEOUT_S,
    PublishedLog,
    consume_until_caught_up,
    expected_rows,
    expected_transactions,
    start_consumer_process,
    stored_rows,
    stored_transactions,
)

pytest_plugins = ["tests.readmodel_fixtures"]

KILL_ROUNDS = 3
# Small batches make the consumer take seconds over the log, so a kill lands mid-stream.
KILLED_BATCH_SIZE = 5
KILL_DELAY_S_MAX = 0.15
PROCESS_TIMEOUT_S = 30


def test_read_model_equals_the_fold_of_committed_events(published_log: PublishedLog, db_url: str) -> None:
    with ReadModelStore(db_url) as store:
        consume_until_caught_up(store, published_log.settings)
        assert stored_rows(store) == expected_rows(published_log)
        transactions = stored_transactions(store)
        assert transactions == expected_transactions(published_log)
        assert {
            status for (_, transaction_id), status in transactions.items() if transaction_id in published_log.in_flight
        } == {("pending", None)}
        assert not [row for row in store.table_rows("entries") if row[2].startswith(ABORTED_TRANSACTION_PREFIX)]
        assert not [tx for _, tx in transactions if tx.startswith(ABORTED_TRANSACTION_PREFIX)]


def _wait_for_progress(store: ReadModelStore, beyond: int, process: subprocess.Popen, log_path: Path) -> int:
    deadline_s = time.monotonic() + PROCESS_TIMEOUT_S
    while (applied := sum(store.offsets().values())) <= beyond:
        assert process.poll() is None, f"the consumer exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline_s, f"no progress in {PROCESS_TIMEOUT_S} s:\n{log_path.read_text()}"
        time.sleep(0.01)
    return applied


def test_consumer_killed_at_random_moments_resumes_with_nothing_lost_or_doubled(
    published_log: PublishedLog, db_url: str, tmp_path: Path
) -> None:
    settings = published_log.settings
    log_path = tmp_path / "consumer.log"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    admin = admin_client(settings.bootstrap)
    events_end = sum(
        offset for (topic, _), offset in end_offsets(admin, settings).items() if topic == settings.events_topic
    )
    with ReadModelStore(db_url) as store:
        store.create_schema()
        reached = 0
        for kill_round in range(KILL_ROUNDS):
            process = start_consumer_process(
                settings, db_url, log_path, "--batch-size", str(KILLED_BATCH_SIZE), "--batch-wait-ms", "20"
            )
            reached = _wait_for_progress(store, reached, process, log_path)
            time.sleep(rng.uniform(0, KILL_DELAY_S_MAX))
            process.kill()
            process.wait(PROCESS_TIMEOUT_S)
            reached = sum(store.offsets().values())
            events_offsets = {
                partition: offset
                for (topic, partition), offset in store.offsets().items()
                if topic == settings.events_topic
            }
            assert sum(events_offsets.values()) < events_end, (
                f"round {kill_round} (seed {seed}): the consumer finished before the kill; lengthen the log"
            )
            # Exactly a prefix of every partition: nothing of a half-written batch, no row twice.
            assert stored_rows(store) == expected_rows(published_log, events_offsets), f"seed {seed}"

        process = start_consumer_process(settings, db_url, log_path)
        deadline_s = time.monotonic() + CATCH_UP_TIMEOUT_S
        while sum(item.lag for item in read_lag(admin, settings, store.offsets())) > 0:
            assert process.poll() is None, f"the consumer exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline_s, f"not caught up after {CATCH_UP_TIMEOUT_S} s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # it has made progress, so its handler is in place
        assert process.wait(PROCESS_TIMEOUT_S) == 0, log_path.read_text()
        assert "SIGTERM: stopping after the batch in progress" in log_path.read_text()
        assert stored_rows(store) == expected_rows(published_log), f"seed {seed}"
        assert stored_transactions(store) == expected_transactions(published_log)


def test_rebuild_replays_into_a_fresh_database_equal_to_the_live_one(
    published_log: PublishedLog, db_url: str, make_db_url, tmp_path: Path
) -> None:
    settings = published_log.settings
    rebuilt_url = make_db_url()
    with ReadModelStore(db_url) as live, ReadModelStore(rebuilt_url) as rebuilt:
        consume_until_caught_up(live, settings)
        # A partly built model in the target, which the rebuild must drop rather than build upon.
        consume_until_caught_up(rebuilt, settings, steps_max=3)
        assert rebuilt.table_rows("offsets") != live.table_rows("offsets")

        result = subprocess.run(
            wallet_argv(
                settings,
                "readmodel",
                "rebuild",
                "--db",
                rebuilt_url,
                "--batch-size",
                "2000",
            ),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT_S * 2,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "rebuilt" in result.stdout and "rebuild" in result.stderr  # the report and the progress bar
        for table in TABLES:
            assert rebuilt.table_rows(table) == live.table_rows(table), table
