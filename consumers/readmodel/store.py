"""The read model's database: its schema, the one-transaction write of a batch with its offsets, and reads.

Two databases behind one class, chosen by URL: SQLite (a file, the default, no server;
`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`) and PostgreSQL
(`postgresql://user@host:port/dbname`). The SQL is shared; only connecting, bulk loading
and placeholders differ.

Exactly once: a batch's rows and the Kafka offsets it ends at are written in one database
transaction, and the consumer starts from the offsets stored here. The offset update is a
compare-and-set against the offsets the batch started from, so a second writer on the same
database (a stray consumer, a rebuild) makes one of them fail loudly instead of applying a
batch twice.

Shards (PostgreSQL only): several consumers, each owning some partitions, write one database.
Each claims its partitions with session advisory locks when it starts, so a second writer of a
partition is refused before it reads anything. An account's rows (account, entries, holds) and
a partition's offsets are written by the one shard that owns that partition; the only rows two
shards share are requests: a transfer's is written by its debit (the sender's partition), its
credit (the receiver's) and its outcome (keyed by transaction id, anywhere). A batch locks
every request it names before reading them, in key order (no deadlock between shards), so no
shard overwrites a status it has not read.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from consumers.readmodel.projection import (
    AccountRow,
    Changes,
    EntryRow,
    HoldRow,
    RequestKey,
    TransactionRow,
    project,
    requests_named,
)
from infra.settings import Settings
from schemas.commands import SHARD_MARK, SHARDS_MAX, shard_account_id
from schemas.events import HOLD_EVENTS, CommandRejected, Event, TransferCredited, TransferDebited, TransferRefunded
from schemas.outcomes import Outcome
from streams.core.state import PENDING

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
# SQLite allows 32766 bound values per statement; far fewer keeps each IN list cheap to plan.
SELECT_IN_CHUNK_SIZE = 500
SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_CHECKPOINT_PAGES = 16_384  # of the default 4 KiB

TABLES = ("accounts", "entries", "transactions", "holds", "offsets")
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS accounts (
        account_id TEXT PRIMARY KEY,
        currency TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        balance_minor BIGINT NOT NULL CHECK (balance_minor >= 0),
        sequence BIGINT NOT NULL CHECK (sequence >= 1),
        owner TEXT NOT NULL,
        held_minor BIGINT NOT NULL CHECK (held_minor >= 0 AND held_minor <= balance_minor))""",
    # One row per event that changed an account (`command_rejected` changes none).
    """CREATE TABLE IF NOT EXISTS entries (
        account_id TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        transaction_id TEXT NOT NULL,
        type TEXT NOT NULL,
        amount_minor BIGINT NOT NULL,
        balance_after_minor BIGINT NOT NULL CHECK (balance_after_minor >= 0),
        counterparty TEXT,
        ts_ms BIGINT NOT NULL,
        PRIMARY KEY (account_id, sequence))""",
    # The status of every client request (transfers and all the others). A request is its
    # owning account and its transaction id: the same id on two accounts is two requests.
    """CREATE TABLE IF NOT EXISTS transactions (
        account_id TEXT NOT NULL,
        transaction_id TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'success', 'failure')),
        reason TEXT,
        digest TEXT NOT NULL,
        actor TEXT,
        PRIMARY KEY (account_id, transaction_id))""",
    # Every request with a given transaction id, whatever its account (the batch's lookups, and
    # the caller's "my request T" when the caller does not name the account).
    "CREATE INDEX IF NOT EXISTS transactions_by_transaction_id ON transactions (transaction_id)",
    # Every hold, open or ended: keyed like a request, by the held (payer's) account and the hold id.
    """CREATE TABLE IF NOT EXISTS holds (
        account_id TEXT NOT NULL,
        hold_id TEXT NOT NULL,
        to_account TEXT NOT NULL,
        currency TEXT NOT NULL,
        amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
        captured_minor BIGINT NOT NULL CHECK (captured_minor >= 0),
        released_minor BIGINT NOT NULL CHECK (released_minor >= 0),
        state TEXT NOT NULL CHECK (state IN ('open', 'captured', 'voided', 'expired')),
        expires_ms BIGINT NOT NULL,
        placed_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        CHECK (captured_minor + released_minor <= amount_minor),
        PRIMARY KEY (account_id, hold_id))""",
    # The batch's lookups and the caller's "my hold H" name the hold id alone.
    "CREATE INDEX IF NOT EXISTS holds_by_hold_id ON holds (hold_id)",
    """CREATE TABLE IF NOT EXISTS offsets (
        topic TEXT NOT NULL,
        kafka_partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
        PRIMARY KEY (topic, kafka_partition))""",
)

