"""The read model's database layer, on SQLite and PostgreSQL: one transaction per batch, one writer."""
from __future__ import annotations

import msgspec
import pytest

from consumers.readmodel.consumer import ReadModelConsumer, ReadModelError
from consumers.readmodel.store import Batch, ConcurrentWriterError, ReadModelStore, TABLES
from schemas.events import MONEY_EVENTS
from schemas.outcomes import Outcome
from streams.core.state import CorruptLog
from benchmarks.support.reference_pipeline import decide, workload
from infra.settings import Settings

pytest_plugins = ["tests.readmodel_fixtures"]

EVENTS = ("t.events", 0)
OUTCOMES = ("t.outcomes", 0)


def _records():
    return decide(workload(seed=7, account_count=20, operation_count=300), partition_count=1).messages()


def _batch(records, start: int, end: int, before: int | None) -> Batch:
    chunk = records[start:end]
    return Batch(events=[r for r in chunk if type(r) is not Outcome], outcomes=[r for r in chunk if type(r) is Outcome],
                 offsets_before={EVENTS: before}, offsets_after={EVENTS: end})


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
    batch = Batch(events=[r for r in records if type(r) is not Outcome],
                  outcomes=[r for r in records if type(r) is Outcome],
                  offsets_before={EVENTS: None, OUTCOMES: None}, offsets_after={EVENTS: 170, OUTCOMES: 130})
    with ReadModelStore(db_url) as store:
        store.create_schema()
        changes = store.apply(batch)
        assert store.offsets() == {EVENTS: 170, OUTCOMES: 130}
        stored = {row[0]: row[1:3] for row in store.table_rows("transactions")}
        assert stored == {row.transaction_id: (row.status, row.reason) for row in changes.transactions}
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
