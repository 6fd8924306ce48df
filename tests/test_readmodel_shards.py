"""Read-model shards (`wallet readmodel --shard I/N`) on the real broker into one real PostgreSQL
database: two shards, one of them SIGKILLed mid-stream and restarted, end with exactly the tables
one consumer writes; a second process of a shard, or a rebuild beside it, is refused; SQLite
refuses more than one shard."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from consumers.readmodel.consumer import Shard, end_offsets, read_lag
from consumers.readmodel.store import TABLES, ReadModelStore
from infra.admin import admin_client
from infra.settings import PROJECT_ROOT, Settings, wallet_argv

pytest.register_assert_rewrite("tests.readmodel_fixtures")
from tests.readmodel_fixtures import (  # noqa: E402  (after the assert-rewrite registration)
    CATCH_UP_TIMEOUT_S,
    PublishedLog,
    consume_until_caught_up,
    start_consumer_process,
)

pytest_plugins = ["tests.readmodel_fixtures"]

SHARD_COUNT = 2
# Small batches: the shards take seconds over the log, in many transactions that meet on the same
# transfers (a debit on one shard's partition, its credit and outcome on the other's), and the kill
# lands mid-stream.
SHARD_BATCH_SIZE = 20
KILL_DELAY_S_MAX = 0.3
PROCESS_TIMEOUT_S = 30


@pytest.fixture
def db_kind() -> str:
    return "postgresql"  # several writers at once: SQLite has one


def _applied(store: ReadModelStore, shard: Shard) -> int:
    return sum(offset for (_, partition), offset in store.offsets().items() if shard.owns(partition))


def _wait_for_progress(store: ReadModelStore, shard: Shard, process: subprocess.Popen, log_path: Path) -> None:
    deadline_s = time.monotonic() + PROCESS_TIMEOUT_S
    while _applied(store, shard) == 0:
        assert process.poll() is None, f"shard {shard} exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline_s, f"shard {shard}: no progress in {PROCESS_TIMEOUT_S} s"
        time.sleep(0.01)


def _shard_process(settings: Settings, db_url: str, log_path: Path, shard: Shard, *extra: str) -> subprocess.Popen:
    return start_consumer_process(settings, db_url, log_path, "--shard", str(shard), "--batch-wait-ms", "20", *extra)


def test_two_shards_killed_and_restarted_write_the_tables_of_one_consumer(
    published_log: PublishedLog, make_db_url: Callable[[], str], tmp_path: Path
) -> None:
    settings = published_log.settings
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    admin = admin_client(settings.bootstrap)
    shards = [Shard(index, SHARD_COUNT) for index in range(SHARD_COUNT)]
    killed = shards[1]
    killed_end = sum(
        offset for (_, partition), offset in end_offsets(admin, settings).items() if killed.owns(partition)
    )
    logs = [tmp_path / f"shard-{shard.index}.log" for shard in shards]
    with ReadModelStore(make_db_url()) as one, ReadModelStore(make_db_url()) as sharded:
        consume_until_caught_up(one, settings)
        sharded.create_schema()
        processes = [
            _shard_process(settings, sharded.db_url, log, shard, "--batch-size", str(SHARD_BATCH_SIZE))
            for shard, log in zip(shards, logs, strict=True)
        ]
        try:
            _wait_for_progress(sharded, killed, processes[1], logs[1])
            time.sleep(rng.uniform(0, KILL_DELAY_S_MAX))
            processes[1].kill()
            processes[1].wait(PROCESS_TIMEOUT_S)
            assert _applied(sharded, killed) < killed_end, (
                f"seed {seed}: shard {killed} finished before the kill; lengthen the log"
            )
            processes[1] = _shard_process(settings, sharded.db_url, logs[1], killed)

            deadline_s = time.monotonic() + CATCH_UP_TIMEOUT_S
            while sum(item.lag for item in read_lag(admin, settings, sharded.offsets())) > 0:
                for process, log in zip(processes, logs, strict=True):
                    assert process.poll() is None, f"a shard exited with {process.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline_s, f"the shards did not catch up in {CATCH_UP_TIMEOUT_S} s"
                time.sleep(0.05)
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process, log in zip(processes, logs, strict=True):
                assert process.wait(PROCESS_TIMEOUT_S) == 0, log.read_text()
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(PROCESS_TIMEOUT_S)
        for table in TABLES:
            assert sharded.table_rows(table) == one.table_rows(table), f"table {table} (seed {seed})"


def _readmodel_command(settings: Settings, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        wallet_argv(settings, "readmodel", *arguments),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )


def test_a_second_process_of_a_shard_is_refused(published_log: PublishedLog, db_url: str, tmp_path: Path) -> None:
    settings = published_log.settings
    log_path = tmp_path / "shard.log"
    first_shard = Shard(0, SHARD_COUNT)
    with ReadModelStore(db_url) as store:
        store.create_schema()
        first = _shard_process(settings, db_url, log_path, first_shard, "--batch-size", str(SHARD_BATCH_SIZE))
        try:
            _wait_for_progress(store, first_shard, first, log_path)
            # The same shard, and one reading every partition (so the first shard's too).
            for overlapping in (str(first_shard), "0/1"):
                result = _readmodel_command(settings, "--db", db_url, "--shard", overlapping)
                assert result.returncode == 1, f"--shard {overlapping}: {result.stdout}{result.stderr}"
                assert "ConcurrentWriterError" in result.stderr, result.stderr
                assert "is written by another read-model process" in result.stderr, result.stderr
            # A rebuild is refused too, before it drops anything the shard wrote.
            offsets_before = store.table_rows("offsets")
            result = _readmodel_command(settings, "rebuild", "--db", db_url, "--no-progress")
            assert result.returncode == 1, result.stdout + result.stderr
            assert "is written by another read-model process" in result.stderr, result.stderr
            assert len(store.table_rows("offsets")) >= len(offsets_before) > 0, "the shard's tables were dropped"
            assert first.poll() is None, log_path.read_text()
        finally:
            first.kill()
            first.wait(PROCESS_TIMEOUT_S)


def test_sqlite_refuses_more_than_one_shard(tmp_path: Path) -> None:
    # No broker needed: the refusal comes before the consumer connects.
    result = _readmodel_command(Settings(), "--db", f"sqlite:///{tmp_path / 'readmodel.db'}", "--shard", "1/2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SQLite, which has one writer at a time" in result.stderr, result.stderr


@pytest.mark.parametrize("text", ["2/2", "0/0", "-1/2", "1", "a/b", "1/2/3"])
def test_a_shard_outside_its_count_or_misspelt_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)


def test_shards_split_the_partitions_between_them() -> None:
    shards = [Shard.parse(f"{index}/3") for index in range(3)]
    owners = [[shard.index for shard in shards if shard.owns(partition)] for partition in range(8)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0], [1]]
    assert all(Shard().owns(partition) for partition in range(8))