_ACCOUNT_COLUMNS = AccountRow._fields
_ENTRY_COLUMNS = EntryRow._fields
_TRANSACTION_COLUMNS = TransactionRow._fields
_HOLD_COLUMNS = HoldRow._fields
_KEY_COLUMNS = {
    "accounts": ("account_id",),
    "transactions": ("account_id", "transaction_id"),
    "holds": ("account_id", "hold_id"),
}
# Columns added since the first layout: a database without them is dropped and rebuilt from
# the log (the read model is a projection; the log has everything).
_LAYOUT_PROBES = (
    "SELECT owner, held_minor FROM accounts WHERE 1 = 0",
    "SELECT account_id, actor FROM transactions WHERE 1 = 0",
    "SELECT hold_id FROM holds WHERE 1 = 0",
)

TopicPartitionKey = tuple[str, int]
# The first key of a partition's claim (an advisory lock; the second key is the partition).
_CLAIM_PREFIX = "wallet readmodel claim "


class OwnedHold(NamedTuple):
    """A hold with the owners of its two accounts ("" where the read model does not know one)."""

    hold: HoldRow
    owner: str  # of the held (payer's) account
    to_owner: str  # of the destination


class DatabaseUrlError(ValueError):
    pass


class ConcurrentWriterError(RuntimeError):
    """The stored offsets are not those this writer started from: someone else writes this database."""


@dataclass(slots=True)
class Batch:
    """Records of both topics in log order, and where each partition they came from starts and ends."""

    events: list[Event] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    # Per partition: the stored next offset the batch starts from (None: none stored yet)...
    offsets_before: dict[TopicPartitionKey, int | None] = field(default_factory=dict)
    # ...and the one it ends at, stored by the same transaction.
    offsets_after: dict[TopicPartitionKey, int] = field(default_factory=dict)

    @property
    def record_count(self) -> int:
        return len(self.events) + len(self.outcomes)


DB_URL_ENV = "WALLET_READMODEL_DB"


def db_url_of(given: str | None, settings: Settings) -> str:
    """The read model's database: the URL given, else `WALLET_READMODEL_DB`, else SQLite in the run folder."""
    return given or os.environ.get(DB_URL_ENV) or f"{SQLITE_PREFIX}{(settings.run_dir / 'readmodel.db').resolve()}"


def describe_db_url(db_url: str) -> str:
    """The URL without its password, for messages."""
    if db_url.startswith(POSTGRES_PREFIXES):
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(db_url)
        host, port = info.get("host", ""), info.get("port", "")
        return f"postgresql://{info.get('user', '')}@{host}:{port}/{info.get('dbname', '')}"
    return db_url


