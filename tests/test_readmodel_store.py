"""The read model's database layer, on SQLite and PostgreSQL: one transaction per batch, one writer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from benchmarks.support.reference_pipeline import decide, workload
from consumers.readmodel.consumer import ReadModelConsumer, ReadModelError
from consumers.readmodel.projection import TS_MS_STORED_MAX
from consumers.readmodel.store import TABLES, Batch, ConcurrentWriterError, ReadModelStore
from infra.settings import Settings
from schemas.events import MONEY_EVENTS
from schemas.outcomes import Outcome
from streams.core.state import CorruptLog

pytest_plugins = ["tests.readmodel_fixtures"]

EVENTS = ("t.events", 0)
OUTCOMES = ("t.outcomes", 0)


def _records():
    return decide(workload(seed=7, account_count=20, operation_count=300), partition_count=1).messages()


def _batch(records, start: int, end: int, before: int | None) -> Batch:
    chunk = records[start:end]
    return Batch(
        events=[r for r in chunk if type(r) is not Outcome],
        outcomes=[r for r in chunk if type(r) is Outcome],
        offsets_before={EVENTS: before},
        offsets_after={EVENTS: end},
    )


def _snapshot(store: ReadModelStore) -> dict[str, list[tuple]]:
    return {table: store.table_rows(table) for table in TABLES}


def test_a_batch_that_fails_midway_leaves_neither_its_rows_nor_its_offsets(db_url: str) -> None:
    records = _records()
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(_batch(records, 0, 200, None))
        before = _snapshot(store)
        assert before["entries"] and before["offsets"] == [(*EVENTS, 200)]

        # A good first half, then an event whose balance does not follow: the whole batch must go.
        broken = list(records[200:400])
        last_money = max(i for i, r in enumerate(broken) if type(r) in MONEY_EVENTS)
        broken[last_money] = msgspec.structs.replace(broken[last_money], balance="99999.99")
        with pytest.raises(CorruptLog):
            store.apply(_batch(broken, 0, 200, 200))
        assert _snapshot(store) == before

        store.apply(_batch(records, 200, 400, 200))
        assert store.offsets() == {EVENTS: 400}


def test_a_second_writer_cannot_apply_a_batch_from_offsets_it_did_not_read(db_url: str) -> None:
    records = _records()
    with ReadModelStore(db_url) as first, ReadModelStore(db_url) as second:
        first.create_schema()
        first.apply(_batch(records, 0, 100, None))
        after_first = _snapshot(first)

        with pytest.raises(ConcurrentWriterError):
            second.apply(_batch(records, 0, 100, None))  # believes nothing is stored yet
        with pytest.raises(ConcurrentWriterError):
            second.apply(_batch(records, 50, 150, 50))  # believes the batch starts at 50
        assert _snapshot(second) == after_first

        second.apply(_batch(records, 100, 150, 100))
        assert second.offsets() == {EVENTS: 150}


def test_outcomes_and_events_of_one_batch_advance_their_own_partitions(db_url: str) -> None:
    records = _records()[:300]
    batch = Batch(
        events=[r for r in records if type(r) is not Outcome],
        outcomes=[r for r in records if type(r) is Outcome],
        offsets_before={EVENTS: None, OUTCOMES: None},
        offsets_after={EVENTS: 170, OUTCOMES: 130},
    )
    with ReadModelStore(db_url) as store:
        store.create_schema()
        changes = store.apply(batch)
        assert store.offsets() == {EVENTS: 170, OUTCOMES: 130}
        stored = {row[:2]: row[2:4] for row in store.table_rows("transactions")}
        assert stored == {
            (row.account_id, row.transaction_id): (row.status, row.reason) for row in changes.transactions
        }
        assert len(store.table_rows("entries")) == len(changes.entries)


def test_a_database_holding_another_prefixs_topics_is_refused(db_url: str) -> None:
    records = _records()
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(_batch(records, 0, 10, None))  # offsets of topic "t.events"
        # Refused before any broker is contacted, so no broker is needed here.
        consumer = ReadModelConsumer(store, Settings().with_overrides(topic_prefix="other."))
        with pytest.raises(ReadModelError, match=r"other topics \['t.events'\]"):
            consumer.start()


def test_an_event_time_beyond_what_the_database_holds_is_stored_clamped_and_the_read_model_goes_on(db_url: str) -> None:
    records = _records()
    first_money = next(i for i, r in enumerate(records) if type(r) in MONEY_EVENTS)
    huge = list(records[: first_money + 1])
    huge[first_money] = msgspec.structs.replace(huge[first_money], ts_ms=2**63)  # past int64 and year 9999
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(_batch(huge, 0, len(huge), None))
        [entry] = [e for e in store.entries(huge[first_money].account_id, 10) if e.sequence == huge[first_money].seq]
        assert entry.ts_ms == TS_MS_STORED_MAX
        assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=entry.ts_ms) < datetime.max.replace(tzinfo=UTC)
        store.apply(_batch(records, len(huge), len(huge) + 50, len(huge)))  # what follows is applied as ever
        assert store.offsets() == {EVENTS: len(huge) + 50}


def test_a_request_is_looked_up_by_its_account_and_never_answers_for_another(db_url: str) -> None:
    from schemas.commands import Deposit, OpenAccount, Withdraw
    from tests.support.commands import edge

    log = decide(
        [
            edge(OpenAccount, transaction_id="o1", account_id="alice", currency="USD"),
            edge(OpenAccount, transaction_id="o2", account_id="bob", currency="USD"),
            edge(Deposit, transaction_id="T", account_id="alice", amount="10.00", currency="USD"),
            edge(Withdraw, transaction_id="T", account_id="bob", amount="10.00", currency="USD"),
            edge(Deposit, transaction_id="only-alice", account_id="alice", amount="1.00", currency="USD"),
        ],
        partition_count=1,
    )
    records = log.messages()
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(_batch(records, 0, len(records), None))
        alice = store.request("alice", "T")
        assert alice is not None and alice.status == "success"
        bob = store.request("bob", "T")
        assert bob is not None and (bob.status, bob.reason) == ("failure", "insufficient_funds")
        assert store.request("carol", "T") is None
        assert [row.account_id for row in store.requests_visible_to(None, "T")] == ["alice", "bob"]
        assert store.requests_visible_to("", "T") == []  # "" is nobody, never "every account without an owner"


def test_a_read_model_of_the_first_layout_is_dropped_so_the_consumer_rebuilds_it(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE transactions (transaction_id TEXT PRIMARY KEY, status TEXT NOT NULL, "
            "reason TEXT, digest TEXT NOT NULL)"
        )
        connection.execute(
            "CREATE TABLE offsets (topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, "
            "next_offset BIGINT NOT NULL, PRIMARY KEY (topic, kafka_partition))"
        )
        connection.execute("INSERT INTO offsets VALUES ('t.events', 0, 99)")
    with ReadModelStore(f"sqlite:///{path}") as store:
        store.create_schema()
        assert store.offsets() == {}  # from the first offset again, into the new tables
        records = _records()
        store.apply(_batch(records, 0, 50, None))
        assert store.offsets() == {EVENTS: 50}


def test_holds_are_stored_and_found_by_id_for_the_owners_of_their_two_accounts(db_url: str) -> None:
    from schemas.commands import CaptureHold, Deposit, OpenAccount, PlaceHold, VoidHold
    from tests.support.commands import edge

    def place(hold_id: str, account_id: str, amount: str):
        return edge(
            PlaceHold,
            transaction_id=hold_id,
            account_id=account_id,
            to_account="shop",
            amount=amount,
            currency="USD",
            expires_in_ms=60_000,
            actor="alice",
        )

    log = decide(
        [
            edge(OpenAccount, transaction_id="o1", account_id="alice", currency="USD", actor="alice"),
            edge(OpenAccount, transaction_id="o2", account_id="alice-2", currency="USD", actor="alice"),
            edge(OpenAccount, transaction_id="o3", account_id="shop", currency="USD", actor="bob"),
            edge(Deposit, transaction_id="d1", account_id="alice", amount="50.00", currency="USD"),
            edge(Deposit, transaction_id="d2", account_id="alice-2", amount="50.00", currency="USD"),
            place("H", "alice", "20.00"),
            place("H", "alice-2", "5.00"),
            place("only-alice", "alice", "1.00"),
            edge(CaptureHold, transaction_id="c1", account_id="alice", hold_id="H", amount="2.00", actor="alice"),
            edge(VoidHold, transaction_id="v1", account_id="alice-2", hold_id="H", actor="alice"),
        ],
        partition_count=1,
    )
    records = log.messages()
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(_batch(records, 0, len(records), None))
        by_key = {(row[0], row[1]): row for row in store.table_rows("holds")}
        assert set(by_key) == {("alice", "H"), ("alice-2", "H"), ("alice", "only-alice")}
        alice_h = store.holds_named("H", "alice")
        assert [(owned.hold.account_id, owned.owner, owned.to_owner) for owned in alice_h] == [
            ("alice", "alice", "bob"),
            ("alice-2", "alice", "bob"),
        ]
        assert (alice_h[0].hold.captured_minor, alice_h[0].hold.state) == (200, "captured")
        assert (alice_h[1].hold.released_minor, alice_h[1].hold.state) == (500, "voided")
        assert [owned.hold.account_id for owned in store.holds_named("H", "bob")] == ["alice", "alice-2"]
        assert store.holds_named("H", "carol") == [] and store.holds_named("H", "") == []
        assert len(store.holds_named("H", None)) == 2
        assert [row.hold_id for row in store.account_holds("alice", "open", 10)] == ["only-alice"]
        assert {row.hold_id for row in store.account_holds("alice", None, 10)} == {"H", "only-alice"}
        account = store.account("alice")
        assert account is not None and (account.balance_minor, account.held_minor) == (4800, 100)


def test_a_shards_share_of_the_money_in_flight_counts_the_transfer_entries_of_its_own_accounts(db_url: str) -> None:
    records = _records()
    with ReadModelStore(db_url) as store:
        store.create_schema()
        store.apply(_batch(records, 0, len(records), None))
        currency_of = {row[0]: row[1] for row in store.table_rows("accounts")}
        owned = set(sorted(currency_of)[::2])
        expected: dict[str, list[int]] = {}
        for account_id, _, _, kind, amount_minor, *_ in store.table_rows("entries"):
            sign = {"transfer_debited": 1, "transfer_credited": -1, "transfer_refunded": -1}.get(kind)
            if sign is not None and account_id in owned:
                totals = expected.setdefault(currency_of[account_id], [0, 0])
                totals[0] += sign
                totals[1] -= amount_minor
        share = store.transfers_in_flight(owned.__contains__)
        assert share == {currency: (count, minor) for currency, (count, minor) in expected.items()}
        rest = store.transfers_in_flight(lambda account_id: account_id not in owned)
        whole = store.transfers_in_flight()
        assert share != whole
        added = {
            currency: tuple(map(sum, zip(share.get(currency, (0, 0)), rest.get(currency, (0, 0)), strict=True)))
            for currency in whole
        }
        assert added == whole
