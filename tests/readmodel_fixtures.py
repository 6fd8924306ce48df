"""Fixtures of the read-model tests: `db_url` runs a test on SQLite and on PostgreSQL; `published_log`.

Loaded by the read-model test modules with `pytest_plugins = ["tests.readmodel_fixtures"]`,
so one PostgreSQL server serves the whole session.

PostgreSQL is, in order: the server named by WALLET_TEST_POSTGRES_URL (a database per test is
created in it), or a throwaway server this session starts (initdb into a temporary folder,
pg_ctl on a free loopback port) from the binaries of Debian's `postgresql` package, and stops
at its end. Without those binaries the PostgreSQL cases fail under CI (CI=true) and are
skipped elsewhere.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from benchmarks.support.reference_pipeline import decide, publish, workload
from consumers.readmodel.consumer import ReadModelConsumer, read_lag
from consumers.readmodel.projection import TransactionRow
from consumers.readmodel.store import ReadModelStore
from infra.admin import admin_client
from infra.kafka_clients import kafka_security
from infra.ports import free_loopback_ports
from infra.settings import PROJECT_ROOT, Settings, wallet_argv
from schemas.codec import command_digest, decode_event, decode_outcome
from schemas.commands import CaptureHold, Command, OpenAccount, PlaceHold, Transfer, VoidHold, owner_account
from schemas.events import (
    CommandRejected,
    Deposited,
    Event,
    HoldCaptured,
    TransferCredited,
    TransferDebited,
    TransferRefunded,
    Withdrawn,
    event_type,
)
from schemas.outcomes import Outcome
from streams.core.money import canonical_minor, format_amount
from streams.core.state import State, fold
from tests.support.commands import edge

POSTGRES_URL_ENV = "WALLET_TEST_POSTGRES_URL"
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
POSTGRES_START_TIMEOUT_S = 60
# PostgreSQL refuses to run as root; CI runs as root and Debian's package creates this user.
POSTGRES_OS_USER = "postgres"


def _running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _postgres_bin_dir() -> Path | None:
    candidates = sorted(
        glob.glob(POSTGRES_BIN_GLOB),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
    )
    found = [Path(path) for path in candidates if (Path(path) / "initdb").exists()]
    return found[-1] if found else None


def _as_postgres_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        raise RuntimeError("running as root needs `runuser` to start PostgreSQL as the postgres user")
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *argv]


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(_as_postgres_user(argv), capture_output=True, text=True, timeout=POSTGRES_START_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """The postgresql:// URL of a server's `postgres` database, as a user who may create databases."""
    configured = os.environ.get(POSTGRES_URL_ENV)
    if configured:
        yield configured
        return
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        message = (
            f"no PostgreSQL server binaries ({POSTGRES_BIN_GLOB}/initdb): install Debian's `postgresql` "
            f"package or set {POSTGRES_URL_ENV}"
        )
        if _running_in_ci():
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp dir: that is private to the current user, and the server runs as postgres.
    base_dir = Path(tempfile.mkdtemp(prefix="wallet-readmodel-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base_dir, POSTGRES_OS_USER, POSTGRES_OS_USER)
    data_dir = base_dir / "data"
    (port,) = free_loopback_ports(1)
    _run(
        [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        "initdb",
    )
    # Durability settings off: a test server's data dies with the session anyway.
    server_options = (
        f"-p {port} -k {base_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off"
    )
    _run(
        [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data_dir),
            "-l",
            str(base_dir / "server.log"),
            "-o",
            server_options,
            "-w",
            "-t",
            str(POSTGRES_START_TIMEOUT_S),
            "start",
        ],
        "pg_ctl start",
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"], "pg_ctl stop")
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_db_url(db_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """`make_db_url()`: the URL of a new empty database of kind `db_kind`; dropped after the test."""
    created: list[tuple[str, str]] = []  # (server URL, database name)

    def make() -> str:
        name = f"readmodel_{uuid.uuid4().hex[:12]}"
        if db_kind == "sqlite":
            return f"sqlite:///{tmp_path / f'{name}.db'}"
        server_url = request.getfixturevalue("postgres_server_url")
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        created.append((server_url, name))
        return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))

    yield make
    for server_url, name in created:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(make_db_url: Callable[[], str]) -> str:
    """An empty read-model database: a SQLite file, or a fresh PostgreSQL database."""
    return make_db_url()


# The log the Kafka tests read: decided in-process by the core (benchmarks/support/reference_pipeline.py)
# and published to real topics, with transfers still in flight and one aborted transaction.

LOG_ACCOUNT_COUNT = 150
LOG_OPERATION_COUNT = 6_000
LOG_HELD_TRANSFER_COUNT = 3
LOG_HOLD_COUNT = 200
CATCH_UP_TIMEOUT_S = 60
KAFKA_READ_TIMEOUT_S = 30


@dataclass(frozen=True)
class PublishedLog:
    settings: Settings
    commands: list[Command]
    in_flight: frozenset[str]  # transfers debited whose outcome never comes
    # What a read_committed reader finds, read back from the broker: per partition, (offset, message).
    events: dict[int, list[tuple[int, Event]]]
    outcomes: dict[int, list[tuple[int, Outcome]]]

    @property
    def record_count(self) -> int:
        return sum(map(len, self.events.values())) + sum(map(len, self.outcomes.values()))


@pytest.fixture(scope="module")
def published_log(make_settings: Callable[..., Settings]) -> PublishedLog:
    settings = make_settings(4)
    commands = with_holds(
        workload(seed=11, account_count=LOG_ACCOUNT_COUNT, operation_count=LOG_OPERATION_COUNT),
        seed=11,
        count=LOG_HOLD_COUNT,
    )
    transfers = [command.transaction_id for command in commands if type(command) is Transfer]
    held = frozenset(transfers[-LOG_HELD_TRANSFER_COUNT:])
    log = decide(commands, settings.partitions, hold_legs_of=held)
    publish(settings, log, aborted_transaction_after=(log.event_count + log.outcome_count) // 2)
    return PublishedLog(
        settings,
        commands,
        frozenset(log.in_flight),
        read_back(settings, settings.events_topic, decode_event),
        read_back(settings, settings.outcomes_topic, decode_outcome),
    )


def with_holds(commands: list[Command], seed: int, count: int) -> list[Command]:
    """`commands` with `count` holds of its accounts mixed in, each with its later fate: captured in
    two parts (the second final), captured whole, voided, or left to expire (after 1 ms: the next
    command its partition decides expires it). Some are refused (funds, currencies, statuses)."""
    rng = random.Random(seed)
    opened = [(command.account_id, command.currency) for command in commands if type(command) is OpenAccount]
    placed: list[tuple[int, Command]] = []  # (position in `commands`, command), the later ones after
    for number in range(count):
        (payer, currency), (shop, _) = rng.sample(opened, 2)
        hold_id, fate = f"hold-{seed}-{number}", number % 4
        steps: list[Command] = [
            edge(
                PlaceHold,
                transaction_id=hold_id,
                account_id=payer,
                to_account=shop,
                amount=format_amount(rng.randint(100, 50_000), currency),
                currency=currency,
                expires_in_ms=1 if fate == 3 else 3_600_000,
            )
        ]
        settle = {"account_id": payer, "hold_id": hold_id}
        if fate == 0:
            part = format_amount(rng.randint(1, 100), currency)
            steps.append(edge(CaptureHold, transaction_id=f"{hold_id}.c1", amount=part, final=False, **settle))
            steps.append(edge(CaptureHold, transaction_id=f"{hold_id}.c2", amount=part, **settle))
        elif fate == 1:
            steps.append(edge(CaptureHold, transaction_id=f"{hold_id}.capture", **settle))
        elif fate == 2:
            steps.append(edge(VoidHold, transaction_id=f"{hold_id}.void", **settle))
        positions = sorted(rng.randrange(len(commands)) for _ in steps)
        placed.extend(zip(positions, steps, strict=True))
    mixed: list[Command] = []
    by_position: dict[int, list[Command]] = {}
    for position, command in placed:
        by_position.setdefault(position, []).append(command)
    for position, command in enumerate(commands):
        mixed.append(command)
        mixed.extend(by_position.get(position, ()))
    return mixed


def read_back(settings: Settings, topic: str, decode: Callable[[bytes], Any]) -> dict[int, list[tuple[int, Any]]]:
    """Every record a read_committed reader finds in `topic`, per partition, with its offset."""
    consumer = Consumer(
        {
            **kafka_security("admin"),
            "bootstrap.servers": settings.bootstrap,
            "group.id": f"{settings.topic_prefix}test-reader",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = range(len(consumer.list_topics(topic, timeout=KAFKA_READ_TIMEOUT_S).topics[topic].partitions))
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in partitions])
        records: dict[int, list[tuple[int, Any]]] = {partition: [] for partition in partitions}
        at_end: set[int] = set()
        deadline_s = time.monotonic() + KAFKA_READ_TIMEOUT_S
        while len(at_end) < len(records):
            assert time.monotonic() < deadline_s, f"{topic}: only partitions {at_end} reached their end"
            for message in consumer.consume(10_000, 0.2):
                error, partition, offset = message.error(), message.partition(), message.offset()
                # Records and partition-EOF events (the only errors expected) name both.
                assert partition is not None and offset is not None, error
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    at_end.add(partition)
                else:
                    value = message.value()
                    assert value is not None  # the wallet topics have no tombstones
                    records[partition].append((offset, decode(value)))
        return records
    finally:
        consumer.close()


def start_consumer_process(settings: Settings, db_url: str, log_path: Path, *extra: str) -> subprocess.Popen:
    """`wallet readmodel --db db_url *extra` in a process of its own, its output appended to `log_path`."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            wallet_argv(
                settings,
                "readmodel",
                "--db",
                db_url,
                *extra,
            ),
            cwd=PROJECT_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def consume_until_caught_up(
    store: ReadModelStore, settings: Settings, batch_size_max: int = 1_000, steps_max: int | None = None
) -> None:
    """Runs the read-model consumer in-process until its lag is 0 (or `steps_max` batches)."""
    consumer = ReadModelConsumer(store, settings, batch_size_max, batch_wait_ms=50)
    store.create_schema()
    consumer.start()
    admin = admin_client(settings.bootstrap)
    deadline_s = time.monotonic() + CATCH_UP_TIMEOUT_S
    steps = 0
    try:
        while steps_max is None or steps < steps_max:
            steps += 1
            if consumer.step() == 0 and sum(item.lag for item in read_lag(admin, settings, store.offsets())) == 0:
                break
            assert time.monotonic() < deadline_s, f"the read model did not catch up in {CATCH_UP_TIMEOUT_S} s"
    finally:
        consumer.close()


def expected_rows(log: PublishedLog, events_offsets: dict[int, int] | None = None) -> dict[str, list[tuple]]:
    """The accounts and entries rows of the fold of the events below `events_offsets` (per
    partition; all when None), computed from the events alone, not by the read model's code."""
    accounts: dict[str, tuple] = {}
    entries: list[tuple] = []
    for partition, records in log.events.items():
        state = State()
        upto = events_offsets.get(partition, 0) if events_offsets is not None else None
        for offset, event in records:
            if upto is not None and offset >= upto:
                break
            fold(state, event)
            if isinstance(event, CommandRejected):
                continue
            account = state.accounts[event.account_id]
            # Exactly the events with a sign move an amount.
            amount_minor = (
                _AMOUNT_SIGN[type(event)] * canonical_minor(event.amount, account.currency)
                if isinstance(event, _AMOUNT_EVENTS)
                else 0
            )
            counterparty = getattr(event, "to_account", None) or getattr(event, "from_account", None)
            entries.append(
                (
                    event.account_id,
                    event.seq,
                    event.transaction_id,
                    event_type(event),
                    amount_minor,
                    account.balance_minor,
                    counterparty,
                    event.ts_ms,
                )
            )
        for account_id, account in state.accounts.items():
            accounts[account_id] = (
                account_id,
                account.currency,
                account.kind,
                account.status,
                account.balance_minor,
                account.seq,
                getattr(account, "owner", ""),
                account.held_minor,
            )
    return {"accounts": sorted(accounts.values()), "entries": sorted(entries)}


def expected_transactions(log: PublishedLog) -> dict[tuple[str, str], tuple[str, str | None]]:
    """Each request's status, by (owning account, transaction id), from what the clients sent:
    the first answer carrying the digest of the first request under that id on that account,
    else pending if that request's transfer was debited."""
    original_digest: dict[tuple[str, str], str] = {}
    owner_of: dict[tuple[str, str], str] = {}  # (transaction id, digest) -> owning account
    for command in log.commands:
        owner, digest = owner_account(command), command_digest(command)
        original_digest.setdefault((owner, command.transaction_id), digest)
        owner_of[(command.transaction_id, digest)] = owner
    statuses: dict[tuple[str, str], tuple[str, str | None]] = {}
    for records in log.events.values():
        for _, event in records:
            key = (event.account_id, event.transaction_id)
            if type(event) is TransferDebited and event.digest == original_digest[key]:
                statuses[key] = ("pending", None)
    answered: set[tuple[str, str]] = set()
    for answers in log.outcomes.values():
        for _, outcome in answers:
            owner = getattr(outcome, "account_id", None) or owner_of[(outcome.transaction_id, outcome.digest)]
            key = (owner, outcome.transaction_id)
            if key not in answered and outcome.digest == original_digest[key]:
                statuses[key] = (outcome.status, outcome.reason)
                answered.add(key)
    return statuses


def stored_rows(store: ReadModelStore) -> dict[str, list[tuple]]:
    return {"accounts": sorted(store.table_rows("accounts")), "entries": sorted(store.table_rows("entries"))}


def stored_transactions(store: ReadModelStore) -> dict[tuple[str, str], tuple[str, str | None]]:
    rows = [TransactionRow(*row) for row in store.table_rows("transactions")]
    return {(row.account_id, row.transaction_id): (row.status, row.reason) for row in rows}


_AMOUNT_EVENTS = (Deposited, Withdrawn, TransferDebited, TransferCredited, TransferRefunded, HoldCaptured)
_AMOUNT_SIGN: dict[type, int] = {
    Deposited: 1,
    Withdrawn: -1,
    TransferDebited: -1,
    TransferCredited: 1,
    TransferRefunded: 1,
    HoldCaptured: -1,
}