class _SQLite:
    integrity_error = sqlite3.IntegrityError
    takes_shards = False  # one writer at a time: the offsets' compare-and-set is the guard

    def __init__(self, db_url: str) -> None:
        self.path = Path(db_url[len(SQLITE_PREFIX) :])
        if not self.path.name:
            raise DatabaseUrlError(f"{db_url!r} names no file; use sqlite:///relative.db or sqlite:////absolute.db")

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are only the explicit ones of `transaction()`.
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # WAL: readers (the query API) never block the writer and see only committed batches.
        # synchronous=NORMAL: a commit survives the process being killed; a power cut may lose
        # the last commits but never tears one, so the tables stay a prefix of the log.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints (copying the WAL into the database, with an fsync) every 64 MB of WAL
        # rather than the default 4 MB: fewer fsyncs, about 10% more batches per second.
        connection.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")
        connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        return connection

    @staticmethod
    def sql(text: str) -> str:
        return text

    @contextmanager
    def transaction(self, connection: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so what the batch reads cannot change under it.
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @staticmethod
    def claim(connection: sqlite3.Connection, partitions: list[TopicPartitionKey]) -> None:
        pass  # a single shard: a second writer fails the offsets' compare-and-set

    @staticmethod
    def release(connection: sqlite3.Connection, partitions: list[TopicPartitionKey]) -> None:
        pass

    @staticmethod
    def lock_requests(cursor: Any, keys: list[RequestKey]) -> set[RequestKey]:
        return set()  # BEGIN IMMEDIATE holds the database's one write lock already

    @staticmethod
    def select_in(cursor: Any, table: str, key_column: str, columns: Sequence[str], keys: list[str]) -> list[tuple]:
        found: list[tuple] = []
        for start in range(0, len(keys), SELECT_IN_CHUNK_SIZE):
            chunk = keys[start : start + SELECT_IN_CHUNK_SIZE]
            cursor.execute(
                f"SELECT {', '.join(columns)} FROM {table} WHERE {key_column} IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.extend(cursor.fetchall())
        return found

    @staticmethod
    def insert_many(cursor: Any, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        placeholders = ", ".join("?" * len(columns))
        cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})", rows)

    @staticmethod
    def upsert_many(cursor: Any, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        placeholders = ", ".join("?" * len(columns))
        cursor.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) {_on_conflict_update(table, columns)}",
            rows,
        )


