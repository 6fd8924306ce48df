"""`wallet audit` against a real broker: a clean log passes, and each tampered copy is caught and named.

The clean log is the core's own decisions on a scenario that exercises every kind of command
(opens, deposits, withdrawals, transfers within and across partitions, transfers refunded
because the receiver is missing, frozen, in another currency or not a merchant, insufficient
funds, retried and conflicting duplicates, a poison record and a misrouted one, forwarded), computed by
the reference pipeline and written to real topics. Each tampered copy changes one thing and
is written to fresh topics. The logs are written in one Kafka transaction, so an event's
offset is its position in its partition's list.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import uuid
from typing import Any

import msgspec
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks.support.reference_pipeline import Record, ReferenceLog, decide, publish, raw_command
from consumers.audit import run_audit
from consumers.audit.balance import balance_at, parse_time_ms
from consumers.audit.snapshots import accounts_view
from consumers.audit.violations import Kind
from infra.log_reader import read_topic
from schemas.codec import SchemaError, decode_command, decode_event, decode_outcome, encode
from schemas.commands import (
    Command,
    CreditLeg,
    Deposit,
    Freeze,
    OpenAccount,
    PayMerchant,
    RefundLeg,
    Transfer,
    Withdraw,
)
from schemas.events import CommandRejected, Deposited, TransferCredited, TransferRefunded
from schemas.partitioning import KAFKA_PARTITIONER, partition_for
from streams.core.money import canonical_balance_minor, format_amount
from streams.core.state import State, fold
from tests.support.commands import edge
from wallet.cli import main

PARTITIONS = 4
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STEP_MS = 1_000


def _pick_accounts() -> dict[str, str]:
    """Account ids by role, chosen so that the roles that must share a partition do, and the
    others do not."""
    names = [f"acct-{index:02d}" for index in range(200)]
    by_partition: dict[int, list[str]] = {}
    for name in names:
        by_partition.setdefault(partition_for(name, PARTITIONS), []).append(name)
    first, second, third = by_partition[0], by_partition[1], by_partition[2]
    return {
        "alice": first[0],
        "bob": first[1],
        "carol": second[0],
        "euro": third[0],
        "frozen": second[1],
        "shop": third[1],
        "inflight_src": first[2],
        "inflight_dst": second[2],
        "refund_src": third[2],
        "ghost": "acct-never-opened",
    }


ACCOUNTS = _pick_accounts()


def _scenario() -> list:
    a = ACCOUNTS
    ts = iter(range(START_MS, START_MS + 1_000 * STEP_MS, STEP_MS))

    def t() -> int:
        return next(ts)

    conflict_source = edge(
        Transfer, transaction_id="t-a-c", from_account=a["alice"], to_account=a["carol"], amount="7.50", currency="USD"
    )
    commands: list[Command | Record] = [
        edge(
            OpenAccount,
            transaction_id=f"open-{role}",
            account_id=a[role],
            currency="EUR" if role == "euro" else "USD",
            kind="merchant" if role == "shop" else "user",
        )
        for role in ("alice", "bob", "carol", "euro", "frozen", "shop", "inflight_src", "inflight_dst", "refund_src")
    ]
    commands += [
        edge(
            Deposit,
            transaction_id=f"fund-{role}",
            account_id=a[role],
            amount=amount,
            currency="EUR" if role == "euro" else "USD",
        )
        for role, amount in (
            ("alice", "100.00"),
            ("bob", "50.00"),
            ("carol", "20.00"),
            ("euro", "30.00"),
            ("frozen", "10.00"),
            ("inflight_src", "40.00"),
            ("refund_src", "25.00"),
        )
    ]
    commands += [
        edge(Withdraw, transaction_id="w-alice", account_id=a["alice"], amount="10.00", currency="USD"),
        edge(
            Transfer,
            transaction_id="t-a-b",
            from_account=a["alice"],
            to_account=a["bob"],
            amount="5.00",
            currency="USD",
        ),  # within one partition
        conflict_source,  # across partitions
        edge(
            Transfer,
            transaction_id="t-b-a",
            from_account=a["bob"],
            to_account=a["alice"],
            amount="1.00",
            currency="USD",
        ),
        edge(Freeze, transaction_id="freeze", account_id=a["frozen"]),
        edge(
            Transfer,
            transaction_id="t-to-frozen",
            from_account=a["carol"],
            to_account=a["frozen"],
            amount="2.00",
            currency="USD",
        ),
        edge(
            Transfer,
            transaction_id="t-to-euro",
            from_account=a["alice"],
            to_account=a["euro"],
            amount="3.00",
            currency="USD",
        ),
        edge(
            Transfer,
            transaction_id="t-too-much",
            from_account=a["carol"],
            to_account=a["alice"],
            amount="1000.00",
            currency="USD",
        ),
        conflict_source,  # a client retry: the first answer again
        msgspec.structs.replace(conflict_source, amount="8.00"),  # same id, other payload
        edge(
            PayMerchant,
            transaction_id="pay-shop",
            from_account=a["alice"],
            to_account=a["shop"],
            amount="4.00",
            currency="USD",
        ),
        edge(
            PayMerchant,
            transaction_id="pay-bob",
            from_account=a["alice"],
            to_account=a["bob"],
            amount="1.00",
            currency="USD",
        ),  # not a merchant: refunded
        edge(Withdraw, transaction_id="w-bob-too-much", account_id=a["bob"], amount="1000.00", currency="USD"),
        raw_command(a["alice"], b'{"type": "deposit", "not": "a command"}'),
        # A deposit for carol keyed by alice: lands on alice's partition, which does not own carol,
        # dead-letters it and forwards it to carol's, which decides it (1.00 of the deposits).
        raw_command(
            a["alice"],
            encode(edge(Deposit, transaction_id="misrouted", account_id=a["carol"], amount="1.00", currency="USD")),
        ),
        edge(
            Transfer,
            transaction_id="t-refund",
            from_account=a["refund_src"],
            to_account=a["ghost"],
            amount="5.00",
            currency="USD",
        ),
        edge(
            Transfer,
            transaction_id="t-inflight",
            from_account=a["inflight_src"],
            to_account=a["inflight_dst"],
            amount="6.00",
            currency="USD",
        ),
    ]
    return commands


DEPOSITED_USD, WITHDRAWN_USD = "246.00", "10.00"


@pytest.fixture(scope="module")
def clean_log() -> ReferenceLog:
    log = decide(_scenario(), PARTITIONS)
    assert len(log.dead_letters) == 2  # the poison record and the misrouted one
    return log


def _written(make_settings, log: ReferenceLog):
    settings = make_settings(PARTITIONS)
    publish(settings, log)
    return settings


@pytest.fixture(scope="module")
def clean_settings(make_settings, clean_log: ReferenceLog):
    settings = _written(make_settings, clean_log)
    _write_aborted_forgery(settings, clean_log)
    return settings


def _write_aborted_forgery(settings, log: ReferenceLog) -> None:
    """A deposit continuing alice's sequence, written in a transaction that is aborted: a
    read_committed reader must never see it."""
    partition, _, last = [item for item in _events_of(log, ACCOUNTS["alice"]) if hasattr(item[2], "seq")][-1]
    forged = Deposited(
        account_id=last.account_id,
        transaction_id="aborted-forgery",
        ts_ms=last.ts_ms,
        command="deposit",
        actor="bank",
        digest="0" * 24,
        seq=last.seq + 1,
        amount="1000.00",
        currency="USD",
        balance="99999.00",
    )
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap,
            "partitioner": KAFKA_PARTITIONER,
            "transactional.id": f"{settings.topic_prefix}forger-{uuid.uuid4().hex[:6]}",
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(settings.events_topic, encode(forged), last.account_id.encode(), partition)
    producer.flush(30)
    producer.abort_transaction(30)


def _events_of(log: ReferenceLog, account_id: str) -> list[tuple[int, int, Any]]:
    """(partition, position, event) of every event of an account, in log order. The event is Any:
    the tests pick events by their fields (hasattr), which mypy cannot follow through the tuple."""
    partition = partition_for(account_id, log.partition_count)
    return [
        (partition, position, event)
        for position, record in enumerate(log.events[partition])
        if (event := decode_event(record.value)).account_id == account_id
    ]


def _tampered(log: ReferenceLog) -> ReferenceLog:
    return copy.deepcopy(log)


def _record(event) -> Record:
    return Record(event.account_id.encode(), encode(event))


def _only(report, kind: str):
    found = report.of_kind(kind)
    assert found, f"no {kind} in {[(v.kind, v.message) for v in report.violations]}"
    return found[0]


# -- the clean log ------------------------------------------------------------------------------


def test_clean_log_passes_every_check_and_proves_the_totals(clean_settings, clean_log):
    dump = {
        "partitions": {
            str(p): {"events_offset": len(clean_log.events[p]), "accounts": accounts_view(clean_log.states[p])}
            for p in range(PARTITIONS)
        }
    }
    report = run_audit(clean_settings, state_dumps=[dump], settled=True)

    assert report.passed, report.render_text()
    assert report.events_replayed == clean_log.event_count  # the aborted forgery is not read
    assert report.snapshots_compared == PARTITIONS
    usd = next(row for row in report.currencies if row.currency == "USD").to_json()
    assert (usd["deposited"], usd["withdrawn"], usd["in_flight"]) == (DEPOSITED_USD, WITHDRAWN_USD, "0.00")
    assert usd["balances"] == "236.00" and usd["holds"]
    assert report.in_flight == []
    assert report.determinism.events_reproduced == clean_log.event_count
    assert report.determinism.commands_dead_lettered == 2
    assert "RESULT: PASS" in report.render_text()


def test_cli_exit_code_and_json_report(clean_settings, tmp_path, capsys):
    prefix = ["--bootstrap", clean_settings.bootstrap, "--topic-prefix", clean_settings.topic_prefix]
    assert main([*prefix, "audit", "--json", "--no-progress"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["passed"] and document["violation_count"] == 0 and document["events_replayed"] > 0
    # Who moved money: every money event, with its actor.
    movements = document["movements"]
    assert {movement["type"] for movement in movements} == {
        "deposited",
        "withdrawn",
        "transfer_debited",
        "transfer_credited",
        "transfer_refunded",
    }
    assert all(
        set(movement) >= {"account_id", "transaction_id", "amount", "currency", "actor", "offset"}
        for movement in movements
    )

    dump_file = tmp_path / "dump.json"
    dump_file.write_text(json.dumps({"partitions": {"0": {"events_offset": 1, "accounts": {}}}}))
    assert main([*prefix, "audit", "--no-determinism", "--no-progress", "--state-dump", str(dump_file)]) == 1
    assert "state_dump_mismatch" in capsys.readouterr().out


# -- tampered copies ----------------------------------------------------------------------------


def test_forged_credit_without_debit_is_named(make_settings, clean_log):
    log = _tampered(clean_log)
    partition, position, last = next(
        item for item in reversed(_events_of(log, ACCOUNTS["bob"])) if hasattr(item[2], "balance")
    )
    balance_minor = canonical_balance_minor(last.balance, "USD") + 50_000
    forged = TransferCredited(
        account_id=last.account_id,
        transaction_id="forged-credit",
        ts_ms=last.ts_ms,
        command="credit_leg",
        actor=ACCOUNTS["carol"],
        digest="f" * 24,
        seq=last.seq + 1,
        amount="500.00",
        currency="USD",
        balance=format_amount(balance_minor, "USD"),
        from_account=ACCOUNTS["carol"],
        issued_ms=last.ts_ms,
    )
    log.events[partition].insert(position + 1, _record(forged))

    report = run_audit(_written(make_settings, log))

    found = _only(report, Kind.CREDIT_WITHOUT_DEBIT)
    assert (found.partition, found.offset, found.account_id, found.transaction_id) == (
        partition,
        position + 1,
        ACCOUNTS["bob"],
        "forged-credit",
    )
    assert "500.00 created" in _only(report, Kind.CONSERVATION).message
    assert _only(report, Kind.NONDETERMINISTIC).offset == position + 1  # no command decides it
    assert _only(report, Kind.DECISION_WITHOUT_OUTCOME).transaction_id == "forged-credit"


def test_skipped_sequence_number_is_named(make_settings, clean_log):
    log = _tampered(clean_log)
    events = [item for item in _events_of(log, ACCOUNTS["alice"]) if type(item[2]) is not CommandRejected]
    partition, first_position, first = events[3]
    for partition, position, event in events[3:]:  # from the 4th event on, every seq is one higher
        log.events[partition][position] = _record(msgspec.structs.replace(event, seq=event.seq + 1))

    report = run_audit(_written(make_settings, log))

    found = _only(report, Kind.SEQ_GAP)
    assert (found.partition, found.offset, found.account_id, found.transaction_id) == (
        partition,
        first_position,
        ACCOUNTS["alice"],
        first.transaction_id,
    )
    assert len(report.of_kind(Kind.SEQ_GAP)) == 1  # the events after it follow the gap: one finding
    assert not report.of_kind(Kind.BALANCE_MISMATCH) and not report.of_kind(Kind.CONSERVATION)


def test_duplicated_event_is_named(make_settings, clean_log):
    log = _tampered(clean_log)
    partition, position, event = _events_of(log, ACCOUNTS["carol"])[2]
    log.events[partition].insert(position + 1, log.events[partition][position])

    report = run_audit(_written(make_settings, log))

    found = _only(report, Kind.SEQ_REPEATED)
    assert (found.partition, found.offset, found.account_id, found.transaction_id) == (
        partition,
        position + 1,
        ACCOUNTS["carol"],
        event.transaction_id,
    )
    assert not report.of_kind(Kind.CONSERVATION)  # the duplicate is not folded: no money counted twice


def test_balance_that_does_not_follow_is_named(make_settings, clean_log):
    log = _tampered(clean_log)
    partition, position, deposit = next(
        item for item in _events_of(log, ACCOUNTS["alice"]) if type(item[2]) is Deposited
    )
    log.events[partition][position] = _record(msgspec.structs.replace(deposit, balance="1100.00"))

    report = run_audit(_written(make_settings, log))

    found = _only(report, Kind.BALANCE_MISMATCH)
    assert (found.partition, found.offset, found.account_id, found.transaction_id) == (
        partition,
        position,
        ACCOUNTS["alice"],
        deposit.transaction_id,
    )
    assert len(report.of_kind(Kind.BALANCE_MISMATCH)) == 1  # the next events follow the amounts again
    assert _only(report, Kind.NONDETERMINISTIC).offset == position


def _drop(records: list[Record], predicate) -> None:
    """Removes the one record matching `predicate`."""
    [position] = [index for index, record in enumerate(records) if predicate(record)]
    del records[position]


def _is(message, message_class: type[Any], transaction_id: str) -> bool:
    return type(message) is message_class and message.transaction_id == transaction_id


def _command_or_none(value: bytes):
    try:
        return decode_command(value)
    except SchemaError:
        return None  # the scenario's poison record


def test_debit_without_outcome_is_in_flight_and_a_violation_only_when_settled(make_settings, clean_log):
    log = _tampered(clean_log)
    destination = partition_for(ACCOUNTS["inflight_dst"], PARTITIONS)
    # The credit leg never arrived: no leg command, no credit, no outcome.
    _drop(log.commands[destination], lambda r: _is(_command_or_none(r.value), CreditLeg, "t-inflight"))
    _drop(log.events[destination], lambda r: _is(decode_event(r.value), TransferCredited, "t-inflight"))
    outcomes = log.outcomes[partition_for("t-inflight", PARTITIONS)]
    _drop(outcomes, lambda r: decode_outcome(r.value).transaction_id == "t-inflight")
    settings = _written(make_settings, log)

    report = run_audit(settings)
    assert report.passed, report.render_text()
    [flying] = report.in_flight
    assert (flying.transaction_id, flying.amount, flying.from_account) == (
        "t-inflight",
        "6.00",
        ACCOUNTS["inflight_src"],
    )
    assert next(row for row in report.currencies if row.currency == "USD").in_flight_minor == 600

    settled = run_audit(settings, settled=True, check_determinism=False)
    found = _only(settled, Kind.IN_FLIGHT_WHEN_SETTLED)
    assert (found.account_id, found.transaction_id) == (ACCOUNTS["inflight_src"], "t-inflight")


def test_failure_outcome_without_refund_is_named(make_settings, clean_log):
    log = _tampered(clean_log)
    source = partition_for(ACCOUNTS["refund_src"], PARTITIONS)
    # The refund leg was never decided: no refund event, yet the failure outcome is there.
    _drop(log.events[source], lambda r: _is(decode_event(r.value), TransferRefunded, "t-refund"))
    _drop(log.commands[source], lambda r: r.key is not None and _is(_command_or_none(r.value), RefundLeg, "t-refund"))

    report = run_audit(_written(make_settings, log))

    found = _only(report, Kind.OUTCOME_BEFORE_SETTLEMENT)
    assert (found.topic, found.transaction_id) == (report.topics[1].topic, "t-refund")
    assert "has no refund" in found.message
    assert [flying.transaction_id for flying in report.in_flight] == ["t-refund"]  # refund pending


def test_event_the_commands_do_not_reproduce_is_named(make_settings, clean_log):
    log = _tampered(clean_log)
    partition, position, deposit = next(
        item for item in _events_of(log, ACCOUNTS["carol"]) if type(item[2]) is Deposited
    )
    # One millisecond later: the fold, the sequences and the money all still agree.
    log.events[partition][position] = _record(msgspec.structs.replace(deposit, ts_ms=deposit.ts_ms + 1))

    report = run_audit(_written(make_settings, log))

    assert report.kinds() == {Kind.NONDETERMINISTIC}
    found = report.violations[0]
    assert (found.partition, found.offset, found.account_id, found.transaction_id) == (
        partition,
        position,
        ACCOUNTS["carol"],
        deposit.transaction_id,
    )


def test_state_dump_that_differs_from_the_fold_is_named(clean_settings, clean_log, tmp_path):
    bob = ACCOUNTS["bob"]
    partition = partition_for(bob, PARTITIONS)
    position = _events_of(clean_log, bob)[2][1]
    # The dump of a processor that had folded the partition up to bob's third event, with bob's
    # balance off by one cent.
    state = State()
    for record in clean_log.events[partition][: position + 1]:
        fold(state, decode_event(record.value))
    accounts = accounts_view(state)
    true_balance = accounts[bob]["balance"]
    accounts[bob]["balance"] = format_amount(state.accounts[bob].balance_minor - 1, "USD")
    dump_file = tmp_path / "dump.json"
    dump_file.write_text(
        json.dumps({"partitions": {str(partition): {"events_offset": position + 1, "accounts": accounts}}})
    )

    report = run_audit(clean_settings, state_dumps=[dump_file], check_determinism=False)

    assert report.kinds() == {Kind.snapshot_mismatch("state_dump")}
    found = report.violations[0]
    assert (found.partition, found.offset, found.account_id) == (partition, position + 1, bob)
    assert f"balance {accounts[bob]['balance']!r}, the log gives {true_balance!r}" in found.message


def test_read_model_is_compared_with_the_fold(clean_settings, tmp_path):
    from consumers.readmodel.rebuild import rebuild
    from consumers.readmodel.store import ReadModelStore

    db_url = f"sqlite:///{tmp_path / 'readmodel.db'}"
    with ReadModelStore(db_url) as store:
        rebuild(store, clean_settings, show_progress=False)
    assert run_audit(clean_settings, readmodel_db=db_url, check_determinism=False).passed

    with sqlite3.connect(tmp_path / "readmodel.db") as connection:
        connection.execute(
            "UPDATE accounts SET balance_minor = balance_minor + 1 WHERE account_id = ?", (ACCOUNTS["carol"],)
        )
    report = run_audit(clean_settings, readmodel_db=db_url, check_determinism=False)
    found = _only(report, Kind.snapshot_mismatch("read_model"))
    assert found.account_id == ACCOUNTS["carol"] and "balance" in found.message


# -- balance at a point in the past -------------------------------------------------------------


def test_balance_at_an_offset_and_at_a_time(clean_settings, clean_log):
    alice = ACCOUNTS["alice"]
    events = _events_of(clean_log, alice)
    partition, deposit_position, deposit = next(item for item in events if type(item[2]) is Deposited)

    before_open = balance_at(clean_settings, alice, at_ms=events[0][2].ts_ms - 1)
    assert not before_open.opened
    opened = balance_at(clean_settings, alice, offset=events[0][1])
    assert (opened.opened, opened.balance, opened.seq) == (True, "0.00", 1)
    funded = balance_at(clean_settings, alice, offset=deposit_position)
    assert (funded.balance, funded.last_offset, funded.partition) == ("100.00", deposit_position, partition)
    iso = "2026-01-01T00:00:00Z"
    assert parse_time_ms(iso) == START_MS
    at_time = balance_at(clean_settings, alice, at_ms=deposit.ts_ms)
    assert at_time.balance == "100.00" and at_time.last_ts_ms == deposit.ts_ms
    now = balance_at(clean_settings, alice, at_ms=parse_time_ms("2030-01-01T00:00:00+00:00"))
    assert now.balance == accounts_view(clean_log.states[partition])[alice]["balance"]
    assert now.seq == events[-1][2].seq


def test_balance_command_prints_the_balance(clean_settings, capsys):
    prefix = ["--bootstrap", clean_settings.bootstrap, "--topic-prefix", clean_settings.topic_prefix]
    assert main([*prefix, "audit", "balance", ACCOUNTS["carol"], "--at", "2026-01-01T00:00:30Z", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["account_id"] == ACCOUNTS["carol"] and answer["currency"] == "USD"
    assert main([*prefix, "audit", "balance", ACCOUNTS["carol"], "--at", "yesterday"]) == 2


# -- reading the log ----------------------------------------------------------------------------


def test_reading_stops_at_an_open_transaction_without_its_records(make_settings):
    settings = make_settings(1)
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap,
            "partitioner": KAFKA_PARTITIONER,
            "transactional.id": f"{settings.topic_prefix}open-{uuid.uuid4().hex[:6]}",
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(settings.events_topic, b"committed", b"k", 0)
    producer.commit_transaction(30)
    producer.begin_transaction()  # a processor in the middle of a batch
    producer.produce(settings.events_topic, b"not yet", b"k", 0)
    producer.flush(30)
    try:
        log = read_topic(settings.bootstrap, settings.events_topic, timeout_s=20)
    finally:
        producer.abort_transaction(30)
    assert log.partitions[0].values == [b"committed"]
    assert log.partitions[0].end_offset == 2  # the record and its commit marker


def test_a_log_that_no_longer_starts_at_zero_is_named(make_settings, clean_log):
    settings = _written(make_settings, clean_log)
    partition = partition_for(ACCOUNTS["alice"], PARTITIONS)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})  # kept referenced until the future resolves
    [future] = admin.delete_records([TopicPartition(settings.events_topic, partition, 2)], request_timeout=30).values()
    future.result(timeout=30)

    report = run_audit(settings, check_determinism=False)

    found = _only(report, Kind.LOG_TRUNCATED)
    assert (found.topic, found.partition, found.offset) == (settings.events_topic, partition, 2)