class _Postgres:
    takes_shards = True

    def __init__(self, db_url: str) -> None:
        # Imported here: loading libpq costs every `wallet` command and SQLite user 50 ms.
        import psycopg

        self._psycopg = psycopg
        self.integrity_error = psycopg.errors.IntegrityError
        self.db_url = db_url

    def connect(self) -> Any:
        # Autocommit mode: transactions are only the explicit ones of `transaction()`, and a
        # reader never sits idle inside one.
        connection = self._psycopg.connect(self.db_url, autocommit=True)
        # A server crash may lose the last commits, never tear one: their offsets go with them
        # and the consumer reads those records again, so waiting for the WAL flush buys nothing.
        connection.execute("SET synchronous_commit TO off")
        return connection

    @staticmethod
    def sql(text: str) -> str:
        return text.replace("?", "%s")

    @staticmethod
    @contextmanager
    def transaction(connection: Any) -> Iterator[None]:
        with connection.transaction():
            yield

    @classmethod
    def claim(cls, connection: Any, partitions: list[TopicPartitionKey]) -> None:
        # Session locks: held until released or until the connection ends, the process's death included.
        taken: list[TopicPartitionKey] = []
        for topic, partition in partitions:
            (granted,) = connection.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s), %s)", (_CLAIM_PREFIX + topic, partition)
            ).fetchone()
            if not granted:
                cls.release(connection, taken)
                raise ConcurrentWriterError(
                    f"{topic}[{partition}] is written by another read-model process of this database; "
                    "one process per shard (--shard I/N), and stop the consumers before a rebuild"
                )
            taken.append((topic, partition))

    @staticmethod
    def release(connection: Any, partitions: list[TopicPartitionKey]) -> None:
        for topic, partition in partitions:
            connection.execute("SELECT pg_advisory_unlock(hashtext(%s), %s)", (_CLAIM_PREFIX + topic, partition))

    @classmethod
    def lock_requests(cls, cursor: Any, keys: list[RequestKey]) -> set[RequestKey]:
        """Locks the rows of `keys` for the rest of the transaction, in key order, and returns the
        keys no row had: each gets a placeholder row, locked too, that the batch must overwrite.
        Waiting on another shard's lock ends when its batch commits; this one then reads its rows."""
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS request_keys_stage (account_id TEXT, transaction_id TEXT) "
            "ON COMMIT DELETE ROWS"
        )
        cls.insert_many(cursor, "request_keys_stage", ("account_id", "transaction_id"), keys)
        # DO UPDATE ... WHERE false locks an existing row without writing a new version of it.
        cursor.execute(
            f"INSERT INTO transactions (account_id, transaction_id, status, digest) "
            f"SELECT account_id, transaction_id, '{PENDING}', '' FROM request_keys_stage "
            "ORDER BY account_id, transaction_id "
            "ON CONFLICT (account_id, transaction_id) DO UPDATE SET status = excluded.status WHERE false "
            "RETURNING account_id, transaction_id"
        )
        return {(account_id, transaction_id) for account_id, transaction_id in cursor.fetchall()}

    @staticmethod
    def select_in(cursor: Any, table: str, key_column: str, columns: Sequence[str], keys: list[str]) -> list[tuple]:
        # One array parameter: the same statement text whatever the number of keys, so psycopg
        # prepares it once per connection; an IN list of 500 placeholders cost 30 ms a statement
        # to build and plan, a third of a live shard's time.
        cursor.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE {key_column} = ANY(%s)", (keys,))
        return cursor.fetchall()

    @staticmethod
    def insert_many(cursor: Any, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    @classmethod
    def upsert_many(cls, cursor: Any, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        # COPY into a staging table emptied at each commit, then one set-based upsert: an
        # order of magnitude faster than a statement per row.
        # Created in the batch's own transaction, so a rolled-back first batch cannot leave
        # the connection believing in a table that is gone.
        stage = f"{table}_stage"
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS")
        cls.insert_many(cursor, stage, columns, rows)
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {stage} "
            f"{_on_conflict_update(table, columns)}"
        )


def _on_conflict_update(table: str, columns: Sequence[str]) -> str:
    key = _KEY_COLUMNS[table]
    updated = ", ".join(f"{column} = excluded.{column}" for column in columns if column not in key)
    return f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updated}"


def _backend(db_url: str) -> _SQLite | _Postgres:
    if db_url.startswith(SQLITE_PREFIX):
        return _SQLite(db_url)
    if db_url.startswith(POSTGRES_PREFIXES):
        return _Postgres(db_url)
    raise DatabaseUrlError(f"unsupported database URL {db_url!r}: use sqlite:///path/file.db or postgresql://...")


class ReadModelStore:
    """One connection to the read model's database. Not shared between threads."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._backend = _backend(db_url)
        self._connection = self._backend.connect()
        self._sql = self._backend.sql

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ReadModelStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def takes_shards(self) -> bool:
        """Whether several shards may write this database at once (PostgreSQL)."""
        return self._backend.takes_shards

    def claim(self, partitions: list[TopicPartitionKey]) -> None:
        """Makes this connection the only writer of `partitions` until `release` or its end;
        raises ConcurrentWriterError if another holds one of them."""
        self._backend.claim(self._connection, partitions)

    def release(self, partitions: list[TopicPartitionKey]) -> None:
        self._backend.release(self._connection, partitions)

    def create_schema(self) -> None:
        """Creates the tables where missing; a read model of an older layout is dropped first, so
        the consumer rebuilds it from the first offset."""
        if self._has_old_layout():
            self.drop_schema()
        with self._backend.transaction(self._connection):
            cursor = self._connection.cursor()
            if isinstance(self._backend, _Postgres):
                # Two processes starting on a new database would otherwise race on CREATE TABLE.
                cursor.execute("SELECT pg_advisory_xact_lock(hashtext('wallet readmodel schema'))")
            for statement in _SCHEMA:
                cursor.execute(statement)

    def _has_old_layout(self) -> bool:
        try:
            self._connection.execute("SELECT 1 FROM offsets WHERE 1 = 0")
        except Exception:  # noqa: BLE001 - no table yet (each driver has its own error): a new database
            return False
        for probe in _LAYOUT_PROBES:
            try:
                self._connection.execute(probe)
            except Exception:  # noqa: BLE001 - a missing column or table: the older layout
                return True
        return False

    def drop_schema(self) -> None:
        with self._backend.transaction(self._connection):
            cursor = self._connection.cursor()
            for table in TABLES:
                cursor.execute(f"DROP TABLE IF EXISTS {table}")

    def transfers_in_flight(self, owns_account: Callable[[str], bool] | None = None) -> dict[str, tuple[int, int]]:
        """currency -> (transfers debited but neither credited nor refunded, their amount in minor units),
        over every entry stored (or those of the accounts `owns_account` names: a shard's share, which the
        other shards' shares complete): one scan of `entries`, for the read model's start."""
        debited, credited, refunded = (
            event_class.__struct_config__.tag for event_class in (TransferDebited, TransferCredited, TransferRefunded)
        )
        # Per account only for a shard's share: the whole read model's is one row per currency.
        account, by_account = ("''", "") if owns_account is None else ("accounts.account_id", ", accounts.account_id")
        rows = self._connection.execute(
            f"""SELECT accounts.currency, {account},
                       SUM(CASE WHEN entries.type = '{debited}' THEN 1 ELSE -1 END),
                       SUM(entries.amount_minor)
                FROM entries JOIN accounts ON accounts.account_id = entries.account_id
                WHERE entries.type IN ('{debited}', '{credited}', '{refunded}')
                GROUP BY accounts.currency{by_account}"""
        ).fetchall()
        totals: dict[str, tuple[int, int]] = {}
        for currency, account_id, count, signed_minor in rows:
            if owns_account is None or owns_account(account_id):
                count_before, minor_before = totals.get(currency, (0, 0))
                # A debit's entry is negative, a credit's or a refund's positive: what is in flight is minus the sum.
                totals[currency] = (count_before + int(count), minor_before - int(signed_minor))
        return totals

    def offsets(self) -> dict[TopicPartitionKey, int]:
        rows = self._connection.execute("SELECT topic, kafka_partition, next_offset FROM offsets").fetchall()
        return {(topic, partition): next_offset for topic, partition, next_offset in rows}

    def apply(self, batch: Batch) -> Changes:
        """Writes what `batch` changes and the offsets it ends at, in one transaction."""
        with self._backend.transaction(self._connection):
            cursor = self._connection.cursor()
            # Offsets first: in PostgreSQL this also locks their rows, so a concurrent writer
            # waits here and then fails the compare instead of reading rows we are changing.
            self._advance_offsets(cursor, batch)
            # Another shard may be writing the same requests: lock them before reading them.
            created = self._backend.lock_requests(cursor, sorted(requests_named(batch.events, batch.outcomes)))
            account_ids = {event.account_id for event in batch.events if type(event) is not CommandRejected}
            # Every stored request with a transaction id the batch names, whatever its account:
            # one indexed lookup per id, and a few rows more than needed at most.
            transaction_ids = {outcome.transaction_id for outcome in batch.outcomes}
            transaction_ids.update(event.transaction_id for event in batch.events)
            accounts = {
                row.account_id: row
                for row in self._select_in(cursor, "accounts", "account_id", _ACCOUNT_COLUMNS, account_ids, AccountRow)
            }
            transactions = {
                (row.account_id, row.transaction_id): row
                for row in self._select_in(
                    cursor, "transactions", "transaction_id", _TRANSACTION_COLUMNS, transaction_ids, TransactionRow
                )
                if (row.account_id, row.transaction_id) not in created  # a placeholder: no request stored
            }
            hold_ids = {event.hold_id for event in batch.events if isinstance(event, HOLD_EVENTS)}
            holds = {
                (row.account_id, row.hold_id): row
                for row in self._select_in(cursor, "holds", "hold_id", _HOLD_COLUMNS, hold_ids, HoldRow)
            }
            changes = project(accounts, transactions, batch.events, batch.outcomes, holds=holds)
            unwritten = created - {(row.account_id, row.transaction_id) for row in changes.transactions}
            assert not unwritten, f"placeholder requests the batch does not write: {sorted(unwritten)[:5]}"
            # The row tuples' fields are in the order of the column lists.
            if changes.entries:
                self._backend.insert_many(cursor, "entries", _ENTRY_COLUMNS, changes.entries)
            if changes.accounts:
                self._backend.upsert_many(cursor, "accounts", _ACCOUNT_COLUMNS, changes.accounts)
            if changes.transactions:
                self._backend.upsert_many(cursor, "transactions", _TRANSACTION_COLUMNS, changes.transactions)
            if changes.holds:
                self._backend.upsert_many(cursor, "holds", _HOLD_COLUMNS, changes.holds)
        return changes

    def _advance_offsets(self, cursor: Any, batch: Batch) -> None:
        for (topic, partition), next_offset in batch.offsets_after.items():
            expected = batch.offsets_before.get((topic, partition))
            if expected is None:
                try:
                    cursor.execute(
                        self._sql("INSERT INTO offsets (topic, kafka_partition, next_offset) VALUES (?, ?, ?)"),
                        (topic, partition, next_offset),
                    )
                except self._backend.integrity_error:
                    raise ConcurrentWriterError(
                        f"{topic}[{partition}]: another writer stored an offset first; "
                        f"one consumer (or rebuild) per database"
                    ) from None
                continue
            cursor.execute(
                self._sql(
                    "UPDATE offsets SET next_offset = ? WHERE topic = ? AND kafka_partition = ? AND next_offset = ?"
                ),
                (next_offset, topic, partition, expected),
            )
            if cursor.rowcount != 1:
                raise ConcurrentWriterError(
                    f"{topic}[{partition}]: the stored offset is no longer {expected}; another writer (a second "
                    f"consumer or a rebuild) changed this database; one consumer (or rebuild) per database"
                )

    def _select_in(
        self, cursor: Any, table: str, key_column: str, columns: Sequence[str], keys: set[str], row_class: type
    ) -> list:
        if not keys:
            return []
        return [row_class(*row) for row in self._backend.select_in(cursor, table, key_column, columns, list(keys))]

    # Reads, for the query API and the tests.

    def account(self, account_id: str) -> AccountRow | None:
        row = self._connection.execute(
            self._sql(f"SELECT {', '.join(_ACCOUNT_COLUMNS)} FROM accounts WHERE account_id = ?"), (account_id,)
        ).fetchone()
        return AccountRow(*row) if row is not None else None

    def shards_of(self, merchant_id: str) -> list[AccountRow]:
        """The shards 1.. of merchant `merchant_id` that the read model holds, in shard order."""
        shard_ids = {shard_account_id(merchant_id, index) for index in range(1, SHARDS_MAX)}
        rows = self._select_in(
            self._connection.cursor(), "accounts", "account_id", _ACCOUNT_COLUMNS, shard_ids, AccountRow
        )
        return sorted(rows, key=lambda row: int(row.account_id.rpartition(SHARD_MARK)[2]))

    def entries(self, account_id: str, limit: int, before_sequence: int | None = None) -> list[EntryRow]:
        """The account's entries, newest first, with a sequence below `before_sequence` if given."""
        below, parameters = (
            ("", (account_id, limit))
            if before_sequence is None
            else ("AND sequence < ? ", (account_id, before_sequence, limit))
        )
        rows = self._connection.execute(
            self._sql(
                f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM entries WHERE account_id = ? {below}"
                "ORDER BY sequence DESC LIMIT ?"
            ),
            parameters,
        ).fetchall()
        return [EntryRow(*row) for row in rows]

    def request(self, account_id: str, transaction_id: str) -> TransactionRow | None:
        """The request `transaction_id` of the account that owns it."""
        row = self._connection.execute(
            self._sql(
                f"SELECT {', '.join(_TRANSACTION_COLUMNS)} FROM transactions "
                "WHERE account_id = ? AND transaction_id = ?"
            ),
            (account_id, transaction_id),
        ).fetchone()
        return TransactionRow(*row) if row is not None else None

    def requests_visible_to(self, actor: str | None, transaction_id: str) -> list[TransactionRow]:
        """Every request with `transaction_id` that `actor` may see, by owning account: the ones
        it asked for and the ones of accounts it owns. `actor` None: every one (operators, audit).
        The caller decides who reads everything; this never widens what an actor sees."""
        if actor == "":
            return []  # no one: "" is the owner of accounts opened before contract v2
        columns = ", ".join(f"t.{column}" for column in _TRANSACTION_COLUMNS)
        if actor is None:
            rows = self._connection.execute(
                self._sql(f"SELECT {columns} FROM transactions t WHERE t.transaction_id = ? ORDER BY t.account_id"),
                (transaction_id,),
            ).fetchall()
        else:
            rows = self._connection.execute(
                self._sql(
                    f"SELECT {columns} FROM transactions t LEFT JOIN accounts a ON a.account_id = t.account_id "
                    "WHERE t.transaction_id = ? AND (t.actor = ? OR a.owner = ?) ORDER BY t.account_id"
                ),
                (transaction_id, actor, actor),
            ).fetchall()
        return [TransactionRow(*row) for row in rows]

    def holds_named(self, hold_id: str, actor: str | None) -> list[OwnedHold]:
        """Every hold `hold_id` that `actor` may see, by held account: those of accounts it owns and
        those destined to accounts it owns. `actor` None: every one (operators, audit). The caller
        decides who reads everything, and which of these it may act on."""
        if actor == "":
            return []  # no one: "" is the owner of accounts opened before contract v2
        columns = ", ".join(f"h.{column}" for column in _HOLD_COLUMNS)
        query = (
            f"SELECT {columns}, COALESCE(p.owner, ''), COALESCE(d.owner, '') FROM holds h "
            "LEFT JOIN accounts p ON p.account_id = h.account_id LEFT JOIN accounts d ON d.account_id = h.to_account "
            "WHERE h.hold_id = ?"
        )
        parameters: tuple[str, ...] = (hold_id,)
        if actor is not None:
            query += " AND (p.owner = ? OR d.owner = ?)"
            parameters = (hold_id, actor, actor)
        rows = self._connection.execute(self._sql(query + " ORDER BY h.account_id"), parameters).fetchall()
        width = len(_HOLD_COLUMNS)
        return [OwnedHold(HoldRow(*row[:width]), row[width], row[width + 1]) for row in rows]

    def account_holds(self, account_id: str, state: str | None, limit: int) -> list[HoldRow]:
        """The holds of an account (in one state if given), the latest placed first."""
        where, parameters = (
            ("", (account_id, limit)) if state is None else ("AND state = ? ", (account_id, state, limit))
        )
        rows = self._connection.execute(
            self._sql(
                f"SELECT {', '.join(_HOLD_COLUMNS)} FROM holds WHERE account_id = ? {where}"
                "ORDER BY placed_ms DESC, hold_id LIMIT ?"
            ),
            parameters,
        ).fetchall()
        return [HoldRow(*row) for row in rows]

    def table_rows(self, table: str) -> list[tuple]:
        """Every row of a table in primary-key order: for comparing two read models."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        order = {
            "accounts": "account_id",
            "entries": "account_id, sequence",
            "transactions": "account_id, transaction_id",
            "holds": "account_id, hold_id",
            "offsets": "topic, kafka_partition",
        }[table]
        return [tuple(row) for row in self._connection.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()]
